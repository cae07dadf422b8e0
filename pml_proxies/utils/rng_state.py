"""Saving and restoring a ``torch.Generator``'s state as a tensor (a loss's ``rng_state``
buffer): check a loaded state, resume it on a device, or derive a seed from it when it was
saved on another device type."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

#: size in bytes of a CUDA (Philox) generator state: seed and offset, 8 bytes each
CUDA_STATE_BYTES = 16


def seed_from_state(state: torch.Tensor) -> int:
    """A deterministic 63-bit seed from a generator state."""
    digest = hashlib.blake2b(state.cpu().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _cpu_state_bytes() -> int:
    return torch.Generator().get_state().numel()


def check_generator_state(state: Any, name: str = "rng_state") -> torch.Tensor:
    """``state`` if it is a saved generator state, else ``ValueError`` saying why.

    Accepted: a 1-D ``uint8`` tensor holding a valid CPU generator state (checked by restoring it)
    or a CUDA (Philox) state of :data:`CUDA_STATE_BYTES` bytes.
    """
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.ndim != 1:
        shape = tuple(state.shape) if isinstance(state, torch.Tensor) else None
        dtype = state.dtype if isinstance(state, torch.Tensor) else type(state).__name__
        raise ValueError(
            f"{name} must be a 1-D uint8 generator state, got {dtype} of shape {shape}"
        )
    size, cpu_size = state.numel(), _cpu_state_bytes()
    if size == cpu_size:
        try:
            torch.Generator().set_state(state.detach().cpu())
        except RuntimeError as e:
            raise ValueError(f"{name} is not a valid CPU generator state ({e})") from None
    elif size != CUDA_STATE_BYTES:
        raise ValueError(
            f"{name} has {size} bytes: a CPU generator state has {cpu_size} and a CUDA one "
            f"{CUDA_STATE_BYTES} (corrupted or not a generator state)"
        )
    return state


def generator_from_state(state: torch.Tensor, device: torch.device) -> torch.Generator:
    """A generator on ``device`` that resumes ``state`` exactly when it was saved on the same
    device type; a state of another device type (CPU <-> CUDA), which torch cannot restore there,
    seeds it deterministically instead. Raises ``ValueError`` for an invalid state."""
    check_generator_state(state)
    generator = torch.Generator(device=device)
    if state.numel() == generator.get_state().numel():
        try:
            generator.set_state(state)
        except RuntimeError as e:
            raise ValueError(
                f"rng_state is not a valid {device.type} generator state ({e})"
            ) from None
    else:
        generator.manual_seed(seed_from_state(state))
    return generator
