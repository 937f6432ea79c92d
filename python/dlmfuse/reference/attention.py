"""Pure-PyTorch ground truth for label-mask attention (docs/visibility.md, docs/ops.md).

Written from the contract alone, independently of the kernels: the visibility rule is evaluated on
a dense [B, Lq, Lk] matrix and softmax is computed in ``compute_dtype`` (float64 by default). Only
minimal input checks: this is the oracle, not the public op.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

import torch

if TYPE_CHECKING:  # type hints only: the reference never needs the mask module at run time
    from ..mask import Mask

__all__ = ["attention", "merge_attention", "visibility"]

NEG_INF = float("-inf")


def visibility(
    mask: Optional["Mask"],
    batch: int,
    q_len: int,
    k_len: int,
    kv_lens: Union[torch.Tensor, Sequence[int], None] = None,
    device: Union[torch.device, str, None] = None,
) -> torch.Tensor:
    """Dense visibility, bool ``[batch, q_len, k_len]`` (True = query i may read key j).

    Key j is visible to query i iff ``k_order[j] < q_order[i] or k_group[j] == q_group[i]``
    (``mask=None``: every key), and additionally ``q_doc[i] == k_doc[j]`` when the mask has
    document labels and ``j < kv_lens[b]`` when ``kv_lens`` is given.
    ``device`` defaults to the mask's device, else that of ``kv_lens``, else CPU.
    """
    if device is None:
        if mask is not None:
            device = mask.q_order.device
        elif isinstance(kv_lens, torch.Tensor):
            device = kv_lens.device
        else:
            device = "cpu"
    if mask is None:
        visible = torch.ones(1, q_len, k_len, dtype=torch.bool, device=device)
    else:
        if mask.q_order.shape[-1] != q_len or mask.k_order.shape[-1] != k_len:
            raise ValueError(
                f"visibility: mask has q_len={mask.q_order.shape[-1]}, k_len={mask.k_order.shape[-1]}"
                f", expected q_len={q_len}, k_len={k_len}"
            )
        q_order, q_group = mask.q_order.to(device), mask.q_group.to(device)  # [Bq, Lq]
        k_order, k_group = mask.k_order.to(device), mask.k_group.to(device)  # [Bk, Lk]
        earlier = k_order[:, None, :] < q_order[:, :, None]
        same_group = k_group[:, None, :] == q_group[:, :, None]
        visible = earlier | same_group  # [1 or B, Lq, Lk]
        if mask.q_doc is not None:  # packed sequences: and the same document
            visible = visible & (mask.k_doc.to(device)[:, None, :] == mask.q_doc.to(device)[:, :, None])
        if visible.shape[0] not in (1, batch):
            raise ValueError(f"visibility: mask batch {visible.shape[0]} is neither 1 nor {batch}")
    if kv_lens is not None:
        lens = torch.as_tensor(kv_lens, device=device).reshape(-1)
        if lens.shape[0] != batch:
            raise ValueError(f"visibility: kv_lens must have shape [{batch}], got {list(lens.shape)}")
        in_range = torch.arange(k_len, device=device)[None, :] < lens[:, None]  # [B, Lk]
        visible = visible & in_range[:, None, :]
    return visible.expand(batch, q_len, k_len).contiguous()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: Optional["Mask"] = None,
    bias: Optional[torch.Tensor] = None,
    kv_lens: Union[torch.Tensor, Sequence[int], None] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float64,
    out_dtype: Optional[torch.dtype] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Reference label-mask attention.

    Shapes: q ``[B, Lq, Hq, D]``; k, v ``[B, Lk, Hkv, D]`` with ``Hq % Hkv == 0`` (query head h reads
    kv head ``h // (Hq // Hkv)``); bias additive, broadcastable to ``[B, Hq, Lq, Lk]`` (-inf allowed);
    kv_lens ``[B]`` hides keys ``j >= kv_lens[b]``. Everything is computed in ``compute_dtype``.

    Returns out ``[B, Lq, Hq, D]`` (dtype ``out_dtype`` or q's) and, with ``return_lse``, the
    natural-log log-sum-exp ``[B, Hq, Lq]`` (float32, or ``out_dtype`` when given). A row with no
    visible key (or only -inf scores) gives out 0 and lse -inf, never NaN.

    Example:
        >>> q = k = v = torch.randn(1, 4, 2, 64)
        >>> attention(q, k, v).shape
        torch.Size([1, 4, 2, 64])
    """
    batch, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    if q_heads % kv_heads != 0:
        raise ValueError(f"attention: Hq={q_heads} is not a multiple of Hkv={kv_heads}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    heads_per_kv = q_heads // kv_heads

    q_c = q.to(compute_dtype).transpose(1, 2)  # [B, Hq, Lq, D]
    k_c = k.to(compute_dtype).transpose(1, 2).repeat_interleave(heads_per_kv, dim=1)  # [B, Hq, Lk, D]
    v_c = v.to(compute_dtype).transpose(1, 2).repeat_interleave(heads_per_kv, dim=1)  # [B, Hq, Lk, D]

    if kv_lens is not None:  # keys past kv_lens are never read (they may hold garbage, even NaN)
        lens = torch.as_tensor(kv_lens, device=k.device).reshape(-1, 1)
        in_range = (torch.arange(k_len, device=k.device)[None, :] < lens)[:, None, :, None]  # [B, 1, Lk, 1]
        zero = torch.zeros((), dtype=compute_dtype, device=k.device)
        k_c, v_c = torch.where(in_range, k_c, zero), torch.where(in_range, v_c, zero)

    scores = torch.matmul(q_c, k_c.transpose(-1, -2)) * scale  # [B, Hq, Lq, Lk]
    if bias is not None:
        scores = scores + bias.to(compute_dtype)
    visible = visibility(mask, batch, q_len, k_len, kv_lens, device=q.device)  # [B, Lq, Lk]
    scores = scores.masked_fill(~visible[:, None], NEG_INF)

    if k_len > 0:
        row_max = scores.amax(dim=-1, keepdim=True)  # [B, Hq, Lq, 1]
    else:
        row_max = scores.new_full((*scores.shape[:-1], 1), NEG_INF)
    # Empty rows have max -inf; shifting by 0 instead keeps every exp() at exactly 0 (no inf - inf).
    row_max = torch.where(row_max == NEG_INF, torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)  # 0 for empty rows
    nonempty = denom > 0
    # Divide and take the log only where denom > 0, so gradients stay finite for empty rows too.
    safe_denom = torch.where(nonempty, denom, torch.ones_like(denom))
    out = torch.matmul(weights, v_c) / safe_denom
    lse = torch.where(nonempty, row_max + torch.log(safe_denom), NEG_INF).squeeze(-1)

    out = out.transpose(1, 2).to(out_dtype if out_dtype is not None else q.dtype)
    if not return_lse:
        return out
    return out, lse.to(out_dtype if out_dtype is not None else torch.float32)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint key sets (computed in float64).

    ``out_*`` ``[B, L, H, D]``, ``lse_*`` ``[B, H, L]``. Returns ``(out, lse)`` in out_a's dtype and
    float32; where both lse are -inf the result is out 0, lse -inf; a NaN lse gives a NaN row; an
    lse of +inf (a partial whose scores overflowed float32) outweighs a finite one, and two of them
    weigh 1/2 each.

    Example:
        >>> q, k = torch.randn(1, 3, 2, 64), torch.randn(1, 5, 2, 64)
        >>> a = attention(q, k[:, :2], k[:, :2], return_lse=True)
        >>> b = attention(q, k[:, 2:], k[:, 2:], return_lse=True)
        >>> out, lse = merge_attention(*a, *b)
        >>> torch.allclose(out, attention(q, k, k), atol=1e-6)
        True
    """
    lse_a64, lse_b64 = lse_a.to(torch.float64), lse_b.to(torch.float64)
    weight_a, weight_b = merge_weights(lse_a64, lse_b64)  # [B, H, L]

    def weighted(out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        w = weight.transpose(1, 2)[..., None]  # [B, L, H, 1]
        # A zero weight contributes exactly 0, even if that partial output holds inf or NaN; a NaN
        # weight (a NaN lse) gives NaN, as in the kernels (dlmfuse/online_softmax.h merge_weights).
        keep = (w > 0) | torch.isnan(w)
        return torch.where(keep, w * out.to(torch.float64), torch.zeros((), dtype=torch.float64))

    out = weighted(out_a, weight_a) + weighted(out_b, weight_b)
    # logaddexp keeps the rules: -inf beside -inf, +inf beside anything but NaN, NaN with a NaN.
    return out.to(out_a.dtype), torch.logaddexp(lse_a64, lse_b64).to(torch.float32)


def merge_weights(lse_a: torch.Tensor, lse_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The weights ``exp(lse_x - lse)`` of two partials in a merge, in the lse's dtype (the
    backward of dlmfuse.merge_attention takes them too). Both -inf: 0 and 0 (an empty row); an lse
    of +inf (a partial whose scores overflowed float32) outweighs any finite one, and two such sides
    weigh 1/2 each (their true lse cannot be told apart); a NaN lse: NaN."""
    top = torch.maximum(lse_a, lse_b)  # NaN propagates
    top = torch.where(top == NEG_INF, torch.zeros_like(top), top)  # both empty: weights stay 0
    overflow = torch.isposinf(top)
    weights = [torch.where(overflow, torch.isposinf(part).to(top.dtype), torch.exp(part - top)) for part in (lse_a, lse_b)]
    total = weights[0] + weights[1]
    total = torch.where(total > 0, total, torch.ones_like(total))  # NaN stays NaN
    return weights[0] / total, weights[1] / total
