"""The base class every loss of this package derives from."""

from __future__ import annotations

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.utils import common_functions as c_f

from ..functional import proxy_math
from ..functional.validation import check_bool, check_int, check_real, check_state_tensor
from ..reducers import SyncFreeDivisorReducer

_COSINE_SETTINGS = ("normalize_embeddings", "p", "power", "is_inverted")
#: PML's keyword arguments that are real numbers (regulariser weights)
_PML_WEIGHTS = ("weight_reg_weight", "embedding_reg_weight")


def check_cosine_distance(distance) -> None:
    """Reject any ``distance=`` but PML's ``CosineSimilarity()`` with its default settings: the
    papers define these losses on the cosine similarity, which the losses compute themselves."""
    if distance is None:
        return
    default = CosineSimilarity()
    same = type(distance) is CosineSimilarity and all(
        getattr(distance, name, None) == getattr(default, name) for name in _COSINE_SETTINGS
    )
    if not same:
        raise ValueError(
            "distance must be PML's CosineSimilarity() with its default settings (the default): "
            "the losses of pml-proxies are defined on the cosine similarity (docs/losses.md, "
            f"'Rules every loss follows'); got {distance!r}"
        )


@proxy_math.run_eagerly
def _commit_state(loss: BaseProxyLoss, update: dict) -> None:
    """``loss.commit_state(update)``, eagerly under ``torch.compile``: the state update is
    data-dependent bookkeeping (sizes read on the host, shapes that change from step to step),
    which would only recompile the graphs; it tripped an internal dynamo error as well."""
    loss.commit_state(update)


class BaseProxyLoss(WeightRegularizerMixin, BaseMetricLossFunction):
    """Common behaviour of the proxy losses of this package (docs/losses.md).

    * checks its input and raises ``ValueError`` naming the problem *before* any state changes
      (labels outside ``[0, num_classes)``, wrong shapes, embedding size mismatch, non-finite
      embeddings, empty batch); ``check_inputs=False`` skips the value checks, which need one
      host sync per call;
    * computes in float32 (float64 stays float64), with autocast disabled inside, and never changes
      the dtype of its parameters (PML's ``ProxyAnchorLoss.cast_types`` turns its proxies float16
      for good after one float16 call; this does not);
    * moves itself (parameters and buffers) to the embeddings' device on first use, as PML's proxy
      losses do, since PML trainers never move loss functions;
    * rejects ``ref_emb`` as PML's proxy losses do;
    * labels must be a tensor (a Python list raises ``TypeError``); labels on another device than
      the embeddings are moved to the embeddings' device before any check;
    * ``distance=`` accepts only PML's ``CosineSimilarity()`` with its default settings (the
      default); any other distance raises ``ValueError`` at construction;
    * every constructor argument is checked once, at construction
      (:mod:`pml_proxies.functional.validation`), PML's ``weight_reg_weight`` and
      ``embedding_reg_weight`` included (finite and >= 0);
    * ``load_state_dict`` checks everything before it writes anything, so a failing load changes
      nothing: every parameter and buffer of the loss in the state must have its shape and values
      its dtype holds (finite; integers for integer buffers), stateful losses check their own
      invariants (:meth:`check_state_dict`), and ``loss.load_state_dict(state)`` (strict) checks
      that no key is missing or unexpected; a failure is a ``ValueError`` naming the key.

    Subclasses implement :meth:`compute_proxy_loss`, called with float32/float64 embeddings.

    Args:
        num_classes: number of classes ``C``; labels must lie in ``[0, num_classes)``.
        embedding_size: embedding dimension ``D``.
        check_inputs: validate label range and finiteness of the embeddings (one host sync).
        **kwargs: PML's usual keyword arguments (``weight_regularizer``, ``weight_reg_weight``,
            ``weight_init_func``, ``reducer``, ``collect_stats``, ...); ``distance`` only as
            ``CosineSimilarity()``.
    """

    def __init__(
        self, num_classes: int, embedding_size: int, check_inputs: bool = True, **kwargs
    ) -> None:
        num_classes = check_int("num_classes", num_classes, low=1)
        embedding_size = check_int("embedding_size", embedding_size, low=1)
        check_inputs = check_bool("check_inputs", check_inputs)
        check_cosine_distance(kwargs.get("distance"))
        for name in _PML_WEIGHTS:
            if name in kwargs:
                kwargs[name] = check_real(name, kwargs[name], low=0)
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.check_inputs = check_inputs
        self._staged_state: dict | None = None
        self.add_to_recordable_attributes(
            list_of_names=["num_classes", "embedding_size"], is_stat=False
        )

    # ----------------------------------------------------------------- PML plumbing
    def get_default_reducer(self):
        # PML's DivisorReducer, minus its two host syncs per sub-loss (same values)
        return SyncFreeDivisorReducer()

    def get_default_distance(self):
        return CosineSimilarity()

    def get_default_weight_init_func(self):
        # as PML's ProxyAnchorLoss
        return c_f.TorchInitWrapper(torch.nn.init.kaiming_normal_, mode="fan_out")

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple=None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._staged_state = None
        try:
            loss = self._checked_forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
            if self._staged_state is not None:
                _commit_state(self, self._staged_state)
        except BaseException:
            self.on_failed_step()
            raise
        finally:
            self._staged_state = None
        return loss

    def _checked_forward(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_required(labels)
        if ref_emb is not None or ref_labels is not None:
            raise ValueError(f"ref_emb is not supported for {type(self).__name__}")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(
                "labels must be a torch.Tensor of integer class indices, got "
                f"{type(labels).__name__} (convert it with torch.as_tensor(labels))"
            )
        if isinstance(embeddings, torch.Tensor) and labels.device != embeddings.device:
            labels = labels.to(embeddings.device)
        self.validate_inputs(embeddings, labels)
        labels = labels.long()
        self.move_to(embeddings.device)
        dtype = proxy_math.compute_dtype(embeddings.dtype)
        with proxy_math.autocast_disabled(embeddings.device.type):
            return super().forward(embeddings.to(dtype), labels, indices_tuple)

    # ----------------------------------------------------------------- stateful losses
    def stage_state(self, update: dict) -> None:
        """Stage a state update computed during this call; :meth:`commit_state` writes it only
        after the whole forward (loss, regularisers, reducer) succeeded, so a step that raises
        leaves the state untouched."""
        self._staged_state = update

    def commit_state(self, update: dict) -> None:
        """Write a staged state update (stateful losses override this)."""
        raise NotImplementedError(f"{type(self).__name__} staged a state update it cannot commit")

    def on_failed_step(self) -> None:
        """Called when a forward raises, before the error propagates (no state was written)."""

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return self.compute_proxy_loss(embeddings, labels, indices_tuple)

    def compute_proxy_loss(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple
    ) -> dict:
        raise NotImplementedError

    # ----------------------------------------------------------------- state loading
    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        # torch raises for missing or unexpected keys only after it has loaded the rest
        if strict:
            expected, given = set(self.state_dict()), set(state_dict)
            missing, unexpected = sorted(expected - given), sorted(given - expected)
            if missing or unexpected:
                raise ValueError(
                    f"not a state of this {type(self).__name__}: missing keys {missing}, "
                    f"unexpected keys {unexpected} (strict=False loads a partial state)"
                )
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # validate everything before anything is written: a failing load changes nothing
        self.check_state_dict(state_dict, prefix)
        self.before_state_load(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self.after_state_load()

    def check_state_dict(self, state_dict, prefix: str = "") -> None:
        """Raise ``ValueError`` naming the key unless loading ``state_dict`` (keys under
        ``prefix``; missing keys keep their current value) gives a valid state: each of the
        loss's parameters and buffers it holds passes :meth:`check_state_value`. Stateful losses
        extend it with their own invariants."""
        for name, current in self._state_tensors().items():
            key = prefix + name
            if key in state_dict:
                self.check_state_value(name, key, state_dict[key], current)

    def check_state_value(self, name: str, key: str, value, current: torch.Tensor) -> None:
        """Check the loaded ``value`` of the parameter or buffer ``name`` (``current``) before it
        is written (:func:`~pml_proxies.functional.validation.check_state_tensor`)."""
        check_state_tensor(key, value, current)

    def before_state_load(self, state_dict, prefix: str) -> None:
        """Called once the state passed its checks, before torch copies it in."""

    def after_state_load(self) -> None:
        """Called after a successful load (stateful losses refresh what they derive from it)."""

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """The parameters and persistent buffers of this module itself (buffers first)."""
        tensors = {
            name: buffer
            for name, buffer in self._buffers.items()
            if buffer is not None and name not in self._non_persistent_buffers_set
        }
        tensors.update((n, p) for n, p in self._parameters.items() if p is not None)
        return tensors

    # ----------------------------------------------------------------- helpers
    def move_to(self, device: torch.device) -> None:
        """Move parameters and buffers to ``device`` if they are elsewhere (no dtype change)."""
        tensor = next(iter(self.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.buffers()), None)
        if tensor is not None and tensor.device != device:
            self.to(device)

    def validate_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Raise ``ValueError`` naming what is wrong with ``embeddings`` / ``labels``."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
            shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else None
            raise ValueError(
                f"embeddings must be a 2-D tensor (batch, embedding_size), got {shape}"
            )
        if not embeddings.is_floating_point():
            raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
        if embeddings.shape[0] == 0:
            raise ValueError("empty batch: embeddings has 0 rows")
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embedding size mismatch: the loss was built for embedding_size="
                f"{self.embedding_size}, got embeddings of size {embeddings.shape[1]}"
            )
        if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels must be 1-D with one label per embedding: got labels of shape "
                f"{tuple(labels.shape)} for {embeddings.shape[0]} embeddings"
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        if not self.check_inputs:
            return
        bad_labels = (labels < 0) | (labels >= self.num_classes)
        # a NaN or inf anywhere makes its row sum non-finite: checking B sums instead of B * D
        # values is ~10x cheaper; a finite row whose sum overflowed is re-checked below
        row_sums_bad = ~torch.isfinite(embeddings.sum(dim=1))
        flags = torch.stack([bad_labels.any(), row_sums_bad.any()]).tolist()  # one host sync
        if flags[0]:
            raise ValueError(
                f"labels must lie in [0, num_classes={self.num_classes}); got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        if flags[1] and not bool(torch.isfinite(embeddings).all()):
            raise ValueError("embeddings contain NaN or infinite values")

    def proxy_anchor_loss_dict(
        self, pos_term: torch.Tensor, neg_term: torch.Tensor, pos_divisor, neg_divisor
    ) -> dict:
        """PML loss dict of per-class Proxy-Anchor terms (``"pos_loss"``, ``"neg_loss"``), each
        summed and divided by its divisor by PML's ``DivisorReducer``."""
        indices = torch.arange(pos_term.shape[0], device=pos_term.device)
        return {
            "pos_loss": {
                "losses": pos_term,
                "indices": indices,
                "reduction_type": "element",
                "divisor": pos_divisor,
            },
            "neg_loss": {
                "losses": neg_term,
                "indices": indices,
                "reduction_type": "element",
                "divisor": neg_divisor,
            },
        }

    def parameter_in(self, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``param`` in the compute dtype (a differentiable cast; the parameter keeps its dtype)."""
        return param if param.dtype == dtype else param.to(dtype)
