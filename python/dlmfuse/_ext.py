"""Loads the compiled extensions and says what they contain.

`_C` (CPU kernels) is always built. `_C_cuda` exists when the package was built with nvcc; it
links the CUDA runtime statically, so importing it never needs a GPU or driver. Nothing here
touches a GPU at import time.
"""

from __future__ import annotations

import os
import re
import warnings

import torch
from torch.utils.dlpack import to_dlpack as _to_dlpack

from . import _C

try:
    from . import _C_cuda
except ImportError:  # built without nvcc
    _C_cuda = None

__version__: str = _C.__version__

#: Largest head_dim of the CPU attention (any head_dim from 1 up to it; exported by the extension).
ATTENTION_MAX_HEAD_DIM: int = int(_C.ATTENTION_MAX_HEAD_DIM)
#: Head dims of the CUDA attention kernels (others run the reference on CUDA).
CUDA_ATTENTION_HEAD_DIMS: tuple = tuple(_C_cuda.ATTENTION_HEAD_DIMS) if _C_cuda is not None else ()
#: Key order label meaning "after every query": never visible by order (padding, BD3-LM x_t keys).
ORDER_INFINITY: int = int(_C.ORDER_INFINITY)


def dlpack(*tensors):
    """DLPack capsules of ``tensors`` (None stays None) for the extension's arguments.

    nanobind imports a bare tensor through ``Tensor.__dlpack__``, which on CUDA builds stream
    objects for the DLPack stream handshake: several microseconds per tensor, and a kv_scatter_ or
    attention call passes 5-13 tensors. Our kernels run on the stream they are given, so the
    handshake is not needed; ``to_dlpack`` makes the same capsule in ~0.3 us.
    """
    return tuple(None if t is None else _to_dlpack(t) for t in tensors)


# Which ops have a native kernel per device (verified by the test suite on that device); the
# others run dlmfuse.reference there.
_NATIVE_KERNELS = {
    # CUDA: verified on an H200 (2026-11-26, scripts/gpu_check.sh; bench/results/h200-2026-11-26.md;
    # merge_attention on 2026-11-27, bench/results/h200-2026-11-27.md)
    "attention": {"cpu", "cuda"},
    "merge_attention": {"cpu", "cuda"},
    "kv_scatter_": {"cpu", "cuda"},
    "sample_tokens": {"cpu", "cuda"},  # float64 logits and extreme temperatures use the reference
}
# CUDA kernels compiled into _C_cuda that have not yet passed the CUDA tests on a GPU: used only
# with DLMFUSE_CUDA_KERNELS=1 (scripts/gpu_check.sh sets it in their own steps). Once a device run
# has verified one, its entry goes and it becomes the default of its op.
# attention_family: the planned CUDA attention (csrc/cuda/attention/family, planner in
# csrc/plan/attention_planner.cpp) with document labels on every plan; it replaces the attention
# kernels above once a device run has verified it. attention_backward: the fused CUDA backward
# (csrc/cuda/attention/attention_bwd.cu) in place of the PyTorch composite.
_UNVERIFIED_CUDA_KERNELS: set[str] = {"attention_family", "attention_backward"}

_BACKEND_ENV = "DLMFUSE_BACKEND"
_THREADS_ENV = "DLMFUSE_NUM_THREADS"


def _warn_if_bad_thread_count() -> None:
    """The C++ pool ignores a DLMFUSE_NUM_THREADS that is not a positive integer and clamps one
    above the hardware thread count: say so once."""
    value = os.environ.get(_THREADS_ENV)
    if value is None:
        return
    if not (re.fullmatch(r"\s*\+?[0-9]+\s*", value) and int(value) >= 1):  # what the C++ pool accepts
        warnings.warn(f"{_THREADS_ENV}={value!r} is not a positive integer; ignored (dlmfuse uses one thread "
                      f"per CPU this process may run on)", RuntimeWarning, stacklevel=3)
    elif int(value) > _C.max_threads():
        warnings.warn(f"{_THREADS_ENV}={value.strip()} exceeds the hardware thread count; clamped to "
                      f"{_C.max_threads()}", RuntimeWarning, stacklevel=3)


_warn_if_bad_thread_count()


def num_threads() -> int:
    """Threads the CPU kernels use: set_num_threads, else ``DLMFUSE_NUM_THREADS``, else the CPUs
    this process may run on; never more than the hardware thread count."""
    return _C.num_threads()


def set_num_threads(n: int) -> int:
    """Sets the threads of the CPU kernels for the next calls and returns the count in effect.

    ``n`` must be a positive int; a count above the hardware thread count is clamped to it with a
    RuntimeWarning. Threads start when a call first needs them; a thread the OS refuses to start
    leaves the pool smaller (one message on stderr), never hung.

    >>> import dlmfuse
    >>> dlmfuse.set_num_threads(1)
    1
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    if n > _C.max_threads():
        warnings.warn(f"set_num_threads({n}) clamped to {_C.max_threads()}, the hardware thread count",
                      RuntimeWarning, stacklevel=2)
        n = _C.max_threads()
    return _C.set_num_threads(n)
_UNVERIFIED_ENV = "DLMFUSE_CUDA_KERNELS"


def _cuda_kernel_enabled(op: str) -> bool:
    return (_C_cuda is not None and op in _UNVERIFIED_CUDA_KERNELS
            and os.environ.get(_UNVERIFIED_ENV, "") == "1")


def use_reference(op: str, device: torch.device) -> bool:
    """True when `op` on `device` runs the pure-PyTorch reference instead of a native kernel.

    DLMFUSE_BACKEND=reference forces the reference everywhere (for debugging and A/B checks);
    unset, empty or "native" leaves the choice to the build; anything else is a ValueError (a
    misspelt override must not silently run the kernels it meant to bypass).
    """
    backend = os.environ.get(_BACKEND_ENV, "")
    if backend == "reference":
        return True
    if backend not in ("", "native"):
        raise ValueError(f"{_BACKEND_ENV} must be 'reference', 'native' or unset, got {backend!r}")
    if device.type == "cuda":
        if _C_cuda is None:  # a build without nvcc
            return True
        if _cuda_kernel_enabled(op):
            return False
    return device.type not in _NATIVE_KERNELS[op]


def build_info() -> dict:
    """What this build of dlmfuse contains.

    >>> import dlmfuse
    >>> info = dlmfuse.build_info()
    >>> sorted(k for k in ("version", "cuda", "cuda_archs") if k in info)
    ['cuda', 'cuda_archs', 'version']
    """
    cuda = _C_cuda is not None
    return {
        "version": __version__,
        "cuda": cuda,
        "cuda_archs": _C_cuda.CUDA_ARCHS.split(",") if cuda else [],
        "cuda_runtime": _C_cuda.runtime_version() if cuda else None,
        "cpu_isa": _C.cpu_isa(),
        "compiled_cpu_isas": _C.COMPILED_CPU_ISAS.split(","),
        "num_threads": _C.num_threads(),
        "attention_max_head_dim": ATTENTION_MAX_HEAD_DIM,
        "attention_tile_dims": list(_C.ATTENTION_TILE_DIMS),
        "cuda_attention_head_dims": list(CUDA_ATTENTION_HEAD_DIMS),
        "backend_override": os.environ.get(_BACKEND_ENV) or None,
        # op -> device -> "native" (a compiled kernel runs) or "reference" (pure PyTorch, correct
        # but slow), as dispatch decides now
        "kernels": {
            op: {dev: "reference" if use_reference(op, torch.device(dev)) else "native" for dev in ("cpu", "cuda")}
            for op in _NATIVE_KERNELS
        },
        # CUDA kernels compiled in but not yet verified on a GPU, and whether they are enabled
        "unverified_cuda_kernels": sorted(_UNVERIFIED_CUDA_KERNELS) if cuda else [],
        "unverified_cuda_kernels_enabled": os.environ.get(_UNVERIFIED_ENV, "") == "1",
        # DLMFUSE_CUDA_ATTENTION as set: a kernel name (verified kernels) or the planned family's
        # key=value override, with the error it gives if it is not valid for the path that reads it
        "cuda_attention_override": _attention_override_report(),
    }


def _attention_override_report() -> dict | None:
    text = os.environ.get("DLMFUSE_CUDA_ATTENTION")
    if text is None:
        return None
    from ._cuda_attention import cuda_attention_kernel, cuda_attention_override  # (it imports this module)

    family = _cuda_kernel_enabled("attention_family")
    report = {"text": text, "read_by": "planned family" if family else "verified kernels", "error": None}
    try:
        if family:
            cuda_attention_override()
        else:
            cuda_attention_kernel()
    except ValueError as e:
        report["error"] = str(e)
    return report
