"""Device-side decisions of the refinement samplers (ReMDM's remasking, LLaDA 2.1's token edits).

Each function is a handful of elementwise / reduction torch ops on ``[B, L]`` tensors: no host
read, no data-dependent shape, so a step's decision can be captured in a CUDA graph or traced by
``torch.compile(fullgraph=True)`` (tests/test_refinement_samplers.py traces them).
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch
from torch import Tensor

__all__ = ["remask_and_unmask", "confidence_weights", "token_edits", "fed_columns"]


def remask_and_unmask(masked: Tensor, decoded: Tensor, uniforms: Tensor, remask_probability: Union[float, Tensor],
                      unmask_probability: float) -> Tuple[Tensor, Tensor]:
    """ReMDM's per-column transition, decided by one uniform per column: a decoded column returns
    to the mask when ``u < remask_probability`` (sigma, a float or a float64 ``[B, L]``), a masked
    column takes a token when ``u < unmask_probability``. A column is one or the other, so one
    uniform serves both. Returns ``(remask, unmask)``, bool ``[B, L]``."""
    remask = decoded & (uniforms < remask_probability)
    unmask = masked & (uniforms < unmask_probability)
    return remask, unmask


def confidence_weights(confidence: Tensor, decoded: Tensor) -> Tensor:
    """ReMDM-conf's eta_conf: per row, ``softmax(-psi)`` over the decoded columns (psi = the
    probability a token had when it was unmasked), 0 at every other column and in rows with no
    decoded column. float64 ``[B, L]``."""
    scores = torch.where(decoded, -confidence.to(torch.float64), -math.inf)
    return torch.softmax(scores, dim=1).nan_to_num(0.0)  # a row of -inf only: NaN -> 0


def token_edits(tokens: Tensor, confidence: Tensor, current: Tensor, editable: Tensor, threshold: float) -> Tensor:
    """LLaDA 2.1's token-to-token rule: an editable (already decoded) column takes the proposed
    token when it differs from the current one and its confidence exceeds `threshold`. bool,
    the shape of `tokens`."""
    return editable & (tokens != current) & (confidence > threshold)


def fed_columns(fed: Tensor, fillers: Tensor, count: int) -> Tensor:
    """``count`` distinct columns per row: the True columns of ``fed [B, L]`` first, then (rows
    with fewer) the lowest `fillers` columns, in ascending order within each part. int64
    ``[B, count]``; `count` must not exceed any row's ``(fed | fillers).sum()``."""
    length = fed.shape[1]
    cols = torch.arange(length, device=fed.device).expand_as(fed)
    key = torch.where(fed, cols, torch.where(fillers, cols + length, cols + 2 * length))
    return key.sort(dim=1).values[:, :count] % length
