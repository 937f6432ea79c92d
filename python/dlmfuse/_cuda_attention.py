"""How CUDA attention calls choose their kernel: the verified kernels by name (DLMFUSE_CUDA_ATTENTION,
auto_cuda_kernel, the split-KV count) and the planned family, whose C++ planner decides everything
and whose DLMFUSE_CUDA_ATTENTION is key=value overrides. dlmfuse.attention re-exports the public
names; the verified kernels' part goes once a GPU run has verified the family.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _C
from ._ext import _C_cuda, dlpack

_OP = "attention"
_SPLITS_ENV = "DLMFUSE_ATTENTION_SPLITS"  # forces the CUDA split-KV count (see cuda_num_splits)
_KERNEL_ENV = "DLMFUSE_CUDA_ATTENTION"
_last_cuda_plan: Optional[str] = None


def _run_planned_family(q, args, docs, scale):
    """The planned CUDA attention family (opt-in while unverified: DLMFUSE_CUDA_KERNELS=1). The C++
    planner decides everything; this allocates the split-KV workspace when the plan asks for it."""
    global _last_cuda_plan
    if os.environ.get(_SPLITS_ENV):
        raise ValueError(f"{_OP}: {_SPLITS_ENV} sets the split count of the verified kernels; the planned family "
                         f"(DLMFUSE_CUDA_KERNELS=1) takes it as DLMFUSE_CUDA_ATTENTION='splits=N'")
    _last_cuda_plan = None
    B, Lq, Hq, D = q.shape
    kept = []  # the workspace lives until the launch is queued (the caching allocator is stream-ordered)

    def workspace(splits):
        partial_out = torch.empty((splits, B, Hq, Lq, D), dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((splits, B, Hq, Lq), dtype=torch.float32, device=q.device)
        kept.extend((partial_out, partial_lse))
        return dlpack(partial_out, partial_lse)

    q_, k_, v_, q_order, q_group, k_order, k_group, bias, kv_lens, out, lse = args
    plan = _C_cuda.attention_forward_planned(
        q_, k_, v_, q_order, q_group, k_order, k_group, *docs, bias, kv_lens, out, lse, scale,
        torch.cuda.current_stream(q.device).cuda_stream, cuda_attention_override(), workspace)
    _last_cuda_plan = plan


@functools.lru_cache(maxsize=16)
def _checked_override(text: str) -> str:
    _C.parse_attention_override(text)  # ValueError naming the bad item
    return text


def cuda_attention_override() -> str:
    """DLMFUSE_CUDA_ATTENTION as the planned family reads it: ``key=value`` items that force the
    planner's choices (``mma`` simt / sm80 / sm90, ``tile_m`` 64 / 128, ``walk`` tiles / gather,
    ``splits`` 1-16, ``pack_gqa`` 0 / 1), for debugging and tests; unset, empty or ``auto`` forces
    nothing. Parsed once per value; a bad value is a ValueError naming the item.

    >>> from dlmfuse.attention import cuda_attention_override
    >>> cuda_attention_override() in ("", "auto") or "DLMFUSE_CUDA_ATTENTION is set"
    True
    """
    text = os.environ.get(_KERNEL_ENV, "")
    if text in _CUDA_KERNEL_ARGS:
        raise ValueError(f"{_OP}: {_KERNEL_ENV}={text!r} names a kernel of the verified set, but the planned family "
                         f"(DLMFUSE_CUDA_KERNELS=1) takes key=value overrides such as 'tile_m=64,walk=gather,splits=3'")
    return _checked_override(text)


@contextlib.contextmanager
def cuda_plan_override(text: str):
    """Within the block the planned CUDA family runs under ``DLMFUSE_CUDA_ATTENTION=text`` (see
    cuda_attention_override; validated on entry), and the previous value is restored after it.

    >>> from dlmfuse.attention import cuda_plan_override, cuda_attention_override
    >>> with cuda_plan_override("tile_m=128,splits=2"):
    ...     cuda_attention_override()
    'tile_m=128,splits=2'
    """
    _checked_override(text)
    previous = os.environ.get(_KERNEL_ENV)
    os.environ[_KERNEL_ENV] = text
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_KERNEL_ENV, None)
        else:
            os.environ[_KERNEL_ENV] = previous


def last_cuda_plan() -> Optional[str]:
    """The plan of the last CUDA attention call the planned family ran in this process (for bench rows
    and debugging), e.g. ``"mma=sm80,tile_m=128,walk=tiles,splits=1,pack_gqa=0"``; None before any."""
    return _last_cuda_plan


class CudaKernelArgs(NamedTuple):
    """What the CUDA attention binding is told to run (see CUDA_ATTENTION_KERNELS)."""

    tensor_cores: bool  # False: the CUDA-core kernel
    kv_stages: int  # K/V buffers of the tensor-core kernel
    next_paths: bool  # the kNext paths of attention_sm80_kernel.cuh (bias tiles by cp.async, GQA packing, ...)
    rows_per_warp: int  # 16, or 32 (128-row CTAs)
    pack_gqa: bool  # GQA heads packed into CTA rows where it saves CTAs (next paths, 16 rows per warp, no bias)
    wgmma: bool = False  # warpgroup MMAs on sm_90 GPUs (next paths; elsewhere the next paths run)
    gather_keys: bool = False  # PARTIAL tiles' keys gathered per key (next paths, 16 rows per warp; labels, no bias)


# Every kernel passed the CUDA tests and compute-sanitizer on an H200 (2026-11-27, commit 4e12845; simple
# has read document labels since, for the planned family's mma=simt plans: not yet re-run;
# bench/results/h200-2026-11-27.md). simple: the CUDA-core kernel; single_buffer / double_buffer:
# the first tensor-core kernel with one / two K/V buffers (double_buffer was the default until
# auto chose per call); next: bias tiles loaded by cp.async, GQA heads packed into CTAs when few
# query rows make that need fewer CTAs, heaviest query tiles first under labels; wide: next with
# 32 query rows per warp (128 per CTA, FlashAttention-2's shape; no GQA packing); sm90: next with
# warpgroup MMAs (wgmma) on H100 / H200 (the next paths elsewhere); gather / sm90_gather: next /
# sm90 with the keys of PARTIAL tiles classified one by one and gathered into FULL and PARTIAL
# tiles (calls with labels and no bias; mask-only steps then read only the keys their rows see).
_CUDA_KERNEL_ARGS = {
    "simple": CudaKernelArgs(False, 2, False, 16, False),
    "single_buffer": CudaKernelArgs(True, 1, False, 16, False),
    "double_buffer": CudaKernelArgs(True, 2, False, 16, False),
    "next": CudaKernelArgs(True, 2, True, 16, True),
    "wide": CudaKernelArgs(True, 2, True, 32, False),
    "sm90": CudaKernelArgs(True, 2, True, 16, True, wgmma=True),
    "gather": CudaKernelArgs(True, 2, True, 16, True, gather_keys=True),
    "sm90_gather": CudaKernelArgs(True, 2, True, 16, True, wgmma=True, gather_keys=True),
}
CUDA_ATTENTION_KERNELS = ("auto", *_CUDA_KERNEL_ARGS)


def cuda_attention_kernel() -> str:
    """The CUDA attention kernel DLMFUSE_CUDA_ATTENTION asks for (default ``"auto"``)."""
    kernel = os.environ.get(_KERNEL_ENV, "") or "auto"
    if kernel not in CUDA_ATTENTION_KERNELS:
        raise ValueError(f"{_OP}: {_KERNEL_ENV} must be one of {list(CUDA_ATTENTION_KERNELS)}, got {kernel!r}")
    return kernel


def auto_cuda_kernel(q_len: int, k_len: int, has_labels: bool, has_bias: bool, sm90: bool) -> str:
    """auto's kernel for a call with ``q_len`` query rows per sequence and ``k_len`` keys, from the
    same-run H200 benchmarks of every kernel (bench/results/h200-2026-11-27.md); ``sm90``: the GPU
    is an H100 / H200 (compute capability 9.0).

    - bias: the next paths load bias tiles with cp.async where double_buffer loads them element by
      element (A3: sm90 434 us, next 472 us, double_buffer 1213 us).
    - labels with at most half as many queries as keys (mask-only steps: every tile PARTIAL):
      gathering keys reads only the visible ones (A4 n=32: gather 110 us, double_buffer 141 us;
      n=128 / 512: sm90_gather 180 / 652 us against 259 / 999 us). At 32 rows or fewer the
      mma.sync kernel wins (half of a wgmma's 64 rows would be padding).
    - On sm_90: few rows (<= 64) -> next (GQA packing; a 128-row CTA would be mostly padding;
      A4g n=32: 87 us against 168 us), otherwise wide (A1 L=2048: 306 us against 327 us; A2:
      206 us against 244 us).
    - Elsewhere (A100: sm_80 code, never run on an A100) the remaining calls keep double_buffer:
      wide's 6-15% H200 gain is unproven there, where its sm_80 build spills 104 bytes a thread.
    """
    if has_bias:
        return "sm90" if sm90 else "next"
    if has_labels and 2 * q_len <= k_len:
        return "sm90_gather" if sm90 and q_len > 32 else "gather"
    if not sm90:
        return "double_buffer"
    return "next" if q_len <= 64 else "wide"


@functools.lru_cache(maxsize=None)
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def cuda_kernel_for(q: Tensor, k: Tensor, has_labels: bool, has_bias: bool) -> str:
    """The kernel a CUDA call with q ``[B, Lq, Hq, D]`` and k ``[B, Lk, Hkv, D]`` runs:
    DLMFUSE_CUDA_ATTENTION's, or auto_cuda_kernel's pick for ``auto`` (never ``"auto"``)."""
    kernel = cuda_attention_kernel()
    if kernel != "auto":
        return kernel
    sm90 = q.is_cuda and _is_sm90(q.device.index)
    return auto_cuda_kernel(q.shape[1], k.shape[1], has_labels, has_bias, sm90)


def cuda_kernel_args(kernel: Optional[str] = None) -> CudaKernelArgs:
    """The binding's arguments for ``kernel`` (default: DLMFUSE_CUDA_ATTENTION's, which must not be
    ``auto``: auto depends on the call, see cuda_kernel_for)."""
    kernel = kernel or cuda_attention_kernel()
    if kernel == "auto":
        raise ValueError(f"{_OP}: the auto kernel depends on the call; resolve it with cuda_kernel_for(q, k, ...)")
    return _CUDA_KERNEL_ARGS[kernel]


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def cuda_num_splits(q: Tensor, k: Tensor, kernel: Optional[CudaKernelArgs] = None, has_bias: bool = False) -> int:
    """Split-KV count the CUDA attention uses for q ``[B, Lq, Hq, D]`` and k ``[B, Lk, Hkv, D]``:
    the extension's heuristic (shapes and the SM count only, no host sync), or
    ``DLMFUSE_ATTENTION_SPLITS=N`` (tests, tuning); 1 where the tensor-core kernel does not run.
    ``kernel``: the call's kernel (cuda_kernel_args(cuda_kernel_for(...))); None: the one a call
    without labels would run; ``has_bias``: the call has a bias (no GQA packing then)."""
    kernel = kernel or cuda_kernel_args(cuda_kernel_for(q, k, False, has_bias))
    if q.dtype not in (torch.bfloat16, torch.float16) or not kernel.tensor_cores:
        return 1
    B, Lq, Hq, D = q.shape
    override = os.environ.get(_SPLITS_ENV, "")
    if override:
        most = _C.ATTENTION_MAX_SPLITS
        if not override.isdigit() or not 1 <= int(override) <= most:
            raise ValueError(f"{_OP}: {_SPLITS_ENV} must be an integer in [1, {most}], got {override!r}")
        return int(override)
    return _C.attention_num_splits(B, Hq, Lq, k.shape[1], D, _sm_count(q.device.index),
                                   rows_per_cta=4 * kernel.rows_per_warp,
                                   kv_heads=k.shape[2] if kernel.pack_gqa and not has_bias else 0)
