"""The ``benchmark`` extra: which modules the harness needs beyond the plugin, and the one-line
message when they are missing.

The plugin (losses, regularizers, reducers, functional, hooks, the accuracy calculator, data sets)
installs with torch, pytorch-metric-learning, numpy, scikit-learn, tqdm and pillow only. The
harness (:mod:`pml_proxies.benchmark`, its tuner, :mod:`pml_proxies.mlrc`) needs the modules of
``pip install "pml-proxies[benchmark]"`` too. Its packages check for them when imported
(:func:`require_benchmark_extra`), and its console scripts start through :func:`benchmark_main`,
:func:`mlrc_main` and :func:`mlrc_report_main`, which print the message and exit with status 2
instead of a traceback. The check only looks the modules up (no import), so it costs
milliseconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable

#: the import names of the ``benchmark`` extra's packages (pyproject.toml), in that order
BENCHMARK_MODULES = ("pandas", "matplotlib", "scipy", "filelock", "record_keeper", "tensorboard")
INSTALL = 'pip install "pml-proxies[benchmark]"'


def missing_modules(modules: tuple[str, ...] = BENCHMARK_MODULES) -> list[str]:
    """The names of ``modules`` that cannot be imported here (looked up, not imported)."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a finder refused it, or a stub in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing


def extra_message(what: str, missing: list[str]) -> str:
    """The one line that tells how to install the harness: ``WHAT needs the benchmark extra``."""
    return f"{what} needs the benchmark extra: {INSTALL} (missing: {', '.join(missing)})"


def require_benchmark_extra(package: str) -> None:
    """Raise ImportError with :func:`extra_message` when a module of the extra is missing.

    Called by the harness's packages as they are imported. Under ``python -m`` (which sets
    ``sys.argv[0]`` to ``"-m"`` while it locates the module, i.e. while it imports the module's
    parent packages) the line is printed to stderr and the process exits with status 2, as the
    console scripts do, instead of runpy's traceback.
    """
    missing = missing_modules()
    if not missing:
        return
    if sys.argv[:1] == ["-m"]:
        print(extra_message(f"python -m {package}", missing), file=sys.stderr)
        raise SystemExit(2)
    raise ImportError(extra_message(package, missing), name=package)


def _console(command: str, target: str) -> Callable[[], int]:
    """The entry point of console script ``command``: ``module:function`` once the extra is
    there, else the one-line message and exit status 2."""

    def main() -> int:
        missing = missing_modules()
        if missing:
            print(extra_message(command, missing), file=sys.stderr)
            return 2
        module, _, function = target.partition(":")
        entry: Callable[[], int] = getattr(importlib.import_module(module), function)
        return entry()

    main.__name__ = main.__qualname__ = f"{command.replace('-', '_')}_main"
    main.__doc__ = f"``{command}``: :func:`{target.replace(':', '.')}` behind the extra check."
    return main


benchmark_main = _console("pml-proxies-benchmark", "pml_proxies.benchmark.cli:main")
mlrc_main = _console("pml-proxies-mlrc", "pml_proxies.mlrc.launcher:main")
mlrc_report_main = _console("pml-proxies-mlrc-report", "pml_proxies.mlrc.report:main")
