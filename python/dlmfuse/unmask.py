"""Which masked positions to reveal this step (docs/ops.md): dlmfuse.select_unmask.

Diffusion samplers (LLaDA low-confidence remasking, Fast-dLLM threshold / factor parallel decoding,
Dream) pick, per row, a subset of the still-masked positions by confidence. select_unmask does that
on the device with a handful of torch ops and no host read, so a whole denoising step can be
captured in a CUDA graph or compiled with ``torch.compile(fullgraph=True)``.

Method: one stable descending sort of the confidences (NaN and non-candidates moved to -inf), the
rank of every candidate among the candidates (a cumulative sum over the sorted candidate flags),
a per-row rule that says how many of the top-ranked candidates to take, and a scatter back to the
original positions.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from ._checks import as_signed_int, can_read_values, expect_same_device, expect_tensor

__all__ = ["select_unmask"]

_OP = "select_unmask"


def select_unmask(
    confidence: Tensor,
    candidates: Tensor,
    *,
    k: Union[int, Tensor, None] = None,
    threshold: Optional[float] = None,
    factor: Optional[float] = None,
) -> Tensor:
    """Per row, the candidate positions to unmask, chosen by confidence. Exactly one rule is given.

    Args:
        confidence: float ``[B, L]`` (any floating dtype; compared exactly, in float64).
        candidates: bool ``[B, L]``, True where a position may be selected (still masked).
        k: the ``k`` most confident candidates of each row; a Python int >= 0 for every row, or an
            integer tensor ``[B]`` (or a 0-dim one, for every row) on the device of `confidence`.
            Rows with fewer than k candidates select all of them.
        threshold: every candidate with ``confidence > threshold``, and always at least the single
            most confident candidate of a row that has any (Fast-dLLM threshold decoding).
        factor: Fast-dLLM's factor rule, ``factor > 0``: with the row's candidate confidences
            sorted ``c(1) >= c(2) >= ...``, the top ``n`` where ``n`` is the longest prefix with
            ``c(m) >= 1 - factor / (m + 1)`` for every ``m <= n``; ``m = 1`` always qualifies.

    Returns:
        bool ``[B, L]`` on the device of `confidence`, True only at candidates. Rows with no
        candidate select nothing.

    Ties are broken by position: among equal confidences the lower index is preferred. NaN
    confidence ranks as -inf: it is never preferred over a real value (ties with -inf by
    position) and never passes a threshold or a factor test, though it can be the "at least one"
    of a row whose candidates are all NaN / -inf, or be taken by ``k``.

    No host read or sync and no data-dependent shape, so the op is CUDA-graph capturable and
    traceable by ``torch.compile(fullgraph=True)``. The check that a `k` tensor is not negative
    reads it on the host and is therefore skipped while compiling or capturing; there a negative
    k selects nothing.

    Example::

        >>> import torch, dlmfuse
        >>> conf = torch.tensor([[0.9, 0.2, 0.95, 0.5], [0.1, 0.3, 0.2, 0.8]])
        >>> cand = torch.tensor([[True, True, False, True], [True, True, True, False]])
        >>> dlmfuse.select_unmask(conf, cand, k=2).int()
        tensor([[1, 0, 0, 1],
                [0, 1, 1, 0]], dtype=torch.int32)
        >>> dlmfuse.select_unmask(conf, cand, threshold=0.6).int()   # row 1: its best one
        tensor([[1, 0, 0, 0],
                [0, 1, 0, 0]], dtype=torch.int32)
        >>> dlmfuse.select_unmask(conf, cand, factor=1.0).int()      # c(2)=0.5 < 1 - 1/3
        tensor([[1, 0, 0, 0],
                [0, 1, 0, 0]], dtype=torch.int32)
    """
    threshold, factor = _saturated(threshold), _saturated(factor)
    rule = _check_args(confidence, candidates, k, threshold, factor)

    # Sort key: NaN and non-candidates at -inf; float64 only when the input is float64 (every
    # narrower float converts to float32 exactly, so the order is the exact order).
    key = confidence.to(torch.float64 if confidence.dtype == torch.float64 else torch.float32)
    key = key.masked_fill(candidates.logical_not() | key.isnan(), -math.inf)
    sorted_key, order = torch.sort(key, dim=1, descending=True, stable=True)  # [B, L]
    is_cand = candidates.gather(1, order)  # [B, L] candidate flag at each sorted slot
    rank = is_cand.cumsum(dim=1) - 1  # [B, L] rank among the row's candidates (where is_cand)

    if rule == "k":
        if isinstance(k, Tensor):
            k_row = as_signed_int(k).to(device=rank.device, dtype=torch.int64).reshape(-1, 1)  # [B or 1, 1]
            take = rank < k_row
        else:  # a k beyond the row selects every candidate, however large the int (numpy's too)
            take = rank < (k if isinstance(k, torch.SymInt) else min(int(k), key.shape[1]))
    elif rule == "threshold":
        # Candidates above the threshold are a prefix of the sorted candidates (NaN sits at -inf).
        take = (sorted_key.to(torch.float64) > threshold) | (rank == 0)
    else:
        m = (rank + 1).to(torch.float64)  # 1-based rank, exact in float64
        passes = (sorted_key.to(torch.float64) >= 1.0 - factor / (m + 1.0)) | (rank == 0)
        # n = the rank of the first failing candidate (0-based), or every candidate if none fails.
        first_fail = torch.where(is_cand & passes.logical_not(), rank, torch.full_like(rank, key.shape[1]))
        take = rank < first_fail.amin(dim=1, keepdim=True) if key.shape[1] > 0 else passes
    selected_sorted = is_cand & take
    return torch.zeros_like(candidates).scatter_(1, order, selected_sorted)


def _saturated(value):
    """A Python int beyond the float range as +-inf (what it means as a threshold or factor);
    anything else unchanged (the checks below judge it)."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    return value


def _check_args(confidence, candidates, k, threshold, factor) -> str:
    """Validates every argument; returns the rule name ("k", "threshold" or "factor")."""
    expect_tensor(_OP, "confidence", confidence)
    expect_tensor(_OP, "candidates", candidates)
    if not confidence.dtype.is_floating_point:
        raise TypeError(f"{_OP}: confidence must have a floating dtype, got {confidence.dtype}")
    if candidates.dtype != torch.bool:
        raise TypeError(f"{_OP}: candidates must be a bool tensor, got {candidates.dtype}")
    expect_same_device(_OP, "candidates", candidates, "confidence", confidence)
    if confidence.dim() != 2:
        raise ValueError(f"{_OP}: confidence must have shape [B, L], got {list(confidence.shape)}")
    if candidates.shape != confidence.shape:
        raise ValueError(
            f"{_OP}: candidates must have the shape of confidence {list(confidence.shape)}, "
            f"got {list(candidates.shape)}"
        )

    given = [name for name, value in (("k", k), ("threshold", threshold), ("factor", factor)) if value is not None]
    if len(given) != 1:
        raise ValueError(
            f"{_OP}: give exactly one of k, threshold, factor; got k={_describe(k)}, "
            f"threshold={threshold!r}, factor={factor!r}"
        )
    rule = given[0]
    if rule == "k":
        _check_k(k, confidence)
    elif rule == "threshold":
        _expect_real("threshold", threshold)
        if math.isnan(threshold):
            raise ValueError(f"{_OP}: threshold must not be NaN, got {threshold!r}")
    else:
        _expect_real("factor", factor)
        if not factor > 0:  # also rejects NaN
            raise ValueError(f"{_OP}: factor must be > 0, got {factor!r}")
    return rule


def _check_k(k, confidence: Tensor) -> None:
    if isinstance(k, Tensor):
        if k.dtype == torch.bool or k.dtype.is_floating_point or k.dtype.is_complex:
            raise TypeError(f"{_OP}: k must be an int or an integer tensor [B], got a {k.dtype} tensor")
        expect_same_device(_OP, "k", k, "confidence", confidence)
        batch = confidence.shape[0]
        if k.dim() > 1 or (k.dim() == 1 and k.shape[0] != batch):
            raise ValueError(f"{_OP}: k must have shape [B={batch}] (or be 0-dim), got {list(k.shape)}")
        if can_read_values(k) and k.numel() > 0 and bool((as_signed_int(k) < 0).any()):
            raise ValueError(f"{_OP}: k must be >= 0 in every row, got {k.tolist()}")
        return
    if isinstance(k, bool) or not isinstance(k, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{_OP}: k must be an int or an integer tensor [B], got {type(k).__name__} {k!r}")
    if k < 0:
        raise ValueError(f"{_OP}: k must be >= 0, got {k}")


def _expect_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{_OP}: {name} must be a float, got {type(value).__name__} {value!r}")


def _describe(k) -> str:
    return f"<{k.dtype} tensor of shape {list(k.shape)}>" if isinstance(k, Tensor) else repr(k)
