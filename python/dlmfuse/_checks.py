"""Argument checks shared by the public ops: TypeError for dtype/device/kind, ValueError for
shapes and values; every message names the op, the argument, the expectation and the value."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def expect_tensor(op: str, name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def expect_positive_int(op: str, name: str, value) -> int:
    """ValueError unless ``value`` is a Python int > 0 (bools rejected); returns it."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    return value


FLOAT32_MAX = 3.4028234663852886e38


def expect_float32_finite(op: str, name: str, value) -> float:
    """ValueError unless the real ``value`` is finite as a float32 (|value| <= 3.4e38); returns it
    as a float (ints of any size included: 2**1100 is refused, not an OverflowError)."""
    try:
        as_float = float(value)
    except OverflowError:
        as_float = math.inf
    if not abs(as_float) <= FLOAT32_MAX:
        raise ValueError(f"{op}: {name} must be finite in float32 (|{name}| <= 3.4e38), got {value}")
    return as_float


_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)  # (uint8 has every kernel torch has)
INT64_MAX = 2**63 - 1


def as_signed_int(t: torch.Tensor) -> torch.Tensor:
    """An integer tensor with its values as int64 where torch has few kernels for its dtype
    (uint16/32/64); uint64 values beyond int64 saturate at 2**63 - 1. Other dtypes unchanged."""
    if t.dtype not in _UNSIGNED:
        return t
    if t.dtype != torch.uint64:
        return t.to(torch.int64)
    wide = t.view(torch.int64)  # values >= 2**63 read negative
    return torch.where(wide < 0, torch.full_like(wide, INT64_MAX), wide)


def expect_float_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def expect_ndim(op: str, name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dims {layout}, got shape {list(t.shape)}")


def expect_same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise TypeError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def expect_last_dim_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{op}: {name} must have a contiguous last dimension (stride 1), got strides "
            f"{t.stride()} for shape {list(t.shape)}; call .contiguous() first"
        )


def is_capturing_cuda_graph(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def can_read_values(t: torch.Tensor) -> bool:
    """Value checks need a host read: skipped while compiling, capturing or on fake tensors."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor or t.device.type == "meta":
        return False
    return not is_capturing_cuda_graph(t)


def _dispatch_mode_active() -> bool:
    # make_fx, FlopCounterMode, FakeTensorMode...: they must see the ops, so no fast path.
    stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return stack_len is not None and stack_len() > 0


def needs_dispatcher(*tensors, differentiable: bool = False) -> bool:
    """True when an op must go through torch.ops (its custom op) rather than call the kernel
    directly: while compiling, under a dispatch mode, for tensor subclasses (fake, functional),
    and for autograd when the op is differentiable and an input requires grad. Plain eager calls
    skip the dispatcher and its ~25 us."""
    if torch.compiler.is_compiling() or _dispatch_mode_active():
        return True
    present = [t for t in tensors if isinstance(t, torch.Tensor)]
    if any(type(t) is not torch.Tensor for t in present):
        return True
    return differentiable and torch.is_grad_enabled() and any(t.requires_grad for t in present)
