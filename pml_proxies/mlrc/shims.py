"""Run powerful-benchmarker 0.9.33 on pytorch-metric-learning 2.9 and record-keeper 0.9.32.

powerful-benchmarker 0.9.33 (the code of "A Metric Learning Reality Check") was written for
pytorch-metric-learning 0.9.92 and record-keeper 0.9.29. :func:`apply` patches, from outside the
package and only inside the process that calls it, each place where it breaks on the newer stack:

1. ``pytorch_metric_learning.utils.common_functions.Identity`` is gone: alias ``torch.nn.Identity``.
2. ``get_record_keeper(save_figures=...)`` is no longer accepted: the keyword is dropped.
3. ``BaseTester(reference_set=...)`` is no longer accepted: ``"compared_to_self"`` is PML 2.x's
   default and is dropped; any other value raises a ValueError (MLRC only compares to self).
4. ``HookContainer.record_group_name`` reads ``tester.reference_split_names[split]`` before any test
   ran: a split that was not tested yet is named as compared to itself.
5. ``tester.test(splits_to_eval=["val"])`` must now be ``[("val", ["val"])]``: plain split names are
   converted.
6. dummy hooks have ``record_keeper=None``: ``record_group_name`` then skips the hashed-name lookup.
7. record-keeper renamed ``update_records(input_group_name_for_non_objects=)`` to ``parent_name=``:
   the old keyword is accepted.
8. record-keeper 0.9.32 keys rows by iteration and sorts them; the ensemble evaluation logged its
   accuracies at a string "epoch" (``"trained"``) and its ``trained_status`` at an int row
   number: the accuracies of a string epoch are now logged at that same row number, so they land
   on one row again (the ``epoch`` column still holds the string).
9. the new ``~iteration~`` column was averaged into the Bayesian-optimisation accuracy reports:
   columns whose names start with ``~`` are dropped from ``report_*.yaml``.

Beyond the nine:

10. the loss factory passes ``num_classes`` to the loss only; a nested ``weight_regularizer`` whose
    constructor takes ``num_classes`` or ``centers_per_class`` (PML's ``SparseCentersRegularizer``,
    :class:`~pml_proxies.regularizers.IntraClassCenterRegularizer`) and does not set it gets the
    loss's value, so that it follows the fold's class count and a searched ``centers_per_class``.
11. epoch-driven losses: at the start of every training epoch, every loss (also nested ones) with a
    ``set_epoch`` method gets ``loss.set_epoch(trainer.epoch)`` (epochs counted from 1, as PML
    trainers do; on resume the trainer starts at the saved epoch + 1 and the loss state itself is
    restored from its checkpoint by PML's ``HookContainer``).

Every patch is idempotent; :func:`apply` returns the names of the patches it applied.

powerful-benchmarker and record-keeper carry no type information: their objects (runners,
factories, testers, hooks, record keepers) are typed ``Any`` here.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

LOGGER = logging.getLogger(__name__)
_MARK = "_pml_proxies_mlrc_patched"
F = TypeVar("F", bound=Callable[..., Any])


def _patched(obj: object, name: str) -> bool:
    return bool(getattr(getattr(obj, name, None), _MARK, False))


def _mark(func: F) -> F:
    setattr(func, _MARK, True)
    return func


def _shim_identity() -> None:
    import torch
    from pytorch_metric_learning.utils import common_functions as pml_cf

    if not hasattr(pml_cf, "Identity"):
        pml_cf.Identity = torch.nn.Identity


def _shim_get_record_keeper() -> None:
    from pytorch_metric_learning.utils import logging_presets

    if _patched(logging_presets, "get_record_keeper"):
        return
    original = logging_presets.get_record_keeper

    @functools.wraps(original)
    def get_record_keeper(*args: Any, save_figures: object = None, **kwargs: Any) -> Any:
        return original(*args, **kwargs)

    logging_presets.get_record_keeper = _mark(get_record_keeper)


def _shim_tester_reference_set() -> None:
    from powerful_benchmarker.factories import tester_factory

    cls = tester_factory.TesterFactory
    if _patched(cls, "_create_general"):
        return
    original = cls._create_general

    def _create_general(
        self: Any, tester_type: dict[str, Any], plots_folder: str, **kwargs: Any
    ) -> Any:
        tester_type = copy.deepcopy(tester_type)
        for params in tester_type.values():
            if isinstance(params, dict) and "reference_set" in params:
                reference_set = params.pop("reference_set")
                if reference_set not in (None, "compared_to_self"):
                    raise ValueError(
                        "pml-proxies-mlrc supports only tester reference_set 'compared_to_self' "
                        f"(pytorch-metric-learning 2.x's default), got {reference_set!r}"
                    )
        return original(self, tester_type, plots_folder, **kwargs)

    cls._create_general = _mark(_create_general)


def _shim_record_group_name() -> None:
    from pytorch_metric_learning.utils.logging_presets import HookContainer

    if _patched(HookContainer, "record_group_name"):
        return

    def record_group_name(self: Any, tester: Any, split_name: str) -> str:
        base_record_group_name: str = self.base_record_group_name(tester)
        query_set_label = split_name.upper()
        references = getattr(tester, "reference_split_names", None) or {}
        reference_names = references.get(split_name, [split_name])
        reference_sets_label = "_and_".join(name.upper() for name in sorted(reference_names))
        if reference_sets_label == query_set_label:
            reference_sets_label = "self"
        name = f"{base_record_group_name}_{query_set_label}_vs_{reference_sets_label}"
        hash_map = getattr(self.record_keeper, "hash_map", None) or {}
        for key, val in hash_map.items():
            if val == name:
                return str(key)
        return name

    HookContainer.record_group_name = _mark(record_group_name)


def _shim_splits_to_eval() -> None:
    from pytorch_metric_learning.testers.base_tester import BaseTester

    if _patched(BaseTester, "test"):
        return
    original = BaseTester.test

    @functools.wraps(original)
    def test(
        self: Any,
        dataset_dict: dict[str, Any],
        epoch: int | str,
        trunk_model: Any,
        embedder_model: Any = None,
        splits_to_eval: list[str | tuple[str, list[str]]] | None = None,
        collate_fn: Callable[..., Any] | None = None,
    ) -> Any:
        if splits_to_eval is not None:
            splits_to_eval = [(s, [s]) if isinstance(s, str) else s for s in splits_to_eval]
        return original(
            self, dataset_dict, epoch, trunk_model, embedder_model, splits_to_eval, collate_fn
        )

    BaseTester.test = _mark(test)


def _shim_update_records_keyword() -> None:
    from record_keeper import RecordKeeper

    if _patched(RecordKeeper, "update_records"):
        return
    original = RecordKeeper.update_records

    @functools.wraps(original)
    def update_records(
        self: Any, record_these: Any, global_iteration: int, *args: Any, **kwargs: Any
    ) -> Any:
        old = kwargs.pop("input_group_name_for_non_objects", None)
        if old is not None and "parent_name" not in kwargs:
            kwargs["parent_name"] = old
        return original(self, record_these, global_iteration, *args, **kwargs)

    RecordKeeper.update_records = _mark(update_records)


def _shim_string_epochs() -> None:
    from powerful_benchmarker.utils import common_functions as pb_cf
    from pytorch_metric_learning.utils.logging_presets import HookContainer

    if _patched(HookContainer, "end_of_testing_hook"):
        return

    def end_of_testing_hook(self: Any, tester: Any) -> None:
        for split_name, accuracies in tester.all_accuracies.items():
            epoch = accuracies["epoch"]
            group = self.record_group_name(tester, split_name)
            row = epoch
            if isinstance(epoch, str):
                # the row that powerful-benchmarker gives the trained_status of this evaluation
                row = pb_cf.try_getting_db_count(self.record_keeper, group) + 1
            self.record_keeper.update_records(accuracies, row, parent_name=group)
            _, _, best_epoch, best_accuracy = self.is_new_best_accuracy(tester, split_name, epoch)
            best = {"best_epoch": best_epoch, "best_accuracy": best_accuracy}
            self.record_keeper.update_records(best, row, parent_name=group)

    HookContainer.end_of_testing_hook = _mark(end_of_testing_hook)


def _shim_report_iteration_column() -> None:
    from powerful_benchmarker.runners.bayes_opt_runner import BayesOptRunner
    from powerful_benchmarker.utils import common_functions as pb_cf

    if _patched(BayesOptRunner, "create_accuracy_report"):
        return
    original = BayesOptRunner.create_accuracy_report

    @functools.wraps(original)
    def create_accuracy_report(self: Any, best_sub_experiment_name: str) -> Any:
        output = original(self, best_sub_experiment_name)
        folder = self.bayes_opt_root_experiment_folder
        for name in sorted(os.listdir(folder)):
            if name.startswith("report_") and name.endswith(".yaml"):
                path = os.path.join(folder, name)
                report = pb_cf.load_yaml(path) or {}
                for per_status in report.values():
                    for key in [k for k in per_status if str(k).startswith("~")]:
                        per_status.pop(key)
                pb_cf.write_yaml(path, report, open_as="w")
        return output

    BayesOptRunner.create_accuracy_report = _mark(create_accuracy_report)


def _accepts(cls: type[Any], name: str) -> bool:
    try:
        return name in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def _shim_nested_regularizer_arguments() -> None:
    from powerful_benchmarker.factories.loss_factory import LossFactory

    if _patched(LossFactory, "_create_general"):
        return
    original = LossFactory._create_general

    def _create_general(self: Any, loss_type: dict[str, Any], num_classes: int) -> Any:
        loss_type = copy.deepcopy(loss_type)
        for loss_params in loss_type.values():
            if not isinstance(loss_params, dict):
                continue
            reg_spec = loss_params.get("weight_regularizer")
            if not isinstance(reg_spec, dict) or len(reg_spec) != 1:
                continue
            reg_cls, reg_params = self.getter.get(
                "regularizer", yaml_dict=reg_spec, return_uninitialized=True
            )
            reg_name = next(iter(reg_spec))
            reg_params = dict(reg_spec[reg_name] or {})
            inherited = {"num_classes": loss_params.get("num_classes", num_classes)}
            if "centers_per_class" in loss_params:
                inherited["centers_per_class"] = loss_params["centers_per_class"]
            for key, value in inherited.items():
                if key not in reg_params and _accepts(reg_cls, key):
                    reg_params[key] = value
            loss_params["weight_regularizer"] = {reg_name: reg_params}
        return original(self, loss_type, num_classes)

    LossFactory._create_general = _mark(_create_general)


def set_epoch_on_losses(loss_funcs: Mapping[str, Any], epoch: int) -> list[str]:
    """Call ``set_epoch(epoch)`` on every loss in ``loss_funcs`` (nested ones too, found by
    :func:`pml_proxies.hooks.stateful_losses`) that has it; returns their class names."""
    from ..hooks import stateful_losses

    losses = stateful_losses(loss_funcs)
    for loss in losses:
        loss.set_epoch(int(epoch))
    return [type(loss).__name__ for loss in losses]


def _shim_epoch_schedule() -> None:
    from pytorch_metric_learning.trainers.base_trainer import BaseTrainer

    if _patched(BaseTrainer, "set_to_train"):
        return
    original = BaseTrainer.set_to_train

    @functools.wraps(original)
    def set_to_train(self: Any) -> Any:
        output = original(self)
        updated = set_epoch_on_losses(getattr(self, "loss_funcs", None) or {}, self.epoch)
        if updated:
            LOGGER.info("set_epoch(%d) on %s", self.epoch, ", ".join(updated))
        return output

    BaseTrainer.set_to_train = _mark(set_to_train)


SHIMS: dict[str, Callable[[], None]] = {
    "1 common_functions.Identity": _shim_identity,
    "2 get_record_keeper(save_figures)": _shim_get_record_keeper,
    "3 BaseTester(reference_set)": _shim_tester_reference_set,
    "4+6 HookContainer.record_group_name": _shim_record_group_name,
    "5 tester.test(splits_to_eval)": _shim_splits_to_eval,
    "7 update_records(input_group_name_for_non_objects)": _shim_update_records_keyword,
    "8 string epochs of the ensemble evaluation": _shim_string_epochs,
    "9 ~iteration~ in the accuracy report": _shim_report_iteration_column,
    "10 nested regularizer num_classes/centers_per_class": _shim_nested_regularizer_arguments,
    "11 loss.set_epoch at each epoch": _shim_epoch_schedule,
}


def apply(skip: Iterable[object] | None = None) -> list[str]:
    """Apply every shim (idempotent) and return the names of those applied.

    Args:
        skip: numbers of shims to leave out (to check whether one is still needed); by default
            read from ``$PML_PROXIES_MLRC_SKIP_SHIMS`` (comma-separated, e.g. ``"8,9"``).
    """
    if skip is None:
        skip = [x for x in os.environ.get("PML_PROXIES_MLRC_SKIP_SHIMS", "").split(",") if x]
    skipped = {str(x).strip() for x in skip}
    applied = []
    for name, shim in SHIMS.items():
        numbers = set(name.split(" ", 1)[0].split("+"))
        if numbers & skipped:
            continue
        shim()
        applied.append(name)
    return applied
