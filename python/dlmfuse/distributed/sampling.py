"""Vocabulary-parallel sampling: tokens and confidences of logits split over ranks by vocabulary
columns, equal to what :func:`dlmfuse.sample_tokens` gives on the whole rows, without gathering
the logits.

Each rank (its columns ``[vocab_offset, vocab_offset + Vs)`` of every row):

1. top-k / top-p (when asked): the whole row's cut, by small all-gathers (:mod:`.cuts`), applied
   by masking the shard's dropped logits;
2. one sampling-kernel pass over its columns, with the Philox noise of the GLOBAL columns
   (``column_offset``, so each column draws exactly the noise it draws unsharded): its best
   token and the softmax statistics of its kept confidence scores c (``stats``: max c,
   ``z = sum exp(c - max)``, ``s = sum e (c - max)``, the second-largest c);
3. six float64 numbers per row: the best token's global id and logit, and those statistics.

One all-gather of those numbers (``STATS_PER_ROW`` x 8 bytes per row and rank), then every rank
combines them in rank order: the winner is the best Gumbel score ``l / T + G(row, global id)``
(recomputed from the gathered logit and id; ties to the lower id, as the kernel), and the
confidence comes from the merged statistics (``Z = sum_r z_r exp(m_r - M)``, ...). Tokens equal
the unsharded call's; confidences agree to float32 rounding (the single-process kernel
accumulates the same statistics over the whole row in its own order).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..reference.sampling import uniforms_at
from ..sampling import (_LOGITS_DTYPES, CONFIDENCE_KINDS, _counter, _suppressed_mask, _temperature_value,
                        _top_k_code, _top_p_value, sample_rows)
from .collectives import all_gather_rows
from .cuts import kept_cut, scaled_logits

__all__ = ["sample_tokens", "token_probability", "vocab_shard", "sample_dtensor", "STATS_PER_ROW"]

_OP = "dlmfuse.distributed.sample_tokens"
#: Numbers per row each rank contributes to the one all-gather of a sampling step (float64).
STATS_PER_ROW = 6
_LOGIT_KIND = CONFIDENCE_KINDS.index("logit")


def sample_tokens(logits: Tensor, *, vocab_offset: int, vocab_size: int, group=None, temperature: float = 0.0,
                  top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                  offset: int = 0, confidence: str = "prob",
                  suppress_tokens: Union[Tensor, Sequence[int], None] = None,
                  tempered_confidence: bool = False) -> Tuple[Tensor, Tensor]:
    """:func:`dlmfuse.sample_tokens` of rows split over the ranks of ``group`` by vocabulary.

    Every rank of ``group`` calls it with the same options and its own columns.

    Args:
        logits: ``[..., Vs]``: this rank's columns ``[vocab_offset, vocab_offset + Vs)`` of
            logits ``[..., vocab_size]`` (the ranks' columns tile the vocabulary; the leading
            shape is the same on every rank).
        vocab_offset, vocab_size: where this rank's columns lie in the vocabulary.
        group: the process group of the ranks holding the columns (None: the default group).
        seed: required when ``temperature > 0`` (every rank must draw the same noise).
        temperature, top_k, top_p, offset, confidence, suppress_tokens, tempered_confidence: as
            :func:`dlmfuse.sample_tokens`; ``suppress_tokens`` are global ids, ``top_k`` and
            ``top_p`` act on the whole row.

    Returns:
        ``(tokens, confidence)``: global int64 ids and float32, shape ``logits.shape[:-1]``, the
        same on every rank. A row with no token that can be emitted raises ValueError on the CPU
        and gives token -1 and confidence -inf on CUDA, as the single-process op.
    """
    width = _check_shard(logits, vocab_offset, vocab_size)
    temperature = _temperature_value(temperature)
    top_k_code, top_p_value = _top_k_code(top_k, vocab_size), _top_p_value(top_p)
    if confidence not in CONFIDENCE_KINDS:
        raise ValueError(f"{_OP}: confidence must be one of {list(CONFIDENCE_KINDS)}, got {confidence!r}")
    if temperature > 0 and seed is None:
        raise ValueError(f"{_OP}: seed is required when temperature > 0 (every rank must draw the same noise)")
    seed_value, _ = _counter("seed", 0 if seed is None else seed, logits)
    offset_value, _ = _counter("offset", offset, logits)
    suppressed = _suppressed_mask(suppress_tokens, vocab_size, logits.device)
    if suppressed is not None:
        suppressed = suppressed[vocab_offset:vocab_offset + width]

    rows = logits.detach().reshape(-1, width)
    if top_k_code or top_p_value < 1.0:
        eligible = rows > -math.inf  # NaN fails too
        if suppressed is not None:
            eligible &= suppressed[None, :] == 0
        w = scaled_logits(rows, temperature, eligible)
        rows = rows.masked_fill(~(w >= kept_cut(w, top_k_code, top_p_value, group)[:, None]), -math.inf)
    numbers = _shard_numbers(rows, suppressed, temperature, seed_value, offset_value, tempered_confidence,
                             vocab_offset)
    tokens, conf = _combine(all_gather_rows(numbers, group), temperature, seed_value, offset_value,
                            _ConfidenceScore(logits.dtype, temperature, tempered_confidence), confidence)
    if not logits.is_cuda:
        empty = (tokens < 0).nonzero()
        if empty.numel():
            raise ValueError(f"{_OP}: row {int(empty[0])} has no token that can be emitted "
                             "(every logit is suppressed, -inf or NaN)")
    lead_shape = logits.shape[:-1]
    return tokens.reshape(lead_shape), conf.reshape(lead_shape)


def token_probability(logits: Tensor, tokens: Tensor, suppress_tokens: Optional[Sequence[int]] = None, *,
                      vocab_offset: int, vocab_size: int, group=None) -> Tensor:
    """float64 ``softmax(logits)[token]`` per row over the whole vocabulary (suppressed ids left
    out), from each rank's columns: :func:`dlmfuse.samplers.llada.token_probability` for split
    rows. One all-gather of three numbers per row (the shard's max, its sum of exponentials, the
    token's logit where the shard holds it); ``p = 1 / sum_r z_r exp(m_r - l_token)``."""
    width = _check_shard(logits, vocab_offset, vocab_size)
    rows = logits.detach().reshape(-1, width).double()
    chosen = tokens.reshape(-1).to(rows.device)
    if suppress_tokens:
        local = [i - vocab_offset for i in suppress_tokens if vocab_offset <= i < vocab_offset + width]
        rows[:, local] = -math.inf
    shard_max = rows.amax(dim=1)
    finite = torch.isfinite(shard_max)
    z = torch.where(finite, torch.exp(rows - torch.where(finite, shard_max, 0.0)[:, None]).sum(dim=1), 0.0)
    owned = (chosen >= vocab_offset) & (chosen < vocab_offset + width)
    token_logit = rows.gather(1, (chosen - vocab_offset).clamp(0, width - 1)[:, None])[:, 0]
    token_logit = torch.where(owned, token_logit, math.nan)  # NaN: another rank holds the token
    gathered = all_gather_rows(torch.stack([shard_max, z, token_logit], dim=1), group)  # [world, N, 3]
    shard_max, z, token_logit = gathered.unbind(dim=2)
    logit = torch.nan_to_num(token_logit, nan=0.0).sum(dim=0)  # exactly one rank holds it
    terms = torch.where(z > 0, z * torch.exp(shard_max - logit), 0.0)
    return (1.0 / terms.sum(dim=0)).reshape(tokens.shape)


def vocab_shard(logits) -> Tuple[Tensor, int, int, object]:
    """``(local, vocab_offset, vocab_size, group)`` of a DTensor split over its last dimension on
    a 1-D mesh (``Shard(-1)``, as a tensor-parallel LM head returns it); a replicated one gives
    its whole rows with group None."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placement = logits.device_mesh, logits.placements[0]
    if mesh.ndim != 1:
        raise ValueError(f"sample_tokens: a DTensor of logits must live on a 1-D mesh, got mesh shape "
                         f"{tuple(mesh.shape)}")
    vocab = logits.shape[-1]
    if isinstance(placement, Replicate):
        return logits.to_local(), 0, vocab, None
    if not isinstance(placement, Shard) or placement.dim not in (-1, logits.dim() - 1):
        raise ValueError(f"sample_tokens: a DTensor of logits must be split over its last (vocabulary) dimension "
                         f"(Shard(-1)) or replicated, got placements {logits.placements}")
    world, rank = mesh.size(), mesh.get_local_rank()
    per_rank = -(-vocab // world)  # Shard's torch.chunk rule: ceil(V / N) columns, the last ranks fewer
    return logits.to_local(), min(rank * per_rank, vocab), vocab, mesh.get_group()


def sample_dtensor(logits, **options) -> Tuple[Tensor, Tensor]:
    """:func:`dlmfuse.sample_tokens` of a DTensor of logits (see :func:`vocab_shard`)."""
    from ..sampling import sample_tokens as sample_whole_rows

    local, vocab_offset, vocab_size, group = vocab_shard(logits)
    if group is None:
        return sample_whole_rows(local, **options)
    return sample_tokens(local, vocab_offset=vocab_offset, vocab_size=vocab_size, group=group, **options)


# --------------------------------------------------------------------------------------- steps
def _check_shard(logits, vocab_offset, vocab_size) -> int:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{_OP}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _LOGITS_DTYPES:
        raise TypeError(f"{_OP}: logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{_OP}: logits must have shape [..., Vs] with Vs >= 1 (every rank holds a column), "
                         f"got {list(logits.shape)}")
    width = logits.shape[-1]
    for name, value in (("vocab_offset", vocab_offset), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"{_OP}: {name} must be an int >= 0, got {value!r}")
    if vocab_offset + width > vocab_size:
        raise ValueError(f"{_OP}: columns [vocab_offset={vocab_offset}, +{width}) run past vocab_size={vocab_size}")
    return width


class _ConfidenceScore:
    """c of a logit l as the kernel scores it: ``l * float32(1 / T')`` in float32 (tempered) or l,
    except where the kernel works in float64 (float64 logits, extreme temperatures): ``l / T'``."""

    def __init__(self, dtype: torch.dtype, temperature: float, tempered: bool):
        self.divisor = (temperature if temperature > 0 else 1.0) if tempered else 1.0
        self.float64 = dtype == torch.float64 or (temperature > 0 and not 1e-30 <= temperature <= 1e30)

    def __call__(self, logit: Tensor) -> Tensor:
        if self.float64:
            return logit / self.divisor
        scale = torch.tensor(1.0 / self.divisor, dtype=torch.float32, device=logit.device)
        return (logit.float() * scale).double()


def _shard_numbers(rows: Tensor, suppressed: Optional[Tensor], temperature: float, seed: int, offset: int,
                   tempered: bool, vocab_offset: int) -> Tensor:
    """float64 ``[N, STATS_PER_ROW]``: the shard's best kept token (global id, -1: none), its logit,
    and the kernel's softmax statistics of the shard's kept confidence scores."""
    pad = vocab_offset % 2  # the kernel pairs columns as the whole row does: start at an even column
    if pad:
        rows = torch.cat([rows.new_full((rows.shape[0], 1), -math.inf), rows], dim=1)
        if suppressed is not None:
            suppressed = torch.cat([suppressed.new_zeros(1), suppressed])
    stats = torch.empty(rows.shape[0], 4, dtype=torch.float64, device=rows.device)
    tokens, _ = sample_rows(rows.contiguous(), temperature, 0, 1.0, suppressed, seed, offset, None, None,
                            _LOGIT_KIND, tempered, column_offset=vocab_offset - pad, stats=stats)
    found = tokens >= 0
    winner_logit = torch.where(found, rows.double().gather(1, tokens.clamp(min=0)[:, None])[:, 0], -math.inf)
    winner_id = torch.where(found, tokens - pad + vocab_offset, -1).double()  # ids < 2^53: exact
    return torch.cat([winner_id[:, None], winner_logit[:, None], stats], dim=1)


def _combine(gathered: Tensor, temperature: float, seed: int, offset: int, score_of: _ConfidenceScore,
             confidence: str) -> Tuple[Tensor, Tensor]:
    """Every rank's ``[world, N, STATS_PER_ROW]`` numbers -> (tokens int64 [N], confidence float32 [N])."""
    ids, logit, c_max, z, s, c_second = gathered.unbind(dim=2)  # each [world, N]
    found = ids >= 0
    if temperature > 0:
        # As the kernel's float64 path: rows whose l_max / T overflows rank by l - l_max.
        l_max = torch.where(found, logit, -math.inf).amax(dim=0)
        shift = torch.where(torch.isfinite(l_max) & (l_max / temperature == math.inf), l_max, 0.0)
        rows = torch.arange(ids.shape[1])[None, :]
        u = uniforms_at(rows, ids.clamp(min=0).long().cpu(), seed, offset).to(ids.device)
        score = (logit - shift) / temperature - torch.log(-torch.log(u))
    else:
        score = logit
    score = torch.where(found, score, -math.inf)
    best = score.amax(dim=0)
    is_best = found & (score == best)
    token = torch.where(is_best, ids, math.inf).amin(dim=0)  # ties: the lowest id
    has_token = torch.isfinite(token)
    owner = (is_best & (ids == token)).to(torch.int64).argmax(dim=0)
    token_logit = logit.gather(0, owner[None])[0]

    # The softmax statistics of the whole row, merged from the shards' (shards with nothing
    # kept have z = 0 and add nothing).
    row_max = c_max.amax(dim=0)  # [N]
    d = torch.where(z > 0, c_max - row_max, -math.inf)
    e = torch.exp(d)
    total = (z * e).sum(dim=0)
    entropy_term = torch.where(z > 0, e * (s + z * d), 0.0).sum(dim=0)
    runner_up = torch.cat([c_max, c_second], dim=0).topk(2, dim=0).values[1]
    if confidence == "prob":
        conf = torch.exp(score_of(token_logit) - row_max) / total
    elif confidence == "margin":
        conf = (1.0 - torch.exp(runner_up - row_max)) / total
    elif confidence == "neg_entropy":
        conf = entropy_term / total - torch.log(total)
    else:
        conf = token_logit
    tokens = torch.where(has_token, token, -1.0).to(torch.int64)
    return tokens, torch.where(has_token, conf, -math.inf).to(torch.float32)
