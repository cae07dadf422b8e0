"""A run's model, kept and loaded back (``--save-models``).

With ``--save-models`` every run of ``run`` and of ``tune``'s re-runs (``tuned/``) keeps, in its
run folder, the network of its selected epoch (trunk, pooling and linear embedder), its loss
(the learned proxies) and its resolved specification
(:meth:`~pml_proxies.benchmark.store.RunFolder.save_model`). :func:`load_model` rebuilds them:

    >>> from pml_proxies.benchmark import load_model
    >>> saved = load_model("benchmark_results/runs/mpa/seed_0")  # doctest: +SKIP
    >>> embeddings = saved.embed(images)  # L2-normalised, as the benchmark evaluates  # doctest: +SKIP

Loading needs torch and the network's modules only (not the harness's tables, plots or tuner);
the loss, which imports pytorch-metric-learning, is rebuilt on request (``with_loss=True``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .models import EmbeddingNet, build_network
from .recipes import FEATURE_TRUNKS
from .store import RunFolder, run_folder

if TYPE_CHECKING:
    from .spec import RunSpec


def spec_record(spec: RunSpec) -> dict[str, Any]:
    """``spec`` as JSON data (``model.json``'s ``spec``): every field of the
    :class:`~pml_proxies.benchmark.spec.RunSpec`, its configuration as ``config.json`` holds it,
    objects among the loss arguments as their ``repr``."""
    out = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    out["config"] = dataclasses.asdict(spec.config)
    out["trunk"] = dataclasses.asdict(spec.trunk)
    for key in ("loss_overrides", "loss_kwargs", "effective_loss_kwargs"):
        out[key] = dict(out[key])
    return out


def save_run_model(
    folder: RunFolder | Path, spec: RunSpec, model: nn.Module, loss: nn.Module, num_classes: int,
    best_epoch: int, in_channels: int,
) -> None:  # fmt: skip
    """Keep a run's selected ``model`` and ``loss`` in its run folder
    (:meth:`~pml_proxies.benchmark.store.RunFolder.save_model`: state dicts on the CPU, and the
    spec, and ``in_channels``: what the network takes, the images' channels or the features'
    width)."""

    def cpu(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    record = {"best_epoch": int(best_epoch), "num_classes": int(num_classes),
              "in_channels": int(in_channels), "spec": spec_record(spec)}  # fmt: skip
    run_folder(folder).save_model({"model": cpu(model), "loss": cpu(loss)}, record)


def build_model(spec: dict, in_channels: int) -> EmbeddingNet:
    """The network of a saved run's ``spec`` (``model.json``'s), untrained and without
    downloading weights: its trunk, pooling and embedder as the run built them
    (:func:`~pml_proxies.benchmark.models.build_network`)."""
    config = spec["config"]
    return build_network(spec["trunk"]["name"], in_channels, spec["image_size"], False,
                         config["pooling"], config["embedding_size"], config.get("mlp_width"))  # fmt: skip


class SavedModel(NamedTuple):
    """What :func:`load_model` returns (also unpacks as ``model, spec, loss``).

    Attributes:
        model: the run's network at its selected epoch
            (:class:`~pml_proxies.benchmark.models.EmbeddingNet`: trunk, pooling, linear
            embedder), in eval mode; ``model(x)`` gives raw embeddings, :meth:`embed` the
            L2-normalised ones the benchmark evaluates.
        spec: the run's resolved specification (``model.json``'s ``spec``: loss, seed,
            configuration, loss arguments, trunk, image size, channels, ...), with
            ``best_epoch`` and ``num_classes`` added.
        loss: the loss with its learned parameters (proxies), in eval mode, with
            ``with_loss=True``; else ``None``.
    """

    model: nn.Module
    spec: dict
    loss: nn.Module | None = None

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 embeddings of the batch ``x`` (images as the run's evaluation
        transform gives them, :meth:`transform`; or feature rows), on the model's device: what
        the benchmark computes when it evaluates."""
        self.model.eval()
        device = next(self.model.parameters()).device
        return F.normalize(self.model(x.to(device)).float(), dim=1)

    def transform(self):
        """The run's evaluation transform (PIL image or array -> tensor), as the benchmark
        built it for its test images (:func:`pml_proxies.datasets.get_transforms`). A head
        trained on frozen features (trunk ``linear`` or ``mlp``) has none: ``ValueError``."""
        from ..datasets import get_transforms

        config = self.spec["config"]
        if config["trunk"] in FEATURE_TRUNKS:
            raise ValueError(
                f"this run's network is a {config['trunk']!r} head on frozen features: it embeds "
                "feature vectors (embed(features)), not images, so it has no image transform"
            )
        channels = self.spec["channels"]
        return get_transforms(
            config["dataset"], train=False, image_size=config["image_size"], channels=channels
        )


def load_model(
    run_dir: str | os.PathLike | RunFolder,
    *,
    device: str | torch.device = "cpu",
    with_loss: bool = False,
) -> SavedModel:
    """The selected model of the run in ``run_dir`` (a run folder of an output folder trained
    with ``--save-models``: ``OUTPUT/runs/<loss>/seed_<s>`` or ``OUTPUT/tuned/runs/...``).

    The files are checked before anything is built: ``model.json`` against its schema and
    ``model.pt`` against the checksum it records; the state dicts must then fit the network
    (and loss) the spec describes exactly.

    Args:
        run_dir: the run's folder.
        device: where to put the model (and loss).
        with_loss: also rebuild the loss with its learned parameters (imports
            pytorch-metric-learning).

    Returns:
        :class:`SavedModel` ``(model, spec, loss)``, the model in eval mode.

    Raises:
        FileNotFoundError: ``run_dir`` is not a folder.
        ValueError: no saved model (a run trained without ``--save-models``: the message says
            so), or a damaged one (naming the file and the problem).
    """
    folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(Path(run_dir))
    if not folder.path.is_dir():
        raise FileNotFoundError(f"load_model: {folder.path} is not a run folder")
    record, state = folder.load_model_state()
    spec = dict(record["spec"], best_epoch=record["best_epoch"],
                num_classes=record["num_classes"])  # fmt: skip
    path = folder.path / record["file"]
    model = build_model(spec, record["in_channels"])
    _load_state(model, state["model"], path, "model")
    model.to(device).eval()
    loss = None
    if with_loss:
        from ..registry import build_loss

        loss, _ = build_loss(
            spec["loss"],
            spec["num_classes"],
            spec["config"]["embedding_size"],
            dataset=spec["config"]["dataset"],
            overrides=dict(spec["loss_overrides"]),
        )
        _load_state(loss, state["loss"], path, "loss")
        loss.to(device).eval()
    return SavedModel(model, spec, loss)


def _load_state(module: nn.Module, state: dict, path: Path, what: str) -> None:
    """``module.load_state_dict(state)`` (strict); a mismatch is a ``ValueError`` naming
    ``path``."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(
            f"{path}: its {what} state dict does not fit the {what} that model.json describes ({e})"
        ) from None


__all__ = ["SavedModel", "load_model", "save_run_model", "spec_record", "build_model"]
