"""top-k / top-p over a vocabulary split across ranks: the per-row cut ``t`` such that the kept
tokens are those with ``w = l / T' >= t`` (T' = T, or 1 when greedy), exactly the cut the
single-process kernel computes over the whole row (``-inf``: keep every eligible token).

- top-k: each rank's k largest ``w``, gathered (k numbers per row and rank); the k-th largest of
  them is the whole row's k-th largest.
- top-p: the largest eligible ``w`` whose tokens at or above it carry at least ``top_p`` of
  ``softmax(w)``. Found by a search over the ranks' own values: each round every rank proposes
  up to ``PIVOTS`` of its values still in play, every rank evaluates the mass at or above every
  proposal on its shard, and the summed masses narrow the interval that holds the cut. A rank's
  values in play shrink by a factor of about ``PIVOTS`` per round, so a shard of 64k columns
  takes 4 rounds of two small all-gathers.

Every rank combines the gathered numbers in rank order, so all of them obtain the same cut.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .collectives import all_gather_rows

__all__ = ["PIVOTS", "scaled_logits", "kept_cut"]

#: Values each rank proposes per row and round of the top-p search.
PIVOTS = 32


def scaled_logits(rows: Tensor, temperature: float, eligible: Tensor) -> Tensor:
    """``w = l / T'`` as the kernels rank tokens: float32, ``l * float32(1 / T')``, and -inf where
    not eligible (suppressed, -inf or NaN). rows ``[N, Vs]``, eligible bool ``[N, Vs]``."""
    inverse = torch.tensor(1.0 / temperature if temperature > 0 else 1.0, dtype=torch.float32, device=rows.device)
    return torch.where(eligible, rows.float() * inverse, torch.tensor(-math.inf, device=rows.device))


def kept_cut(w: Tensor, top_k: int, top_p: float, group) -> Tensor:
    """float32 ``[N]``: the cut of ``top_k`` (0: off) and ``top_p`` (>= 1: off) over the whole
    row, from this rank's ``w [N, Vs]`` (-inf where not eligible)."""
    cut = torch.full((w.shape[0],), -math.inf, dtype=torch.float32, device=w.device)
    if top_p < 1.0:
        cut = torch.maximum(cut, _top_p_cut(w, top_p, group))
    if top_k > 0:
        cut = torch.maximum(cut, _top_k_cut(w, top_k, group))
    return cut


def _top_k_cut(w: Tensor, k: int, group) -> Tensor:
    rows, width = w.shape
    local = w.topk(min(k, width), dim=1).values
    if local.shape[1] < k:  # a shard narrower than k: pad with "no token"
        local = torch.cat([local, local.new_full((rows, k - local.shape[1]), -math.inf)], dim=1)
    gathered = all_gather_rows(local, group)  # [world, N, k]
    # The k-th largest over the row; -inf when fewer than k tokens are eligible (keep them all).
    return gathered.permute(1, 0, 2).reshape(rows, -1).topk(k, dim=1).values[:, k - 1]


def _top_p_cut(w: Tensor, top_p: float, group) -> Tensor:
    rows = w.shape[0]
    device = w.device
    w_max = all_gather_rows(w.amax(dim=1, keepdim=True), group).amax(dim=0)  # [N, 1], every rank's max
    values = w.double().sort(dim=1).values  # ascending; not eligible (-inf) first
    weights = torch.exp(values - w_max.double())  # exp(w - max w) as the kernels weigh; 0 for -inf
    # above[:, i] = mass of values[:, i:], with a 0 column past the end.
    above = torch.cat([weights.flip(1).cumsum(1).flip(1), weights.new_zeros(rows, 1)], dim=1)
    total = all_gather_rows(above[:, :1], group).sum(dim=0)[:, 0]  # [N]
    target = top_p * total
    lo = torch.full((rows,), -math.inf, dtype=torch.float64, device=device)  # mass(w >= lo) >= target
    hi = torch.full((rows,), math.inf, dtype=torch.float64, device=device)   # mass(w >= hi) < target
    while True:
        # This rank's values strictly between lo and hi: indices [first, end) of the sorted row.
        first = torch.searchsorted(values, lo[:, None], right=True)[:, 0]
        end = torch.searchsorted(values, hi[:, None], right=False)[:, 0]
        count = end - first
        # Up to PIVOTS of them: all of them when there are no more, else evenly spaced.
        slot = torch.arange(PIVOTS, device=device)
        step = torch.where(count > PIVOTS, (count - 1).double() / (PIVOTS - 1), 1.0)
        picks = first[:, None] + (slot.double()[None, :] * step[:, None]).long()
        valid = slot[None, :] < count[:, None]
        picks = torch.where(valid, picks, 0)
        proposals = torch.where(valid, values.gather(1, picks), math.nan)
        offer = torch.cat([proposals, count[:, None].double()], dim=1)  # [N, PIVOTS + 1]
        offers = all_gather_rows(offer, group)  # [world, N, PIVOTS + 1]
        pivots = offers[:, :, :PIVOTS].permute(1, 0, 2).reshape(rows, -1)  # [N, world * PIVOTS]
        # Mass at or above each pivot, on this shard, then over the row.
        at_or_above = torch.searchsorted(values, torch.nan_to_num(pivots, nan=math.inf), right=False)
        mass = all_gather_rows(above.gather(1, at_or_above), group).sum(dim=0)
        known = ~torch.isnan(pivots)
        enough = known & (mass >= target[:, None])
        short = known & (mass < target[:, None])
        lo = torch.maximum(lo, torch.where(enough, pivots, -math.inf).amax(dim=1))
        hi = torch.minimum(hi, torch.where(short, pivots, math.inf).amin(dim=1))
        if not bool((offers[:, :, PIVOTS] > PIVOTS).any()):  # every value in play was evaluated
            return lo.float()  # -inf: rounding left the target unreached, keep every token
