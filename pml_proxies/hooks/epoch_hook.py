"""Tell stateful losses which epoch starts (the schedule of Proxy-ISA and similar losses)."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from ..functional.validation import check_int


def stateful_losses(obj) -> list:
    """Every object with a callable ``set_epoch`` found in ``obj``: a loss, a module wrapping one
    (e.g. PML's ``DistributedLossWrapper``, DDP: searched with ``.modules()``), or a dict / list /
    tuple of those (e.g. a trainer's ``loss_funcs``). Each object appears once, in order."""
    found, seen = [], set()

    def visit(item):
        if isinstance(item, dict):
            for value in item.values():
                visit(value)
        elif isinstance(item, (list, tuple)):
            for value in item:
                visit(value)
        elif isinstance(item, torch.nn.Module):
            for module in item.modules():
                add(module)
        else:
            add(item)

    def add(item):
        if callable(getattr(item, "set_epoch", None)) and id(item) not in seen:
            seen.add(id(item))
            found.append(item)

    visit(obj)
    return found


def set_epoch(obj, epoch: int) -> int:
    """Call ``set_epoch(epoch)`` on every stateful loss in ``obj``; returns how many there were.
    ``epoch`` must be an integer >= 0 (checked before any loss is touched)."""
    epoch = check_int("epoch", epoch, low=0)
    losses = stateful_losses(obj)
    for loss in losses:
        loss.set_epoch(epoch)
    return len(losses)


class _SyncToTrainerEpoch:
    """Forward pre-hook: before each forward, ``loss.set_epoch(trainer.epoch)``."""

    def __init__(self, trainer) -> None:
        self.trainer = weakref.ref(trainer)

    def __call__(self, module, args):
        trainer = self.trainer()
        epoch = None if trainer is None else getattr(trainer, "epoch", None)
        if epoch is not None:
            module.set_epoch(int(epoch))


class SetEpochHook:
    """Drives the epoch schedule of every stateful loss of a PML trainer.

    PML trainers count epochs from 1 and call ``end_of_epoch_hook(trainer)`` after each epoch;
    this hook then calls ``set_epoch(trainer.epoch + 1)`` on every loss in ``trainer.loss_funcs``
    that has a ``set_epoch`` method, also when wrapped (``DistributedLossWrapper``, DDP). A
    loss starts at epoch 1, so nothing is needed before the first epoch. In a plain PyTorch loop
    call ``loss.set_epoch(epoch)`` at the start of each epoch instead (as with
    ``DistributedSampler.set_epoch``).

    Usage::

        epoch_hook = SetEpochHook()
        trainer = epoch_hook.attach(trainers.MetricLossOnly(
            ...,
            end_of_iteration_hook=hooks.end_of_iteration_hook,
            end_of_epoch_hook=epoch_hook.end_of_epoch_hook(
                hooks.end_of_epoch_hook(tester, dataset_dict, model_folder)),
        ))
        start_epoch = hooks.load_latest_saved_models(trainer, model_folder, device)
        trainer.train(start_epoch, num_epochs)

    The instance itself is a valid ``end_of_epoch_hook``. :meth:`end_of_epoch_hook` chains
    another hook (e.g. ``HookContainer.end_of_epoch_hook(...)``), called *after* the epoch is
    advanced, so that the checkpoint it saves already holds the next epoch and resuming with
    ``train(start_epoch=...)`` continues the schedule where it stopped.

    :meth:`attach` makes the schedule independent of hook order and checkpoint timing: it
    registers a forward pre-hook on every stateful loss of the trainer that syncs the loss to
    ``trainer.epoch`` right before each forward (the trainer sets ``trainer.epoch`` before
    running the epoch's first iteration). The hook attaches itself on its first call too, but
    only an explicit ``attach`` covers the first epoch after a resume whatever order the hooks
    saved the checkpoint in.
    """

    def __init__(self) -> None:
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}

    def __call__(self, trainer) -> bool:
        self.attach(trainer)
        set_epoch(trainer.loss_funcs, trainer.epoch + 1)
        return True

    def end_of_epoch_hook(self, hook: Callable | None = None) -> Callable:
        """An ``end_of_epoch_hook`` that advances the epoch, then calls ``hook(trainer)`` (if
        any) and returns its result (``False`` stops training, as in PML)."""

        def actual_hook(trainer):
            self(trainer)
            return True if hook is None else hook(trainer)

        return actual_hook

    def end_of_iteration_hook(self, hook: Callable | None = None) -> Callable:
        """An ``end_of_iteration_hook`` that syncs the losses to ``trainer.epoch`` (and attaches
        to the trainer), then calls ``hook(trainer)`` if given."""

        def actual_hook(trainer):
            self.attach(trainer)
            set_epoch(trainer.loss_funcs, trainer.epoch)
            if hook is not None:
                return hook(trainer)
            return None

        return actual_hook

    def attach(self, trainer):
        """Sync every stateful loss module of ``trainer.loss_funcs`` to ``trainer.epoch`` before
        each of its forwards; returns ``trainer``. Idempotent."""
        for loss in stateful_losses(trainer.loss_funcs):
            if isinstance(loss, torch.nn.Module) and id(loss) not in self._handles:
                handle = loss.register_forward_pre_hook(_SyncToTrainerEpoch(trainer))
                self._handles[id(loss)] = handle
        return trainer

    def detach(self) -> None:
        """Remove the forward pre-hooks installed by :meth:`attach`."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
