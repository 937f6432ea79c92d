"""Backward of dlmfuse.attention in PyTorch, recomputing probabilities from the saved lse.

    P = exp(S - lse),  dP = dO V^T,  dS = P * (dP - rowsum(dO * O) + dlse),
    dQ = scale dS K,  dK = scale dS^T Q,  dV = P^T dO,  dbias = dS.

`attention_backward` is the fp32 composite: query rows in chunks so the [B, Hq, chunk, Lk]
intermediates stay bounded; it runs on devices without a fused backward (CUDA today, and
DLMFUSE_BACKEND=reference); the CPU has the C++ kernel (csrc/cpu/attention_backward_tiles.cpp).

`rows_beyond_float32` and `add_exact_row_gradients` serve every backward: a row whose scores may
leave float32 (the forward recomputes those in float64) breaks the float32 recomputation of P
(inf - inf = NaN, or P = 0 everywhere when every score fell to -inf). Such rows are taken out of the
float32 backward and their gradients computed in float64 from the definition.
"""

from __future__ import annotations

import warnings

import torch

# Upper bound on the elements of one [B, Hq, chunk, Lk] fp32 intermediate (~256 MB).
_CHUNK_ELEMENTS = 1 << 26
# Upper bound on the elements of one [group, rows, Lk] float64 intermediate of the exact rows (~32 MB).
_EXACT_CHUNK_ELEMENTS = 1 << 22
# A row is recomputed in float64 when a partial sum of its q.k (times scale, and log2 e where the
# kernels fold it in) may reach this, or its lse does: float32 scores there are 2 apart, so P
# recomputed from them is noise (and beyond 2^128 inf - inf = NaN). Below it the float32 backward
# is as precise as the float32 forward it differentiates (which loses its fractional digits from
# about 2^23 too: scores that large are outside what either computes well in float32).
_SCORE_BOUND = 2.0 ** 24


def _keys_read(kv_lens: torch.Tensor, k_len: int) -> torch.Tensor:
    """bool [B, Lk]: key j of batch b lies below kv_lens[b]; the keys past it are never read (they
    may hold garbage, even NaN: an unwritten cache)."""
    return torch.arange(k_len, device=kv_lens.device) < kv_lens[:, None]


def _visible_chunk(labels, kv_lens, rows: slice, k_len: int, device) -> torch.Tensor | None:
    """bool [B or 1, 1, chunk or 1, Lk] visibility of the query rows `rows` (1 row: the same for
    all, kv_lens alone), or None (all visible)."""
    q_order, q_group, k_order, k_group, q_doc, k_doc = labels
    visible = None
    if q_order is not None:
        qo, qg = q_order[:, rows, None], q_group[:, rows, None]
        visible = (k_order[:, None, :] < qo) | (k_group[:, None, :] == qg)
    if q_doc is not None:
        same_doc = k_doc[:, None, :] == q_doc[:, rows, None]
        visible = same_doc if visible is None else visible & same_doc
    if kv_lens is not None:
        in_range = _keys_read(kv_lens, k_len)[:, None, :]
        visible = in_range if visible is None else visible & in_range
    return None if visible is None else visible[:, None]


def attention_backward(grad_out, grad_lse, q, k, v, labels, bias, kv_lens, out, lse, scale, needs_bias_grad):
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    f32 = torch.float32
    qf = q.to(f32).transpose(1, 2)  # [B, Hq, Lq, D]
    # [B, Hkv, Lk, D]: the query heads of a group are stacked as rows against their KV head (below),
    # so K, V and their gradients are never copied per query head.
    kf, vf = k.to(f32).transpose(1, 2), v.to(f32).transpose(1, 2)
    if kv_lens is not None:
        in_range = _keys_read(kv_lens, Lk)[:, None, :, None]  # [B, 1, Lk, 1]
        kf, vf = (torch.where(in_range, t, torch.zeros((), dtype=f32, device=q.device)) for t in (kf, vf))
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
    zero = torch.zeros((), dtype=f32, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * Hq * Lk))
    for start in range(0, Lq, chunk):
        rows = slice(start, min(Lq, start + chunk))
        c = rows.stop - rows.start

        def grouped(t):  # [B, Hq, c, X] -> [B, Hkv, group * c, X]: query head g of a group in rows g*c ..
            return t.reshape(B, Hkv, group * c, t.shape[-1])

        qc, doc = grouped(qf[:, :, rows]), grouped(do[:, :, rows])
        s = torch.matmul(qc, kf.transpose(-1, -2)) * scale  # [B, Hkv, group * c, Lk]
        if bias is not None:
            s = s + grouped(bias[:, :, rows].to(f32))
        p = torch.exp(s - grouped(safe_lse[:, :, rows, None]))
        keep = grouped(finite_lse[:, :, rows, None])
        visible = _visible_chunk(labels, kv_lens, rows, Lk, q.device)  # [B or 1, 1, c or 1, Lk]
        if visible is not None:
            keep = keep & (visible.repeat(1, 1, group, 1) if visible.shape[2] > 1 else visible)
        p = torch.where(keep, p, zero)
        dp = torch.matmul(doc, vf.transpose(-1, -2))
        ds = p * (dp - grouped(delta[:, :, rows, None]))
        dq[:, :, rows] = (torch.matmul(ds, kf) * scale).view(B, Hq, c, D)
        dk += torch.matmul(ds.transpose(-1, -2), qc) * scale
        dv += torch.matmul(p.transpose(-1, -2), doc)
        if dbias is not None:
            dbias[:, :, rows] = ds.view(B, Hq, c, Lk)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), dbias


def _finite_abs_max(t: torch.Tensor, dims, unread=None) -> torch.Tensor:
    """float64 max of |t| over dims, ignoring inf and NaN (they propagate alike in float32 and 64)
    and the elements where the bool `unread` (broadcast to t) is set."""
    magnitude = t.abs() if unread is None else t.abs().masked_fill(unread, 0)
    most = magnitude.amax(dims)
    if not torch.isfinite(most).all():  # rare: only then the slower masked pass
        most = torch.where(torch.isfinite(magnitude), magnitude, 0).amax(dims)
    return most.double()


def rows_beyond_float32(q, k, lse, scale, kv_lens=None) -> torch.Tensor:
    """bool [B, Lq]: query positions of which some head's scores are beyond float32's precision: a
    bound on its q.k partial sums (D max|q_i| max|k| over the keys below kv_lens, scale and log2 e)
    or its lse reaches _SCORE_BOUND (+inf included; -inf is a row without keys, whose gradient is 0
    in any precision)."""
    B, Lq, Hq, D = q.shape
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros((B, Lq), dtype=torch.bool, device=q.device)
    q_max = _finite_abs_max(q, -1)  # [B, Lq, Hq]
    unread = None if kv_lens is None else ~_keys_read(kv_lens, k.shape[1])[:, :, None, None]
    k_max = _finite_abs_max(k, (1, 3), unread).repeat_interleave(Hq // k.shape[2], 1)  # [B, Hq]
    dot_bound = q_max * k_max[:, None, :] * (abs(scale) * D * 1.4426950408889634)
    big_lse = (lse == float("inf")) | (torch.isfinite(lse) & (lse.abs() >= _SCORE_BOUND))  # [B, Hq, Lq]
    return (dot_bound >= _SCORE_BOUND).any(-1) | big_lse.any(1)


def without_rows(rows: torch.Tensor, q, out, grad_out, grad_lse, lse):
    """Copies in which the positions `rows` (bool [B, Lq]) are rows without keys for the float32
    backward (q, O, dO and dlse 0, lse -inf): they add nothing to any gradient there."""
    at = rows[:, :, None, None]
    zero = [t.masked_fill(at, 0) for t in (q, out, grad_out)]
    return (*zero, grad_lse.masked_fill(rows[:, None], 0), lse.masked_fill(rows[:, None], float("-inf")))


def add_exact_row_gradients(rows, grads, grad_out, grad_lse, q, k, v, labels, bias, kv_lens, scale):
    """Writes dQ (and dbias) of the positions `rows` (bool [B, Lq]) into grads = (dq [B, Lq, Hq, D],
    dk, dv [B, Lk, Hkv, D], dbias [B, Hq, Lq, Lk] or None), all float32, and adds their dK and dV,
    computed in float64 from the definition (softmax of the float64 scores; no saved lse or output)."""
    dq, dk, dv, dbias = grads
    # A row with dO = 0 and dlse = 0 (a padded query, say) has zero gradients: without_rows gave them.
    rows = rows & ((grad_out != 0).flatten(2).any(-1) | (grad_lse != 0).any(1))
    if rows.any():
        warnings.warn(f"attention backward: {int(rows.sum())} query rows have scores beyond float32's precision "
                      "(|q.k| or |lse| >= 2^24, e.g. diverging activations): their gradients are computed in "
                      "float64, far slower than the kernels", RuntimeWarning)
    Hq, Hkv = q.shape[2], k.shape[2]
    group = Hq // Hkv
    f64 = torch.float64
    for b in rows.any(1).nonzero().flatten().tolist():
        k_len = k.shape[1] if kv_lens is None else int(kv_lens[b])  # keys past kv_lens are never read
        if k_len == 0:
            continue  # no key: zero gradients, which the float32 backward gave these rows
        keys = slice(0, k_len)
        q_order, q_group, k_order, k_group, q_doc, k_doc = (
            None if t is None else t[b:b + 1] if t.shape[0] > 1 else t for t in labels)  # labels may broadcast over B
        batch_labels = (q_order, q_group, *(None if t is None else t[:, keys] for t in (k_order, k_group)), q_doc,
                        None if k_doc is None else k_doc[:, keys])
        chunk = max(1, _EXACT_CHUNK_ELEMENTS // max(1, group * k_len))
        for idx in rows[b].nonzero().flatten().split(chunk):
            visible = _visible_chunk(batch_labels, None, idx, k_len, q.device)  # [1, 1, n, Lk] or None
            for kv_head in range(Hkv):  # one KV head in float64 at a time: memory O(Lk D), not O(Hq Lk D)
                heads = slice(kv_head * group, (kv_head + 1) * group)
                kb, vb = (t[b, keys, kv_head].to(f64) for t in (k, v))  # [Lk, D]
                qb = q[b, idx, heads].to(f64).transpose(0, 1)  # [group, n, D]
                s = torch.matmul(qb, kb.T) * scale  # [group, n, Lk]
                if bias is not None:
                    s = s + bias[b, heads][:, idx, keys].to(f64)
                if visible is not None:
                    s = s.masked_fill(~visible[0], float("-inf"))
                # softmax, not exp(s - lse): at |s| >= 2^53 float64 absorbs log(sum) into lse as well.
                no_score = torch.isneginf(s.amax(-1, keepdim=True))
                p = torch.where(no_score, 0.0, torch.softmax(s, -1))  # a row with no finite score: P = 0
                do = grad_out[b, idx, heads].to(f64).transpose(0, 1)
                dp = torch.matmul(do, vb.T)
                # rowsum(P dP), not rowsum(dO O): equal, but this one cancels exactly against a dominant key.
                delta = (p * dp).sum(-1) - grad_lse[b, heads][:, idx].to(f64)
                ds = p * (dp - delta[..., None])
                dq[b, idx, heads] = (torch.matmul(ds, kb) * scale).transpose(0, 1).to(dq.dtype)
                dk[b, keys, kv_head] += (torch.matmul(ds.transpose(-1, -2), qb) * scale).sum(0).to(dk.dtype)
                dv[b, keys, kv_head] += torch.matmul(p.transpose(-1, -2), do).sum(0).to(dv.dtype)
                if dbias is not None:
                    dbias[b, heads][:, idx, keys] = ds.to(dbias.dtype)
