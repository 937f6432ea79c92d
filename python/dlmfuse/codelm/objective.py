"""The masked-diffusion objective (LLaDA, MDLM): training loss, held-out likelihood bound, and the
unigram baseline it is compared with.

For a clean sequence x of length L, a mask ratio t in (0, 1] masks each token independently with
probability t; the model sees the masked sequence x_t and predicts every masked token. The loss

    loss(x) = (1 / L) * E_t E_{x_t} [ (1 / t) * sum over masked i of -log p(x_i | x_t) ]

is the negative ELBO per token, an upper bound on the model's negative log-likelihood of x
(MDLM's bound with the linear schedule alpha_t = 1 - t, LLaDA's pre-training loss). Training draws
one t per sequence (stratified over the batch, see :func:`mask_ratios`); :func:`elbo_nll` evaluates
the bound on held-out sequences with a fixed grid of t and seeded masks, so it is reproducible.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MIN_MASK_RATIO", "mask_ratios", "weighted_masked_nll", "masked_diffusion_loss", "elbo_nll",
           "elbo_ratio_grid", "unigram_log_probs", "unigram_nll", "token_counts"]

#: The smallest mask ratio drawn in training (LLaDA's eps): keeps 1/t bounded.
MIN_MASK_RATIO = 1e-3


def mask_ratios(batch: int, generator: torch.Generator) -> Tensor:
    """float32 ``[batch]`` mask ratios in [MIN_MASK_RATIO, 1): one uniform u, then
    ``(u + b / batch) mod 1`` for row b (MDLM's low-discrepancy draw: every batch covers (0, 1)
    evenly, so the loss varies less from step to step), mapped onto [MIN_MASK_RATIO, 1]."""
    u = torch.rand((), generator=generator)
    spread = (u + torch.arange(batch) / batch) % 1.0
    return MIN_MASK_RATIO + (1.0 - MIN_MASK_RATIO) * spread


def weighted_masked_nll(logits: Tensor, x0: Tensor, masked: Tensor, ratios: Tensor) -> Tensor:
    """Per sequence, ``sum over masked i of -log softmax(logits_i)[x0_i] / t``: float32 ``[B]``.

    logits ``[B, L, V]`` (of the masked sequences), x0 int64 ``[B, L]``, masked bool ``[B, L]``,
    ratios ``[B]`` (t per sequence)."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # [B, L]
    return (nll * masked).sum(dim=1) / ratios.to(nll.dtype)


def masked_diffusion_loss(model, x0: Tensor, mask_token_id: int, generator: torch.Generator) -> Tensor:
    """The training loss of one batch of clean sequences x0 (int64 ``[B, L]``): ratios from
    :func:`mask_ratios`, each token masked with probability t of its row (uniforms drawn from
    ``generator`` on the CPU, so runs are reproducible), cross-entropy on the masked tokens
    weighted 1/t, summed and divided by B * L (LLaDA's normalisation)."""
    batch, length = x0.shape
    ratios = mask_ratios(batch, generator)
    masked = (torch.rand(batch, length, generator=generator) < ratios[:, None]).to(x0.device)
    noisy = torch.where(masked, mask_token_id, x0)
    per_sequence = weighted_masked_nll(model(noisy), x0, masked, ratios.to(x0.device))
    return per_sequence.sum() / (batch * length)


def elbo_ratio_grid(count: int) -> Tensor:
    """The mask ratios of :func:`elbo_nll`: the midpoints ``(k + 0.5) / count`` of ``count``
    equal slices of (0, 1) (float64)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"elbo_nll: ratios must be a positive int, got {count!r}")
    return (torch.arange(count, dtype=torch.float64) + 0.5) / count


@torch.no_grad()
def elbo_nll(model, sequences: Tensor, mask_token_id: int, *, ratios: int = 8, seed: int = 0,
             batch_size: int = 16) -> float:
    """The masked-diffusion bound on the negative log-likelihood, in nats per token, of
    ``sequences`` (int64 ``[N, L]``, no mask tokens): the mean over sequences and over the mask
    ratios t of :func:`elbo_ratio_grid` of ``(1 / L) * (1 / t) * sum over masked i of
    -log p(x_i | x_t)``, each (sequence, t) with its own mask drawn from a generator seeded with
    ``seed`` (uniforms ``[N, ratios, L]``, token masked where u < t). A midpoint rule over t
    with one mask per point: an estimate of the bound, the same number for the same inputs."""
    if sequences.dim() != 2 or sequences.dtype != torch.int64:
        raise ValueError(f"elbo_nll: sequences must be int64 [N, L], got {sequences.dtype} {list(sequences.shape)}")
    if bool((sequences == mask_token_id).any()):
        raise ValueError(f"elbo_nll: sequences contain the mask token {mask_token_id}")
    count, length = sequences.shape
    grid = elbo_ratio_grid(ratios)
    uniforms = torch.rand(count, ratios, length, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    masked = (uniforms < grid[None, :, None]).reshape(count * ratios, length)
    x0 = sequences.repeat_interleave(ratios, dim=0)
    t = grid.repeat(count)
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, count * ratios, batch_size):
        rows = slice(start, start + batch_size)
        clean, where = x0[rows].to(device), masked[rows].to(device)
        logits = model(torch.where(where, mask_token_id, clean))
        total += float(weighted_masked_nll(logits, clean, where, t[rows].to(device)).double().sum())
    return total / (count * ratios * length)


def unigram_log_probs(counts: Sequence[int], excluded: Sequence[int] = ()) -> Tensor:
    """float64 ``[V]`` log-probabilities of the unigram model with add-one smoothing:
    ``(count_v + 1) / (sum of counts + V')`` over the V' ids not ``excluded`` (those get -inf, e.g.
    the mask token, which never occurs in text)."""
    counts = torch.as_tensor(list(counts), dtype=torch.float64)
    keep = torch.ones_like(counts, dtype=torch.bool)
    keep[list(excluded)] = False
    smoothed = torch.where(keep, counts + 1.0, torch.zeros_like(counts))
    return torch.where(keep, smoothed.log() - math.log(float(smoothed.sum())), torch.full_like(counts, -math.inf))


def unigram_nll(log_probs: Tensor, ids: Tensor) -> float:
    """Mean negative log-likelihood (nats per token) of the token ids under ``log_probs``."""
    return float(-log_probs[ids.reshape(-1).long()].mean())


def token_counts(ids: Tensor, vocab_size: int) -> Tensor:
    """int64 ``[vocab_size]`` occurrence counts of ``ids``."""
    return torch.bincount(ids.reshape(-1).long(), minlength=vocab_size)
