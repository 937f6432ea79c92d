"""Pure-PyTorch reference of dlmfuse.select_unmask (ground truth for tests).

Written from the contract alone: a Python loop over rows, candidates sorted with ``sorted()`` by
(confidence descending, position ascending), NaN ranked as -inf, and the per-row rule applied to
Python floats (float64). Reads everything on the host: not capturable, not fast, obviously right.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["select_unmask"]


def select_unmask(confidence: Tensor, candidates: Tensor, *, k: Union[int, Tensor, None] = None,
                  threshold: Optional[float] = None, factor: Optional[float] = None) -> Tensor:
    """bool ``[B, L]``: per row, the candidates chosen by exactly one of k / threshold / factor.

    k: the k most confident candidates (all when fewer); threshold: those with confidence >
    threshold, at least the best one; factor: the longest prefix of the sorted candidates with
    ``c(m) >= 1 - factor / (m + 1)`` (m = 1 always). Ties go to the lower position.
    """
    if sum(x is not None for x in (k, threshold, factor)) != 1:
        raise ValueError("select_unmask: give exactly one of k, threshold, factor")
    conf = confidence.detach().to("cpu", torch.float64).tolist()
    cand = candidates.detach().cpu().tolist()
    ks = k.detach().cpu().reshape(-1).tolist() if isinstance(k, Tensor) else None
    out = []
    for b, (conf_row, cand_row) in enumerate(zip(conf, cand)):
        value = [-math.inf if math.isnan(c) else c for c in conf_row]
        ranked = sorted((j for j, is_cand in enumerate(cand_row) if is_cand), key=lambda j: (-value[j], j))
        if k is not None:
            k_row = int(k) if ks is None else int(ks[b] if len(ks) > 1 else ks[0])
            n = min(max(k_row, 0), len(ranked))
        elif threshold is not None:
            n = sum(1 for j in ranked if value[j] > threshold)
            if ranked:
                n = max(n, 1)
        else:
            n = 0
            for m, j in enumerate(ranked, start=1):
                if m > 1 and not value[j] >= 1 - factor / (m + 1):
                    break
                n = m
        chosen = set(ranked[:n])
        out.append([j in chosen for j in range(len(cand_row))])
    return torch.tensor(out, dtype=torch.bool).reshape(candidates.shape).to(confidence.device)
