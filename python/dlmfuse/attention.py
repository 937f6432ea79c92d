"""dlmfuse.attention and dlmfuse.merge_attention: label-mask attention (docs/visibility.md, docs/ops.md).

Both are `torch.library.custom_op`s (`torch.ops.dlmfuse.attention`, `...merge_attention`) with
fake implementations for torch.compile; plain eager calls skip the dispatcher (~25 us) and call
the kernel directly.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C, reference
from ._attention_backward import add_exact_row_gradients, attention_backward, rows_beyond_float32, without_rows
from ._attention_backward_parts import backward_in_parts, bias_grad_in_parts
from ._checks import (
    as_signed_int,
    can_read_values,
    expect_float32_finite,
    expect_float_dtype,
    expect_last_dim_contiguous,
    expect_ndim,
    expect_same_device,
    expect_tensor,
    needs_dispatcher,
)
# The CUDA kernel choice lives in _cuda_attention; its public names are part of this module's API.
from ._cuda_attention import (CUDA_ATTENTION_KERNELS, CudaKernelArgs, _run_planned_family, auto_cuda_kernel,  # noqa: F401
                              cuda_attention_kernel, cuda_attention_override, cuda_kernel_args, cuda_kernel_for,
                              cuda_num_splits, cuda_plan_override, last_cuda_plan)
from ._ext import ATTENTION_MAX_HEAD_DIM, CUDA_ATTENTION_HEAD_DIMS, _C_cuda, _cuda_kernel_enabled, dlpack, use_reference
from .mask import Mask
from .reference.attention import merge_weights

_OP = "attention"


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Optional[Mask] = None,
    bias: Optional[Tensor] = None,
    kv_lens: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Attention whose visibility comes from labels: key j is visible to query i iff
    ``k_order[j] < q_order[i] or k_group[j] == q_group[i]`` (see :class:`dlmfuse.Mask`).

    Args:
        q: ``[B, Lq, Hq, D]`` float32 / bfloat16 / float16, last dim contiguous; D from 1 to 256
            (the CUDA kernels take D = 64 and 128; other D run the reference on CUDA).
        k, v: ``[B, Lk, Hkv, D]``, same dtype and device; ``Hq % Hkv == 0`` (GQA / MQA).
        mask: a :class:`dlmfuse.Mask` with q labels of length Lq and k labels of length Lk
            (batch 1 broadcasts). ``None``: bidirectional.
        bias: additive float tensor broadcastable to ``[B, Hq, Lq, Lk]``; broadcast dims are
            read with stride 0, never expanded in memory; ``-inf`` hides a key.
        kv_lens: int ``[B]``: keys at index >= kv_lens[b] are hidden; values in [0, Lk].
        scale: multiplies q.k; default ``1/sqrt(D)``.
        return_lse: also return the natural-log log-sum-exp, float32 ``[B, Hq, Lq]``.

    Returns:
        ``out [B, Lq, Hq, D]`` in q's dtype, or ``(out, lse)``. A row with no visible key gives
        output 0 and lse -inf. Differentiable w.r.t. q, k, v and bias.

    Keys at index >= kv_lens[b] are never read. Keys hidden by labels or a -inf bias are still
    read as whole tiles and enter with weight 0, so they must hold finite values (as with
    FlashAttention); use kv_lens for uninitialised memory past the end. The kernels work in log2
    units (bias x log2 e), so a finite bias below about -2.35e38 (e.g. torch.finfo(float32).min)
    acts as -inf: a row with that bias on every key gives 0 where the float64 reference gives the
    mean of the values (the transformers integration raises such masks to -1e38 for that reason).

    Example (sparse queries: only the masked rows of a sequence, attending to clean keys and
    themselves)::

        >>> import torch, dlmfuse
        >>> B, L, H, D = 1, 8, 2, 64
        >>> is_clean = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1]], dtype=torch.bool)
        >>> rows = (~is_clean).nonzero()[:, 1].view(1, -1)          # [1, 3] masked positions
        >>> mask = dlmfuse.Mask.clean_and_self(is_clean).gather_queries(rows)
        >>> k = v = torch.randn(B, L, H, D)
        >>> q = torch.randn(B, rows.shape[1], H, D)
        >>> dlmfuse.attention(q, k, v, mask=mask).shape
        torch.Size([1, 3, 2, 64])
    """
    return _attention(q, k, v, mask=mask, bias=bias, kv_lens=kv_lens, scale=scale, return_lse=return_lse,
                      check_kv_lens_values=True)


def _attention(q, k, v, *, mask=None, bias=None, kv_lens=None, scale=None, return_lse=False,
               check_kv_lens_values: bool = True):
    """:func:`attention`; ``check_kv_lens_values=False`` is for callers whose ``kv_lens`` are in
    [0, Lk] by construction (``KVCache.attend``): reading the values would be a host sync per call
    on CUDA, one per layer per denoising step. Every other check still runs, and the kernels clamp
    ``kv_lens`` to [0, Lk] anyway, so a bad value cannot read out of bounds."""
    args = _prepare_attention_args(q, k, v, mask, bias, kv_lens, scale, check_kv_lens_values)
    if needs_dispatcher(q, k, v, bias, differentiable=True):
        out, lse = torch.ops.dlmfuse.attention(*args)
    else:
        out, lse = _attention_impl(*args)
    return (out, lse) if return_lse else out


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Exact merge of two partial attentions of the same queries over disjoint key sets.

    ``lse = log(exp(lse_a) + exp(lse_b))``; ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``.
    out_a, out_b: ``[B, L, H, D]`` (same float dtype); lse_a, lse_b: float32 ``[B, H, L]``.
    Rows empty on both sides stay empty (out 0, lse -inf); a NaN lse gives a NaN row.

        >>> import torch, dlmfuse
        >>> q, k, v = torch.randn(1, 4, 2, 64), torch.randn(1, 10, 2, 64), torch.randn(1, 10, 2, 64)
        >>> oa, la = dlmfuse.attention(q, k[:, :6], v[:, :6], return_lse=True)
        >>> ob, lb = dlmfuse.attention(q, k[:, 6:], v[:, 6:], return_lse=True)
        >>> out, lse = dlmfuse.merge_attention(oa, la, ob, lb)
        >>> torch.allclose(out, dlmfuse.attention(q, k, v), atol=1e-5)
        True
    """
    op = "merge_attention"
    for name, t in (("out_a", out_a), ("out_b", out_b), ("lse_a", lse_a), ("lse_b", lse_b)):
        expect_tensor(op, name, t)
        expect_same_device(op, name, t, "out_a", out_a)
    expect_float_dtype(op, "out_a", out_a)
    expect_ndim(op, "out_a", out_a, 4, "[B, L, H, D]")
    if out_b.dtype != out_a.dtype:
        raise TypeError(f"{op}: out_b must have the dtype of out_a ({out_a.dtype}), got {out_b.dtype}")
    if out_b.shape != out_a.shape:
        raise ValueError(f"{op}: out_b must have the shape of out_a {list(out_a.shape)}, got {list(out_b.shape)}")
    B, L, H, _ = out_a.shape
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.dtype != torch.float32:
            raise TypeError(f"{op}: {name} must be float32, got {t.dtype}")
        if tuple(t.shape) != (B, H, L):
            raise ValueError(f"{op}: {name} must have shape {[B, H, L]}, got {list(t.shape)}")
    for name, t in (("out_a", out_a), ("out_b", out_b)):
        expect_last_dim_contiguous(op, name, t)
    if needs_dispatcher(out_a, lse_a, out_b, lse_b, differentiable=True):
        return torch.ops.dlmfuse.merge_attention(out_a, lse_a, out_b, lse_b)
    return _merge_impl(out_a, lse_a, out_b, lse_b)


# ----------------------------------------------------------------------------- validation


def _prepare_attention_args(q, k, v, mask, bias, kv_lens, scale, check_kv_lens_values: bool = True) -> tuple:
    """Checks the public arguments and returns the custom op's positional arguments."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        expect_tensor(_OP, name, t)
        expect_ndim(_OP, name, t, 4, "[B, L, H, D]")
        expect_float_dtype(_OP, name, t)
        expect_same_device(_OP, name, t, "q", q)
        expect_last_dim_contiguous(_OP, name, t)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{_OP}: {name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{_OP}: k must have shape [B={B}, Lk, Hkv, D={D}], got {list(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{_OP}: v must have the shape of k {list(k.shape)}, got {list(v.shape)}")
    if Hq == 0 or Hkv == 0:
        raise ValueError(f"{_OP}: q and k need at least one head, got Hq={Hq} and Hkv={Hkv}")
    if Hq % Hkv != 0:
        raise ValueError(f"{_OP}: query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if not 1 <= D <= ATTENTION_MAX_HEAD_DIM:
        raise ValueError(f"{_OP}: head_dim={D} unsupported (supported: 1 to {ATTENTION_MAX_HEAD_DIM})")

    labels = (None,) * 6
    if mask is not None:
        if not isinstance(mask, Mask):
            raise TypeError(f"{_OP}: mask must be a dlmfuse.Mask or None, got {type(mask).__name__}")
        if mask.q_len != Lq or mask.k_len != Lk:
            raise ValueError(
                f"{_OP}: mask is for {mask.q_len} queries x {mask.k_len} keys but q has Lq={Lq} and "
                f"k has Lk={Lk} (use mask.gather_queries for sparse queries)"
            )
        if mask.batch not in (1, B):
            raise ValueError(f"{_OP}: mask batch must be 1 or B={B}, got {mask.batch}")
        if mask.device != q.device:
            raise TypeError(f"{_OP}: mask is on {mask.device} but q is on {q.device}")
        labels = mask.labels()

    if bias is not None:
        expect_tensor(_OP, "bias", bias)
        expect_float_dtype(_OP, "bias", bias)
        expect_same_device(_OP, "bias", bias, "q", q)
        full = (B, Hq, Lq, Lk)
        try:
            fits = bias.dim() <= 4 and torch.broadcast_shapes(bias.shape, full) == full
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"{_OP}: bias of shape {list(bias.shape)} is not broadcastable to [B, Hq, Lq, Lk] = {list(full)}")
        # 4-D, still broadcast: the op expands it (stride 0) and sums its gradient over the
        # broadcast dims in float32 before rounding it to the bias's dtype once.
        bias = bias[(None,) * (4 - bias.dim())]

    if kv_lens is not None:
        expect_tensor(_OP, "kv_lens", kv_lens)
        if kv_lens.dtype.is_floating_point or kv_lens.dtype.is_complex or kv_lens.dtype == torch.bool:
            raise TypeError(f"{_OP}: kv_lens must be an integer tensor (int32), got {kv_lens.dtype}")
        expect_same_device(_OP, "kv_lens", kv_lens, "q", q)
        if tuple(kv_lens.shape) != (B,):
            raise ValueError(f"{_OP}: kv_lens must have shape [B={B}], got {list(kv_lens.shape)}")
        kv_lens = as_signed_int(kv_lens)
        if check_kv_lens_values and torch.compiler.is_compiling():
            # No values while tracing: the check becomes an op of the graph, run on the real values.
            kv_lens = torch.ops.dlmfuse.check_kv_lens(kv_lens, Lk)
        else:
            if check_kv_lens_values and can_read_values(kv_lens):
                _check_kv_lens_values(kv_lens, Lk)
            kv_lens = kv_lens.to(torch.int32).contiguous()

    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif not isinstance(scale, numbers.Real) or isinstance(scale, bool):  # numpy scalars too
        raise TypeError(f"{_OP}: scale must be a float or None, got {type(scale).__name__}")
    else:
        expect_float32_finite(_OP, "scale", scale)  # the kernels scale in float32
    return (q, k, v, *labels, bias, kv_lens, float(scale))


def _check_kv_lens_values(kv_lens: Tensor, Lk: int) -> None:
    bad = (kv_lens < 0) | (kv_lens > Lk)
    if bool(bad.any()):
        raise ValueError(f"{_OP}: kv_lens values must lie in [0, Lk={Lk}], got {kv_lens.tolist()}")


# ----------------------------------------------------------------------------- implementations


def _attention_impl(q, k, v, q_order, q_group, k_order, k_group, q_doc, k_doc, bias, kv_lens, scale):
    B, Lq, Hq, D = q.shape
    if bias is not None:
        bias = bias.expand(B, Hq, Lq, k.shape[1])  # a view: broadcast dims get stride 0
    family = q.is_cuda and _cuda_kernel_enabled("attention_family")
    # The verified CUDA kernels do not read document labels: packed calls take the reference there.
    on_reference = q.is_cuda and (q.shape[-1] not in CUDA_ATTENTION_HEAD_DIMS or (q_doc is not None and not family))
    if use_reference("attention", q.device) or on_reference:
        mask = None if q_order is None else Mask(q_order, q_group, k_order, k_group, q_doc, k_doc)
        out, lse = reference.attention(
            q, k, v, mask=mask, bias=bias, kv_lens=kv_lens, scale=scale, return_lse=True
        )
        return out.contiguous(), lse.to(torch.float32).contiguous()
    out = torch.empty((B, Lq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    args = dlpack(*(None if t is None else t.detach() for t in (q, k, v, q_order, q_group, k_order, k_group, bias, kv_lens)),
                  out, lse)
    docs = dlpack(*(None if t is None else t.detach() for t in (q_doc, k_doc)))
    if family:
        _run_planned_family(q, args, docs, scale)
    elif q.is_cuda:
        kernel = cuda_kernel_args(cuda_kernel_for(q, k, q_order is not None, bias is not None))
        splits = cuda_num_splits(q, k, kernel, has_bias=bias is not None)
        workspace = {}
        if splits > 1:  # split-KV: each split's partial (out, lse) in float32, merged by the kernel
            partial_out = torch.empty((splits, B, Hq, Lq, D), dtype=torch.float32, device=q.device)
            partial_lse = torch.empty((splits, B, Hq, Lq), dtype=torch.float32, device=q.device)
            workspace = dict(zip(("partial_out", "partial_lse"), dlpack(partial_out, partial_lse)))
        _C_cuda.attention_forward(*args, scale, kernel.tensor_cores,
                                  torch.cuda.current_stream(q.device).cuda_stream, num_splits=splits,
                                  kv_stages=kernel.kv_stages, next_paths=kernel.next_paths,
                                  rows_per_warp=kernel.rows_per_warp, pack_gqa=kernel.pack_gqa, wgmma=kernel.wgmma,
                                  gather_keys=kernel.gather_keys,
                                  **workspace)
    else:
        _C.attention_forward(*args, scale, *docs)
    return out, lse


def _merge_impl(out_a, lse_a, out_b, lse_b):
    if use_reference("merge_attention", out_a.device):
        out, lse = reference.merge_attention(out_a, lse_a, out_b, lse_b)
        return out.contiguous(), lse.to(torch.float32).contiguous()
    out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(lse_a.shape, dtype=torch.float32, device=out_a.device)
    args = dlpack(out_a.detach(), lse_a.detach(), out_b.detach(), lse_b.detach(), out, lse)
    if out_a.is_cuda:
        _C_cuda.merge_attention(*args, torch.cuda.current_stream(out_a.device).cuda_stream)
    else:
        _C.merge_attention(*args)
    return out, lse


# ----------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("dlmfuse::attention", mutates_args=())
def _attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_order: Optional[Tensor],
    q_group: Optional[Tensor],
    k_order: Optional[Tensor],
    k_group: Optional[Tensor],
    q_doc: Optional[Tensor],
    k_doc: Optional[Tensor],
    bias: Optional[Tensor],
    kv_lens: Optional[Tensor],
    scale: float,
) -> Tuple[Tensor, Tensor]:
    return _attention_impl(q, k, v, q_order, q_group, k_order, k_group, q_doc, k_doc, bias, kv_lens, scale)


@torch.library.custom_op("dlmfuse::check_kv_lens", mutates_args=())
def _check_kv_lens_op(kv_lens: Tensor, k_len: int) -> Tensor:
    """kv_lens as contiguous int32 after the [0, Lk] value check, for compiled graphs: tracing has
    no values, so the check runs here, on the real tensor (skipped during CUDA-graph capture)."""
    if can_read_values(kv_lens):
        _check_kv_lens_values(kv_lens, k_len)
    return kv_lens.to(torch.int32, copy=True).contiguous()


@_check_kv_lens_op.register_fake
def _(kv_lens, k_len):
    return kv_lens.new_empty(kv_lens.shape, dtype=torch.int32)


@_attention_op.register_fake
def _(q, k, v, q_order, q_group, k_order, k_group, q_doc, k_doc, bias, kv_lens, scale):
    B, Lq, Hq, D = q.shape
    return q.new_empty((B, Lq, Hq, D)), q.new_empty((B, Hq, Lq), dtype=torch.float32)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, q_order, q_group, k_order, k_group, q_doc, k_doc, bias, kv_lens, scale = inputs
    out, lse = output
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, q_order, q_group, k_order, k_group, q_doc, k_doc, bias, kv_lens, out, lse)


def _attention_backward(ctx, grad_out, grad_lse):
    try:
        q, k, v, q_order, q_group, k_order, k_group, q_doc, k_doc, bias, kv_lens, out, lse = ctx.saved_tensors
    except RuntimeError as e:
        if "modified by an inplace operation" not in str(e):
            raise
        # Most often a KV cache: attention read it, then kv_scatter_ / KVCache.write overwrote it.
        raise RuntimeError(
            f"{_OP} backward: a tensor this attention read (q, k, v, the labels, bias or kv_lens) was written "
            "in place after the forward, e.g. a KV cache overwritten by dlmfuse.kv_scatter_ or KVCache.write; "
            "the gradient would use the new values. Run the backward before the write, or pass a clone of the "
            f"cache to attention. PyTorch's report: {e}") from None
    needs_bias_grad = bias is not None and ctx.needs_input_grad[9]
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    dq, dk, dv, dbias = torch.ops.dlmfuse.attention_backward(
        grad_out, grad_lse, q, k, v, q_order, q_group, k_order, k_group, q_doc, k_doc, bias, kv_lens, out, lse,
        ctx.scale, needs_bias_grad)
    return dq, dk, dv, None, None, None, None, None, None, dbias if needs_bias_grad else None, None, None


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


@torch.library.custom_op("dlmfuse::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: Tensor, grad_lse: Tensor, q: Tensor, k: Tensor, v: Tensor, q_order: Optional[Tensor],
    q_group: Optional[Tensor], k_order: Optional[Tensor], k_group: Optional[Tensor], q_doc: Optional[Tensor],
    k_doc: Optional[Tensor], bias: Optional[Tensor], kv_lens: Optional[Tensor], out: Tensor, lse: Tensor,
    scale: float, needs_bias_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, v and (when needs_bias_grad; else an empty tensor) of the bias, in its
    own (broadcast) shape: summed in float32 over the dims it is broadcast along, rounded once."""
    args = (grad_out, grad_lse, q, k, v, (q_order, q_group, k_order, k_group, q_doc, k_doc), bias, kv_lens, out, lse,
            scale)
    if needs_bias_grad and bias_grad_in_parts(q, k):  # dS in parts of bounded size
        dq, dk, dv, dbias = backward_in_parts(_backward_float32, *args)
    else:
        dq, dk, dv, dbias = _backward_float32(*args, needs_bias_grad)
    # In the inputs' layouts and dtypes (what the fake implementation promises); copied only where not.
    dq, dk, dv = (grad if grad.dtype == like.dtype and grad.stride() == like.stride()
                  else torch.empty_like(like).copy_(grad) for like, grad in ((q, dq), (k, dk), (v, dv)))
    return dq, dk, dv, dbias.to(bias.dtype).contiguous() if dbias is not None else q.new_empty(0)


def _backward_float32(grad_out, grad_lse, q, k, v, labels, bias, kv_lens, out, lse, scale, needs_bias_grad):
    """The backward of one call (or of a part of one, _attention_backward_parts): float32 dq
    [B, Lq, Hq, D], dk, dv [B, Lk, Hkv, D] and dbias in the bias's shape (or None)."""
    full_bias = None if bias is None else bias.expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    # Rows whose scores may leave float32 go through float64 instead (not while capturing a CUDA
    # graph, where the test cannot read values).
    exact = rows_beyond_float32(q, k, lse, scale, kv_lens) if can_read_values(lse) else None
    if exact is not None and not exact.any():
        exact = None
    fused_q, fused_out, fused_grad_out, fused_grad_lse, fused_lse = (
        (q, out, grad_out, grad_lse, lse) if exact is None else without_rows(exact, q, out, grad_out, grad_lse, lse))
    fused = (q.device.type == "cpu" and not use_reference("attention", q.device)) or _cuda_backward_runs(q, k, v)
    # else the PyTorch composite (fp32 and other head dims on CUDA; the fused CUDA backward while unverified)
    backward = _native_backward if fused else attention_backward
    grads = backward(fused_grad_out, fused_grad_lse, fused_q, k, v, labels, full_bias, kv_lens, fused_out, fused_lse,
                     scale, needs_bias_grad)
    if exact is not None:
        add_exact_row_gradients(exact, grads, grad_out, grad_lse, q, k, v, labels, full_bias, kv_lens, scale)
    dq, dk, dv, dbias = grads
    if dbias is not None:
        broadcast = [d for d in range(4) if bias.shape[d] == 1 and dbias.shape[d] != 1]
        dbias = dbias.sum(broadcast, keepdim=True) if broadcast else dbias
    return dq, dk, dv, dbias


@_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, q_order, q_group, k_order, k_group, q_doc, k_doc, bias, kv_lens, out, lse, scale,
      needs_bias_grad):
    dbias = bias.new_empty(bias.shape) if needs_bias_grad else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _cuda_backward_runs(q, k, v) -> bool:
    """Whether the fused CUDA backward takes this call: enabled (DLMFUSE_CUDA_KERNELS=1 while it is
    unverified), bf16 / fp16 at head_dim 64 / 128, rows on 16-byte boundaries (cp.async)."""
    most = _C.ATTENTION_MAX_GRID_DIM  # the heads and batch axes of the kernels' grids
    return (q.is_cuda and _cuda_kernel_enabled("attention_backward") and not use_reference("attention", q.device)
            and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] in CUDA_ATTENTION_HEAD_DIMS
            and q.shape[0] <= most and q.shape[2] <= most and _rows_16_byte_aligned(q, k, v))


def _rows_16_byte_aligned(*tensors) -> bool:
    """Rows of [B, L, H, D] tensors start on 16-byte boundaries (strides of 8 16-bit elements): cp.async."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1])
               for t in tensors)


def _native_backward(grad_out, grad_lse, q, k, v, labels, bias, kv_lens, out, lse, scale, needs_bias_grad):
    """The fused backward (C++ on CPU, tensor cores on CUDA): float32 gradients, returned in the
    inputs' dtypes and layouts by the caller (as the composite's)."""
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    f32, device = torch.float32, q.device
    delta = ((grad_out.to(f32) * out.to(f32)).sum(-1).transpose(1, 2) - grad_lse.to(f32)).contiguous()
    grad_out = grad_out.to(q.dtype)
    if grad_out.stride(-1) != 1 or (q.is_cuda and not _rows_16_byte_aligned(grad_out)):
        # A fresh copy: .contiguous() returns a contiguous view as it is, whatever its offset
        grad_out = grad_out.clone(memory_format=torch.contiguous_format)
    dq = torch.zeros((B, Hq, Lq, D), dtype=f32, device=device)
    dk, dv = (torch.zeros((B, Lk, Hkv, D), dtype=f32, device=device) for _ in range(2))
    dbias = torch.zeros((B, Hq, Lq, Lk), dtype=f32, device=device) if needs_bias_grad else None
    q_order, q_group, k_order, k_group, q_doc, k_doc = labels
    args = (*dlpack(*(None if t is None else t.detach() for t in (
        q, k, v, q_order, q_group, k_order, k_group, bias, kv_lens, out, lse))), scale,
        *dlpack(q_doc, k_doc, grad_out.detach(), delta, dq, dk, dv, dbias))
    if q.is_cuda:
        _C_cuda.attention_backward(*args, torch.cuda.current_stream(device).cuda_stream)
    else:
        _C.attention_backward(*args)
    return dq.transpose(1, 2), dk, dv, dbias


@torch.library.custom_op("dlmfuse::merge_attention", mutates_args=())
def _merge_attention_op(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    return _merge_impl(out_a, lse_a, out_b, lse_b)


@_merge_attention_op.register_fake
def _(out_a, lse_a, out_b, lse_b):
    return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape, dtype=torch.float32)


def _merge_setup_context(ctx, inputs, output):
    out_a, lse_a, out_b, lse_b = inputs
    out, lse = output
    ctx.save_for_backward(out_a, lse_a, out_b, lse_b, out, lse)


def _merge_backward(ctx, grad_out, grad_lse):
    # With w_a the weight of partial a: d out_a = w_a g_out, and
    # d lse_a = w_a (g_lse + sum_d g_out (out_a - out)); the same for b. A side of weight 0 gets 0
    # (its output may hold inf or NaN, which the forward ignored as well).
    out_a, lse_a, out_b, lse_b, out, lse = ctx.saved_tensors
    # In the forward's precision (the kernels' float32, the reference's float64): a weight that
    # underflowed to 0 there is 0 here too.
    ft = torch.float64 if use_reference("merge_attention", out.device) else torch.float32
    g_out = torch.zeros_like(out, dtype=ft) if grad_out is None else grad_out.to(ft)
    g_lse = torch.zeros_like(lse, dtype=ft) if grad_lse is None else grad_lse.to(ft)
    grads = []
    for part_out, weight in zip((out_a, out_b), merge_weights(lse_a.to(ft), lse_b.to(ft))):  # [B, H, L]
        weight_rows = weight.transpose(1, 2)[..., None]  # [B, L, H, 1]
        along_d = (g_out * (part_out.to(ft) - out.to(ft))).sum(-1).transpose(1, 2)  # [B, H, L]
        d_lse = torch.where(weight == 0, torch.zeros_like(weight), weight * (g_lse + along_d))
        grads += [(weight_rows * g_out).to(part_out.dtype), d_lse.to(lse_a.dtype)]
    return grads[0], grads[1], grads[2], grads[3]


_merge_attention_op.register_autograd(_merge_backward, setup_context=_merge_setup_context)
