"""Pure-PyTorch reference of dlmfuse.kv_scatter_ (ground truth for tests; the fallback on devices
without a native kernel). Reads positions on the host, so it is not CUDA-graph capturable."""

from __future__ import annotations

import torch
from torch import Tensor


def kv_scatter_(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, positions: Tensor, *, validate: bool = True) -> None:
    """``k_cache[b, positions[b, i]] = k_new[b, i]`` (same for v) in place.

    validate=True raises ValueError for out-of-range or duplicated positions before writing;
    validate=False skips out-of-range rows.
    """
    max_len = k_cache.shape[1]
    pos = positions.to(torch.int64)
    valid = (pos >= 0) & (pos < max_len)
    if validate:
        if not bool(valid.all()):
            b, i = (int(x) for x in (~valid).nonzero()[0])
            raise ValueError(f"kv_scatter_: positions[{b}, {i}] = {int(pos[b, i])} is outside [0, Lmax={max_len})")
        sorted_pos = pos.sort(dim=1).values
        dup = sorted_pos[:, 1:] == sorted_pos[:, :-1]
        if bool(dup.any()):
            b, i = (int(x) for x in dup.nonzero()[0])
            raise ValueError(f"kv_scatter_: position {int(sorted_pos[b, i])} appears more than once in row {b} of positions")
    b_idx, i_idx = valid.nonzero(as_tuple=True)
    k_cache[b_idx, pos[b_idx, i_idx]] = k_new[b_idx, i_idx]
    v_cache[b_idx, pos[b_idx, i_idx]] = v_new[b_idx, i_idx]
