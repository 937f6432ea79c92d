"""Argument checks of dlmfuse.mask: label tensors to int32 (range-checked where the dtype needs it),
the constructors' integer arguments, and the batch and document-id helpers the Mask methods share.
Errors name the argument and the value received, as the Mask messages do."""

from __future__ import annotations

import operator
from typing import Optional, Union

import torch

INT32_MAX = 2**31 - 1
"""Largest int32 label: an order no query can exceed (keys with it are only seen through the group)."""
INT32_MIN = -(2**31)

DeviceLike = Union[torch.device, str, int, None]

# Integer dtypes whose every value fits int32: converting them needs no range check (and no sync).
_ALWAYS_FIT_INT32 = {torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32}
# Integer dtypes accepted after a range check.
_NEED_RANGE_CHECK = {torch.int64, torch.uint32, torch.uint64}


def _to_int32_labels(name: str, value: object) -> torch.Tensor:
    """Validate one label argument and return it as a 2-D int32 tensor.

    An int32 2-D tensor is returned as is (no copy); a 1-D tensor becomes a ``[1, L]`` view.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"Mask: {name} must be a torch.Tensor, got {type(value).__name__}")
    dtype = value.dtype
    if dtype not in _ALWAYS_FIT_INT32 and dtype not in _NEED_RANGE_CHECK:
        raise TypeError(f"Mask: {name} must have an integer dtype (int32 preferred), got {dtype}")
    if value.dim() not in (1, 2):
        raise ValueError(f"Mask: {name} must have shape [L] or [B, L], got {list(value.shape)}")
    if dtype in _NEED_RANGE_CHECK:
        _check_int32_range(name, value)
    if dtype != torch.int32:
        value = value.to(torch.int32)
    return value.unsqueeze(0) if value.dim() == 1 else value


def _check_int32_range(name: str, value: torch.Tensor) -> None:
    """Raise ValueError if some value of an int64/uint32/uint64 tensor does not fit int32."""
    if value.numel() == 0:
        return
    if value.dtype == torch.uint64:
        # uint64 has few kernels; reinterpret its bits: values >= 2**63 become negative here.
        wide = value.view(torch.int64)
    else:
        wide = value.to(torch.int64)
    outside = (wide < INT32_MIN) | (wide > INT32_MAX)
    if bool(outside.any()):
        bad = int(wide[outside][0])
        if value.dtype == torch.uint64 and bad < 0:
            bad += 2**64
        raise ValueError(
            f"Mask: {name} has value {bad} outside the int32 range [{INT32_MIN}, {INT32_MAX}]"
        )


def _as_int(value: object) -> Optional[int]:
    """``value`` as a Python int if it is an integer (not a bool; numpy / 0-d tensor ints count)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _positive_int(name: str, value: object) -> int:
    """Return ``value`` as a Python int, or raise ValueError unless it is a positive integer."""
    as_int = _as_int(value)
    if as_int is None or as_int <= 0:
        raise ValueError(f"Mask: {name} must be a positive int, got {value!r}")
    return as_int


def _seq_len(value: object, name: str = "seq_len") -> int:
    """A positive length whose positions fit the int32 labels (at most INT32_MAX)."""
    as_int = _positive_int(name, value)
    if as_int > INT32_MAX:
        raise ValueError(f"Mask: {name} must be at most {INT32_MAX} (labels are int32 positions), got {as_int}")
    return as_int


def _block_size(value: object, seq_len: int) -> int:
    """A positive block size; one larger than the sequence means a single block."""
    return min(_positive_int("block_size", value), seq_len)


def _prefix_len(prefix_len: object, seq_len: int) -> int:
    """Return prefix_len as a Python int, or raise ValueError unless it lies in [0, seq_len]."""
    as_int = _as_int(prefix_len)
    if as_int is None or not 0 <= as_int <= seq_len:
        raise ValueError(f"Mask: prefix_len must be an int in [0, seq_len={seq_len}], got {prefix_len!r}")
    return as_int


def _default_device(device: DeviceLike) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _common_batch(sizes: dict) -> Optional[int]:
    """The batch every size in ``sizes`` (name -> batch) broadcasts to, or None if they conflict."""
    batch = max(sizes.values())
    if all(size in (1, batch) for size in sizes.values()):
        return batch
    return None


def _combined_documents(q_old, q_new, k_old, k_new):
    """Document ids of the pairs (old, new): equal exactly when both ids are equal (dense ranks of
    the pairs over queries and keys together; reads nothing on the host)."""
    batch = max(t.shape[0] for t in (q_old, q_new, k_old, k_new))
    q_pairs = torch.stack([q_old.expand(batch, -1), q_new.expand(batch, -1)], -1).to(torch.int64)
    k_pairs = torch.stack([k_old.expand(batch, -1), k_new.expand(batch, -1)], -1).to(torch.int64)
    keys = ((torch.cat([q_pairs, k_pairs], 1)[..., 0] << 32) + (torch.cat([q_pairs, k_pairs], 1)[..., 1] & 0xFFFFFFFF))
    ranks = torch.unique(keys, return_inverse=True)[1].to(torch.int32)
    return ranks[:, :q_old.shape[1]], ranks[:, q_old.shape[1]:]


def _check_bool(name: str, value: object) -> torch.Tensor:
    """Validate a bool ``[L]`` / ``[B, L]`` argument and return it 2-D."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"Mask: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.bool:
        raise TypeError(f"Mask: {name} must have dtype torch.bool, got {value.dtype}")
    if value.dim() not in (1, 2):
        raise ValueError(f"Mask: {name} must have shape [L] or [B, L], got {list(value.shape)}")
    return value.unsqueeze(0) if value.dim() == 1 else value
