"""Pure-PyTorch float64 reference of dlmfuse.sample_tokens (ground truth for tests).

Written from the contract (docs/ops.md) alone, independently of the C++/CUDA kernels:
Philox4x32-10 on int64 tensors holding uint32 values, the (seed, offset, row, column) counter
layout, 52-bit uniforms, Gumbel-max, top-k / top-p filtering by sorting, and the confidence kinds,
all in float64 on the CPU. Vectorised over rows and columns; not fast, obviously right.

Random layout (shared by every implementation): for row r and column j,
``Philox4x32-10(counter = (j >> 1, r, offset & 0xffffffff, offset >> 32), key = (seed & 0xffffffff,
seed >> 32))``; outputs (0, 1) for even j, (2, 3) for odd j give (hi, lo);
``a = (hi << 20) | (lo >> 12)`` (52 bits), ``u = (2a + 1) / 2^53`` and ``G = -log(-log u)``.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["philox4x32_10", "sample_tokens", "gumbel_uniforms", "uniforms_at", "kept_tokens", "softmax_stats",
           "CONFIDENCE_KINDS"]

CONFIDENCE_KINDS = ("prob", "margin", "neg_entropy", "logit")

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
_PHILOX_M0 = 0xD2511F53  # multiplies c0
_PHILOX_M1 = 0xCD9E8D57  # multiplies c2
_PHILOX_W0 = 0x9E3779B9  # key bump of k0 (golden ratio)
_PHILOX_W1 = 0xBB67AE85  # key bump of k1 (sqrt(3) - 1)
_PHILOX_ROUNDS = 10
_UNIFORM_BITS = 53  # u = (2a + 1) / 2^53 with a 52-bit integer a


def _u32(x: Union[int, Tensor]) -> Tensor:
    """An int64 tensor holding uint32 values (Python ints and tensors alike)."""
    t = torch.as_tensor(x, dtype=torch.int64)
    if bool(((t < 0) | (t > _MASK32)).any()):
        raise ValueError("philox4x32_10: every counter/key word must lie in [0, 2^32)")
    return t


def _mulhilo32(multiplier: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of ``multiplier * x`` for uint32 x held in int64, without overflow.

    The multiplier is split into 16-bit halves: ``x * m_hi`` and ``x * m_lo`` are < 2^48.
    """
    m_hi, m_lo = multiplier >> 16, multiplier & _MASK16
    high_part = x * m_hi  # contributes high_part << 16
    low_part = x * m_lo
    mid = ((high_part & _MASK16) << 16) + low_part  # < 2^32 + 2^48: no overflow
    lo = mid & _MASK32
    hi = ((high_part >> 16) + (mid >> 32)) & _MASK32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0, k1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random123's Philox4x32-10, elementwise on int64 tensors (or ints) holding uint32 values.

    Returns the four output words as int64 tensors (values in [0, 2^32)), broadcast together.
    Known answer: ``philox4x32_10(0, 0, 0, 0, 0, 0) == (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)``.
    """
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(*(_u32(x) for x in (c0, c1, c2, c3, k0, k1)))
    for round_index in range(_PHILOX_ROUNDS):
        if round_index > 0:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _u64(value, name: str) -> int:
    if isinstance(value, Tensor):
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"sample_tokens: {name} must be an int, got {type(value).__name__}")
    if not 0 <= value < 2 ** 64:
        raise ValueError(f"sample_tokens: {name} must lie in [0, 2^64), got {value}")
    return int(value)


def gumbel_uniforms(rows: int, vocab: int, seed: int, offset: int = 0, *, first_column: int = 0) -> Tensor:
    """float64 ``[rows, vocab]``: the uniform u in (0, 1) for every (row, column) of the layout,
    for the columns ``first_column + [0, vocab)`` (even ``first_column``: a vocabulary shard)."""
    seed, offset = _u64(seed, "seed"), _u64(offset, "offset")
    row = torch.arange(rows, dtype=torch.int64).unsqueeze(1)  # [rows, 1]
    if rows > _MASK32 + 1:
        raise ValueError(f"sample_tokens: at most 2^32 rows, got {rows}")
    if first_column < 0 or first_column % 2 or (first_column + vocab) // 2 > _MASK32 + 1:
        raise ValueError(f"sample_tokens: first_column must be even, >= 0 and leave (column / 2) in 32 bits, "
                         f"got {first_column}")
    # Columns j and j + 1 (j even) share one Philox call: compute once per pair.
    pairs = (vocab + 1) // 2
    out = philox4x32_10(torch.arange(pairs, dtype=torch.int64).unsqueeze(0) + first_column // 2, row,
                        offset & _MASK32, offset >> 32, seed & _MASK32, seed >> 32)
    hi = torch.stack((out[0], out[2]), dim=-1).reshape(rows, 2 * pairs)[:, :vocab]
    lo = torch.stack((out[1], out[3]), dim=-1).reshape(rows, 2 * pairs)[:, :vocab]
    a = (hi << 20) | (lo >> 12)  # 52 bits, exact in int64 and in float64
    return (2 * a + 1).to(torch.float64) * 2.0 ** -_UNIFORM_BITS


def uniforms_at(rows: Tensor, columns: Tensor, seed: int, offset: int = 0) -> Tensor:
    """float64: the uniform of the layout at each (row, column) pair (int64 tensors, broadcast
    together; columns of the whole vocabulary)."""
    seed, offset = _u64(seed, "seed"), _u64(offset, "offset")
    rows, columns = torch.broadcast_tensors(rows.to(torch.int64), columns.to(torch.int64))
    out = philox4x32_10(columns >> 1, rows, offset & _MASK32, offset >> 32, seed & _MASK32, seed >> 32)
    odd = (columns & 1).bool()
    hi, lo = torch.where(odd, out[2], out[0]), torch.where(odd, out[3], out[1])
    a = (hi << 20) | (lo >> 12)
    return (2 * a + 1).to(torch.float64) * 2.0 ** -_UNIFORM_BITS


def _suppressed_mask(suppress_tokens, vocab: int) -> Tensor:
    mask = torch.zeros(vocab, dtype=torch.bool)
    if suppress_tokens is None:
        return mask
    ids = torch.as_tensor(suppress_tokens).detach().cpu().reshape(-1)
    if ids.numel() == 0 and not isinstance(suppress_tokens, Tensor):
        ids = ids.to(torch.int64)  # torch.as_tensor([]) is float32
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"sample_tokens: suppress_tokens must be an integer tensor, got {ids.dtype}")
    ids = ids.to(torch.int64)
    if ids.numel() and bool(((ids < 0) | (ids >= vocab)).any()):
        bad = int(ids[(ids < 0) | (ids >= vocab)][0])
        raise ValueError(f"sample_tokens: suppress_tokens holds {bad}, outside [0, vocab={vocab})")
    mask[ids] = True
    return mask


def kept_tokens(logits: Tensor, *, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, suppress_tokens=None) -> Tensor:
    """bool ``[N, V]`` (N = flattened rows): the tokens that survive suppression, -inf/NaN removal,
    top_k and top_p. Ties at a top-k / top-p boundary are all kept."""
    vocab = logits.shape[-1]
    l = logits.detach().to("cpu", torch.float64).reshape(-1, vocab)
    t_eff = float(temperature) if temperature > 0 else 1.0
    w = l / t_eff
    kept = ~torch.isnan(l) & ~torch.isneginf(l) & ~_suppressed_mask(suppress_tokens, vocab).unsqueeze(0)
    w_kept = w.masked_fill(~kept, -math.inf)
    count = kept.sum(dim=1)  # [N]
    sorted_w = w_kept.sort(dim=1, descending=True).values
    keep = kept.clone()
    if top_k is not None:
        k = int(top_k)
        kth_index = (torch.clamp(count, max=k) - 1).clamp(min=0)
        kth = sorted_w.gather(1, kth_index.unsqueeze(1))  # [N, 1]
        keep &= w >= kth
    if top_p is not None and float(top_p) < 1.0:
        q = torch.softmax(sorted_w, dim=1)  # -inf entries get probability 0
        q = torch.nan_to_num(q, nan=0.0)  # rows with nothing kept
        cum = q.cumsum(dim=1)
        reached = cum >= float(top_p)
        # First position whose cumulative mass reaches top_p; all kept tokens when rounding keeps
        # the total just below top_p.
        last = torch.where(reached.any(dim=1), reached.to(torch.int64).argmax(dim=1), count - 1).clamp(min=0)
        boundary = sorted_w.gather(1, last.unsqueeze(1))  # [N, 1]
        keep &= w >= boundary
    return keep & kept


def softmax_stats(logits: Tensor, *, temperature: float = 0.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, suppress_tokens=None, tempered_confidence: bool = False) -> Tensor:
    """float64 ``[N, 4]``: per row, the softmax statistics of the kept tokens' confidence scores
    c (``l / T'`` when ``tempered_confidence``, else ``l``): max c, ``sum exp(c - max)``,
    ``sum exp(c - max) (c - max)`` and the second-largest c (a repeated maximum counts twice);
    ``(-inf, 0, 0, -inf)`` for a row with nothing kept. What the kernels report with ``stats``,
    from which the confidences of vocabulary shards merge (dlmfuse.distributed)."""
    vocab = logits.shape[-1]
    keep = kept_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, suppress_tokens=suppress_tokens)
    l = logits.detach().to("cpu", torch.float64).reshape(-1, vocab)
    c = l / (float(temperature) if temperature > 0 else 1.0) if tempered_confidence else l
    c = c.masked_fill(~keep, -math.inf)
    top = c.topk(min(2, vocab), dim=1).values
    c_max = top[:, 0]
    second = top[:, 1] if vocab > 1 else torch.full_like(c_max, -math.inf)
    d = torch.where(keep, c - torch.where(c_max > -math.inf, c_max, 0.0)[:, None], -math.inf)
    e = torch.exp(d)
    return torch.stack([c_max, e.sum(dim=1), torch.where(e > 0, e * d, 0.0).sum(dim=1), second], dim=1)


def sample_tokens(logits: Tensor, *, temperature: float = 0.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, seed: int = 0, offset: int = 0, confidence: str = "prob",
                  suppress_tokens=None, tempered_confidence: bool = False,
                  uniforms: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Float64 reference of ``dlmfuse.sample_tokens``: ``(tokens int64 [...], confidence float32 [...])``.

    logits ``[..., V]`` of any float dtype (rows are the flattened leading dims). temperature 0:
    argmax of the kept logits; > 0: argmax of ``l / T + G`` with Gumbel noise G from the Philox
    layout (or from ``uniforms``, float64 ``[N, V]`` in (0, 1), when given). Ties go to the first
    index. Confidence comes from the softmax over the kept tokens of the logits (divided by T when
    ``tempered_confidence``). A row with no kept token gives token -1 and confidence -inf (as the
    CUDA kernel does; the public op raises ValueError for such rows on the CPU).
    """
    if not logits.is_floating_point():
        raise TypeError(f"sample_tokens: logits must be a float tensor, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"sample_tokens: logits must have at least 1 dim [..., V], got shape {list(logits.shape)}")
    if confidence not in CONFIDENCE_KINDS:
        raise ValueError(f"sample_tokens: confidence={confidence!r} unknown (allowed: {', '.join(CONFIDENCE_KINDS)})")
    temperature = float(temperature)
    if not temperature >= 0:
        raise ValueError(f"sample_tokens: temperature must be >= 0, got {temperature}")
    if top_k is not None and int(top_k) < 1:
        raise ValueError(f"sample_tokens: top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < float(top_p) <= 1:
        raise ValueError(f"sample_tokens: top_p must lie in (0, 1], got {top_p}")

    lead_shape, vocab = tuple(logits.shape[:-1]), logits.shape[-1]
    l = logits.detach().to("cpu", torch.float64).reshape(-1, vocab)  # [N, V]
    rows = l.shape[0]
    keep = kept_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, suppress_tokens=suppress_tokens)
    has_token = keep.any(dim=1)

    # Rows whose largest kept l / T overflows float64 (either sign) rank and weigh l - l_max instead of l (the
    # same order and softmax, without inf - inf); other rows use l itself.
    l_max = l.masked_fill(~keep, -math.inf).amax(dim=1, keepdim=True)

    def shifted_where_overflowing(divisor: float) -> Tensor:
        overflow = torch.isinf(l_max / divisor) & torch.isfinite(l_max)  # a +inf logit stays as it is
        return l - torch.where(overflow, l_max, torch.zeros_like(l_max))

    if temperature > 0:
        if uniforms is None:
            u = gumbel_uniforms(rows, vocab, seed, offset)
        else:
            u = uniforms.detach().to("cpu", torch.float64).reshape(rows, vocab)
        score = shifted_where_overflowing(temperature) / temperature - torch.log(-torch.log(u))
    else:
        score = l
    score = score.masked_fill(~keep, -math.inf)
    # A kept +inf logit wins over every finite one, even one whose l / T overflows to +inf too.
    score = torch.where((l_max == math.inf) & (l != math.inf), -math.inf, score)
    # The first kept index with the best score (ties; and rows whose kept scores are all -inf).
    best = score.amax(dim=1, keepdim=True)
    tokens = (keep & (score == best)).to(torch.int64).argmax(dim=1)

    t_eff = temperature if temperature > 0 else 1.0
    c = shifted_where_overflowing(t_eff) / t_eff if tempered_confidence else l
    p = torch.softmax(c.masked_fill(~keep, -math.inf), dim=1)  # NaN rows only where nothing is kept
    if confidence == "prob":
        conf = p.gather(1, tokens.unsqueeze(1)).squeeze(1)
    elif confidence == "margin":
        top2 = p.topk(min(2, vocab), dim=1).values
        second = top2[:, 1] if vocab > 1 else torch.zeros(rows, dtype=torch.float64)
        conf = top2[:, 0] - second
    elif confidence == "neg_entropy":
        conf = torch.xlogy(p, p).sum(dim=1)
    else:
        conf = l.gather(1, tokens.unsqueeze(1)).squeeze(1)

    tokens = torch.where(has_token, tokens, torch.full_like(tokens, -1))
    conf = torch.where(has_token, conf, torch.full_like(conf, -math.inf))
    return tokens.reshape(lead_shape), conf.to(torch.float32).reshape(lead_shape)
