"""``pml-proxies-mlrc``: powerful-benchmarker 0.9.33 with this package's losses, on PML 2.9.

Usage (every option that powerful-benchmarker's ``run.py`` takes is accepted, and every other
``--key value`` is a config override, exactly as in powerful-benchmarker)::

    pml-proxies-mlrc --experiment_name mpa_cub --dataset_root /data --root_experiment_folder /exp \\
        --config_loss_and_miners [default, mpa] --config_optimizers [default, proxy_lr_bayes_opt] \\
        --bayes_opt_iters 50 --reproductions 10

Options of the launcher itself (removed before powerful-benchmarker parses the command line):

* ``--config_folder DIR`` (repeatable): a config folder laid over the merged ones (same layout:
  ``config_<type>/<name>.yaml``); a file there replaces the file of the same name.
* ``--root_config_folder DIR``: taken as one more ``--config_folder`` (powerful-benchmarker's own
  option replaces the packaged folder, which would lose its defaults).
* ``--pml_proxies_configs DIR``: this package's config folder (default: the repository's
  ``powerful_benchmarker_configs``).
* ``--register TYPE:MODULE`` (repeatable): also register an importable module's classes with
  powerful-benchmarker, e.g. ``--register loss:my_package.my_losses``.
* ``--print_config_folder``: merge the folders, print where, and exit without running.

The merged folder is powerful-benchmarker's packaged configs, then ``powerful_benchmarker_configs``,
then each ``--config_folder``, written to a temporary folder for the run.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PACKAGE_CONFIGS_ENV = "PML_PROXIES_MLRC_CONFIGS"
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "powerful_benchmarker_configs"


def default_configs_folder() -> Path:
    """This package's config folder: ``$PML_PROXIES_MLRC_CONFIGS`` or the repository's one."""
    env = os.environ.get(PACKAGE_CONFIGS_ENV)
    return Path(env) if env else REPO_CONFIGS


def packaged_configs_folder() -> Path:
    """powerful-benchmarker's packaged config folder (imports powerful_benchmarker)."""
    import powerful_benchmarker

    return Path(powerful_benchmarker.__file__).resolve().parent / "configs"


def merge_config_folders(
    folders: Iterable[str | os.PathLike[str]], destination: str | os.PathLike[str]
) -> Path:
    """Copy each config folder's YAML files into ``destination``, later folders winning.

    Only ``config_foldernames.yaml`` and ``config_*/*.yaml`` files are copied.
    """
    merged = Path(destination)
    merged.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        source = Path(folder)
        if not source.is_dir():
            raise ValueError(f"config folder {str(source)!r} does not exist")
        for path in sorted(source.rglob("*.yaml")):
            rel = path.relative_to(source)
            top_level = len(rel.parts) == 1 and rel.name == "config_foldernames.yaml"
            in_type_folder = len(rel.parts) == 2 and rel.parts[0].startswith("config_")
            if top_level or in_type_folder:
                (merged / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, merged / rel)
    return merged


def register_pml_proxies(runner: Any, extra: Iterable[str] = ()) -> None:
    """Register this package's losses, regularisers, smoke-test trunk and data set, then each
    ``"TYPE:MODULE"`` of ``extra``, with powerful-benchmarker's ``runner`` (a
    ``BaseRunner``: powerful-benchmarker has no type information)."""
    import importlib

    from .. import losses, regularizers
    from . import datasets, models

    runner.register("loss", losses)
    runner.register("regularizer", regularizers)
    runner.register("model", models)
    runner.register("dataset", datasets)
    for spec in extra:
        kind, sep, module = spec.partition(":")
        if not sep or not kind or not module:
            raise ValueError(f"--register expects TYPE:MODULE (e.g. loss:my.module), got {spec!r}")
        runner.register(kind, importlib.import_module(module))


def _launcher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config_folder", action="append", default=[])
    parser.add_argument("--root_config_folder", action="append", default=[])
    parser.add_argument("--pml_proxies_configs", default=None)
    parser.add_argument("--register", action="append", default=[])
    parser.add_argument("--print_config_folder", action="store_true")
    return parser


def _runner_parser() -> argparse.ArgumentParser:
    # the options of powerful-benchmarker 0.9.33's run.py
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--pytorch_home", type=str, default=None)
    parser.add_argument("--dataset_root", type=str, default="datasets")
    parser.add_argument("--root_experiment_folder", type=str, default="experiments")
    parser.add_argument("--global_db_path", type=str, default=None)
    parser.add_argument("--merge_argparse_when_resuming", default=False, action="store_true")
    parser.add_argument("--bayes_opt_iters", type=int, default=0)
    parser.add_argument("--reproductions", type=str, default="0")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    own, rest = _launcher_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    try:
        import powerful_benchmarker  # noqa: F401
    except ImportError as error:
        raise SystemExit(
            "pml-proxies-mlrc needs powerful-benchmarker 0.9.33 and its stack: "
            "see powerful_benchmarker_configs/README.md (pip install --no-deps "
            f"powerful-benchmarker==0.9.33 and the 'mlrc' extra). ({error})"
        ) from error

    from . import shims

    applied = shims.apply()
    logging.info("pml-proxies-mlrc: applied shims: %s", "; ".join(applied))

    ours = Path(own.pml_proxies_configs) if own.pml_proxies_configs else default_configs_folder()
    folders = [packaged_configs_folder(), ours, *own.root_config_folder, *own.config_folder]
    with tempfile.TemporaryDirectory(prefix="pml-proxies-mlrc-configs-") as tmp:
        merged = merge_config_folders(folders, tmp)
        if own.print_config_folder:
            kept = Path(tempfile.mkdtemp(prefix="pml-proxies-mlrc-configs-"))
            shutil.copytree(merged, kept, dirs_exist_ok=True)
            print(kept)
            return 0
        run_args, _ = _runner_parser().parse_known_args(rest)
        # powerful-benchmarker's YamlReader parses sys.argv itself: hand it what run.py would see
        sys.argv = [sys.argv[0], *rest]
        if run_args.bayes_opt_iters > 0:
            from powerful_benchmarker.runners.bayes_opt_runner import BayesOptRunner as runner_cls

            run_args.reproductions = [int(x) for x in run_args.reproductions.split(",")]
        else:
            from powerful_benchmarker.runners.single_experiment_runner import (
                SingleExperimentRunner as runner_cls,
            )

            del run_args.bayes_opt_iters
            del run_args.reproductions
        runner = runner_cls(root_config_folder=str(merged), **vars(run_args))
        register_pml_proxies(runner, own.register)
        runner.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
