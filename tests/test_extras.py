"""The plugin installs light; the harness needs the ``benchmark`` extra and says so in one line.

Each check runs in a subprocess whose ``sitecustomize`` hides some modules (the import system
finds nothing of them, as if they were not installed), so the environment of the tests, which has
every extra, stands in for one without the extra.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: the extra's modules that are not installed with the plugin anyway (scipy comes with
#: scikit-learn, a dependency of pytorch-metric-learning)
NOT_IN_CORE = ("pandas", "matplotlib", "record_keeper", "tensorboard")
BLOCKER = """\
import sys
from importlib.abc import MetaPathFinder

HIDDEN = {hidden!r}


class Hide(MetaPathFinder):
    \"\"\"The interpreter's finders, which find nothing of HIDDEN (as if not installed).\"\"\"

    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                return spec
        return None

    def invalidate_caches(self):
        for finder in self.finders:
            getattr(finder, "invalidate_caches", lambda: None)()


sys.meta_path[:] = [Hide(list(sys.meta_path))]
"""


def run_hiding(tmp_path, hidden, *args):
    """Run ``python ARGS`` from the repository with the modules ``hidden`` not importable."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER.format(hidden=tuple(hidden)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )


def expected_line(what, missing):
    return (
        f'{what} needs the benchmark extra: pip install "pml-proxies[benchmark]" '
        f"(missing: {', '.join(missing)})"
    )


@pytest.mark.parametrize("package", ["pml_proxies.benchmark", "pml_proxies.mlrc"])
def test_import_without_the_extra_raises_one_line_naming_it(tmp_path, package):
    code = textwrap.dedent(f"""\
        try:
            import {package}
        except ImportError as error:
            print(error)
        else:
            print("imported")
    """)
    out = run_hiding(tmp_path, ["pandas", "tensorboard"], "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected_line(package, ["pandas", "tensorboard"]) + "\n"


@pytest.mark.parametrize("module", ["pml_proxies.benchmark", "pml_proxies.mlrc.report"])
def test_module_run_without_the_extra_exits_2_with_one_line(tmp_path, module):
    out = run_hiding(tmp_path, ["matplotlib"], "-m", module, "--help")
    assert out.returncode == 2
    assert out.stdout == ""
    package = module if module == "pml_proxies.benchmark" else "pml_proxies.mlrc"
    assert out.stderr == expected_line(f"python -m {package}", ["matplotlib"]) + "\n"


SCRIPTS = PYPROJECT["project"]["scripts"]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_scripts_without_the_extra_exit_2_with_one_line(tmp_path, script):
    module, _, function = SCRIPTS[script].partition(":")
    code = f"import sys; from {module} import {function}; sys.exit({function}())"
    out = run_hiding(tmp_path, ["record_keeper"], "-c", code, "--help")
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr == expected_line(script, ["record_keeper"]) + "\n"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_scripts_with_the_extra_run_their_command(script):
    module, _, function = SCRIPTS[script].partition(":")
    entry = getattr(__import__(module, fromlist=[function]), function)
    target = entry.__doc__.split(":func:`", 1)[1].split("`", 1)[0]
    target_module, _, target_function = target.rpartition(".")
    code = (
        f"import sys; sys.argv = [{script!r}, '--help']\n"
        f"from {module} import {function}; sys.exit({function}())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "needs the benchmark extra" not in out.stdout + out.stderr
    assert out.stdout.strip()  # its --help text
    assert callable(getattr(__import__(target_module, fromlist=["_"]), target_function))


def test_the_extra_lists_the_modules_that_are_checked():
    """One list each (pyproject's extra, _extras.BENCHMARK_MODULES): they name the same things."""
    from pml_proxies import _extras

    extra = PYPROJECT["project"]["optional-dependencies"]["benchmark"]
    names = [re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0] for requirement in extra]
    assert [n.replace("-", "_") for n in names] == list(_extras.BENCHMARK_MODULES)
    core = [
        re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0] for r in PYPROJECT["project"]["dependencies"]
    ]
    assert not set(core) & set(names)


def test_the_plugin_works_without_the_extra(tmp_path):
    """Every loss, the calculator and the data sets import and run with the extra's modules
    hidden (except scipy, which scikit-learn brings), and none of them loads a hidden one."""
    code = textwrap.dedent("""\
        import sys

        import torch

        import pml_proxies
        from pml_proxies import datasets, functional, hooks, losses, reducers, regularizers
        from pml_proxies.utils import AccuracyCalculator

        torch.manual_seed(0)
        embeddings = torch.randn(16, 8)
        labels = torch.arange(4).repeat(4)
        loss = losses.MultiProxyAnchorLoss(num_classes=4, embedding_size=8)
        loss(embeddings, labels).backward()
        accuracies = AccuracyCalculator(k=3).get_accuracy(embeddings, labels)
        assert accuracies, accuracies
        image, label = datasets.get_dataset("digits", "train")[0]
        print(sorted(m for m in sys.modules if m.split(".")[0] in {hidden!r}))
    """).format(hidden=NOT_IN_CORE)
    out = run_hiding(tmp_path, NOT_IN_CORE, "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "[]\n"


def test_missing_modules_looks_up_without_importing(monkeypatch):
    from pml_proxies import _extras

    monkeypatch.setitem(sys.modules, "pandas", None)  # as a blocked import
    assert _extras.missing_modules(("pandas", "os", "no_such_module_pml_proxies")) == [
        "pandas",
        "no_such_module_pml_proxies",
    ]
