"""Backward of dlmfuse.attention in PyTorch (fp32), recomputing probabilities from the saved lse.

    P = exp(S - lse),  dP = dO V^T,  dS = P * (dP - rowsum(dO * O) + dlse),
    dQ = scale dS K,  dK = scale dS^T Q,  dV = P^T dO,  dbias = dS.

Query rows are processed in chunks so the [B, Hq, chunk, Lk] intermediates stay bounded; this
runs on devices without a fused backward (CUDA today, and DLMFUSE_BACKEND=reference); the CPU has
the C++ kernel (csrc/cpu/attention_backward_tiles.cpp).
"""

from __future__ import annotations

import torch

# Upper bound on the elements of one [B, Hq, chunk, Lk] fp32 intermediate (~256 MB).
_CHUNK_ELEMENTS = 1 << 26


def _visible_chunk(labels, kv_lens, rows: slice, k_len: int, device) -> torch.Tensor | None:
    """bool [B or 1, 1, chunk, Lk] visibility of the query rows `rows`, or None (all visible)."""
    q_order, q_group, k_order, k_group, q_doc, k_doc = labels
    visible = None
    if q_order is not None:
        qo, qg = q_order[:, rows, None], q_group[:, rows, None]
        visible = (k_order[:, None, :] < qo) | (k_group[:, None, :] == qg)
    if q_doc is not None:
        same_doc = k_doc[:, None, :] == q_doc[:, rows, None]
        visible = same_doc if visible is None else visible & same_doc
    if kv_lens is not None:
        in_range = torch.arange(k_len, device=device)[None, None, :] < kv_lens[:, None, None]
        visible = in_range if visible is None else visible & in_range
    return None if visible is None else visible[:, None]


def attention_backward(grad_out, grad_lse, q, k, v, labels, bias, kv_lens, out, lse, scale, needs_bias_grad):
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    f32 = torch.float32
    qf = q.to(f32).transpose(1, 2)  # [B, Hq, Lq, D]
    kf = k.to(f32).transpose(1, 2).repeat_interleave(group, dim=1)  # [B, Hq, Lk, D]
    vf = v.to(f32).transpose(1, 2).repeat_interleave(group, dim=1)
    do = grad_out.to(f32).transpose(1, 2)  # [B, Hq, Lq, D]
    delta = (do * out.to(f32).transpose(1, 2)).sum(-1)  # [B, Hq, Lq]
    if grad_lse is not None:
        delta = delta - grad_lse.to(f32)
    finite_lse = torch.isfinite(lse)
    safe_lse = torch.where(finite_lse, lse, torch.zeros_like(lse))

    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    dbias = torch.empty((B, Hq, Lq, Lk), dtype=f32, device=q.device) if needs_bias_grad else None
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * Hq * Lk))
    for start in range(0, Lq, chunk):
        rows = slice(start, min(Lq, start + chunk))
        s = torch.matmul(qf[:, :, rows], kf.transpose(-1, -2)) * scale  # [B, Hq, c, Lk]
        if bias is not None:
            s = s + bias[:, :, rows].to(f32)
        p = torch.exp(s - safe_lse[:, :, rows, None])
        keep = finite_lse[:, :, rows, None]
        visible = _visible_chunk(labels, kv_lens, rows, Lk, q.device)
        if visible is not None:
            keep = keep & visible
        p = torch.where(keep, p, torch.zeros((), dtype=f32, device=q.device))
        dp = torch.matmul(do[:, :, rows], vf.transpose(-1, -2))
        ds = p * (dp - delta[:, :, rows, None])
        dq[:, :, rows] = torch.matmul(ds, kf) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qf[:, :, rows]) * scale
        dv += torch.matmul(p.transpose(-1, -2), do[:, :, rows])
        if dbias is not None:
            dbias[:, :, rows] = ds

    def to_input_layout(grad, like, heads):
        grad = grad.view(B, heads, group, -1, D).sum(2) if heads != Hq else grad
        return grad.transpose(1, 2).to(like.dtype)

    return (
        to_input_layout(dq, q, Hq),
        to_input_layout(dk, k, Hkv),
        to_input_layout(dv, v, Hkv),
        None if dbias is None else dbias.to(bias.dtype),
    )
