"""The attention backward in parts, where the bias gradient would be large.

Every backward (the fused kernels and the composite) writes dS for each (batch, head, row, key) in
float32 before the sum over the bias's broadcast dimensions: [B, Hq, Lq, Lk] floats, 4.3 GB for
B = 8, Hq = 32, L = 2048, whatever the bias's own shape. `backward_in_parts` runs the backward on
parts of the call (batches, KV-head groups with their query heads, then query rows) whose dS fits
BIAS_GRAD_PART_BYTES, and adds the parts up in float32: dQ per part, dK and dV summed over row
parts, dbias summed into the bias's shape. Every part is an ordinary call of the backward, so the
fused kernels, the composite and the float64 rows all apply unchanged.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

# Most bytes of float32 dS one part of the backward may write (~256 MB).
BIAS_GRAD_PART_BYTES = 1 << 28


def bias_grad_in_parts(q: Tensor, k: Tensor) -> bool:
    """Whether the float32 dS of a bias gradient of this call exceeds BIAS_GRAD_PART_BYTES."""
    B, Lq, Hq, _ = q.shape
    return 4 * B * Hq * Lq * k.shape[1] > BIAS_GRAD_PART_BYTES


def _part_sizes(B: int, Lq: int, Lk: int, Hq: int, Hkv: int, budget: int) -> tuple:
    """(batches, KV-head groups, query rows) per part: whole groups of whole rows while one fits,
    then as many rows of one group as fit (at least one row)."""
    row_bytes = 4 * (Hq // Hkv) * Lk  # dS of one query row of one group
    group_bytes = row_bytes * Lq
    if group_bytes <= budget:
        groups = min(Hkv, budget // group_bytes)
        batches = max(1, budget // (Hkv * group_bytes)) if groups == Hkv else 1
        return batches, groups, Lq
    return 1, 1, max(1, budget // row_bytes)


def _batch(t: Optional[Tensor], batches: slice) -> Optional[Tensor]:
    """Labels, kv_lens: the part's batches (a batch-1 tensor broadcasts as it is)."""
    return t if t is None or t.shape[0] == 1 else t[batches]


def backward_in_parts(part: Callable, grad_out: Tensor, grad_lse: Tensor, q: Tensor, k: Tensor, v: Tensor,
                      labels: Sequence[Optional[Tensor]], bias: Tensor, kv_lens: Optional[Tensor], out: Tensor,
                      lse: Tensor, scale: float) -> tuple:
    """(dq [B, Lq, Hq, D], dk, dv [B, Lk, Hkv, D], dbias in bias's shape), all float32, from
    ``part(grad_out, grad_lse, q, k, v, labels, bias, kv_lens, out, lse, scale, True)`` (the same
    arguments for a part of the call, returning the same float32 gradients) on parts whose dS takes
    at most BIAS_GRAD_PART_BYTES (one query row at least)."""
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    step_b, step_g, step_r = _part_sizes(B, Lq, Lk, Hq, Hkv, BIAS_GRAD_PART_BYTES)
    f32 = torch.float32
    dq = torch.empty((B, Lq, Hq, D), dtype=f32, device=q.device)
    dk, dv = (torch.zeros((B, Lk, Hkv, D), dtype=f32, device=q.device) for _ in range(2))
    dbias = torch.zeros(bias.shape, dtype=f32, device=bias.device)
    q_order, q_group, k_order, k_group, q_doc, k_doc = labels
    for b0 in range(0, B, step_b):
        bs = slice(b0, b0 + step_b)
        k_labels = [_batch(t, bs) for t in (k_order, k_group, k_doc)]
        for g0 in range(0, Hkv, step_g):
            gs, hs = slice(g0, g0 + step_g), slice(g0 * group, (g0 + step_g) * group)
            for r0 in range(0, Lq, step_r):
                rs = slice(r0, r0 + step_r)
                q_labels = [None if t is None else _batch(t, bs)[:, rs] for t in (q_order, q_group, q_doc)]
                part_labels = (q_labels[0], q_labels[1], k_labels[0], k_labels[1], q_labels[2], k_labels[2])
                # The bias along the dims it is not broadcast on; its gradient part adds up there.
                at = tuple(s if bias.shape[d] > 1 else slice(None) for d, s in enumerate((bs, hs, rs)))
                # (lse goes to the kernels, which read it as a contiguous [B, Hq, Lq])
                grads = part(grad_out[bs, rs, hs], grad_lse[bs, hs, rs], q[bs, rs, hs], k[bs, :, gs], v[bs, :, gs],
                             part_labels, bias[at], _batch(kv_lens, bs), out[bs, rs, hs], lse[bs, hs, rs].contiguous(),
                             scale, True)
                dq[bs, rs, hs] = grads[0]
                dk[bs, :, gs] += grads[1]
                dv[bs, :, gs] += grads[2]
                dbias[at] += grads[3]
    return dq, dk, dv, dbias
