"""Pure-PyTorch reference of dlmfuse.kv_scatter_ (ground truth for tests; the fallback on devices
without a native kernel). validate=True reads positions on the host; validate=False does not
(capturable), at the price of rewriting the whole cache."""

from __future__ import annotations

import torch
from torch import Tensor


def kv_scatter_(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, positions: Tensor, *, validate: bool = True) -> None:
    """``k_cache[b, positions[b, i]] = k_new[b, i]`` (same for v) in place.

    validate=True raises ValueError for out-of-range or duplicated positions before writing;
    validate=False skips out-of-range rows, and a position repeated within a row gets the last of
    its new rows.
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
    # Sync-free write (CUDA-graph capturable): map every cache slot to the new row that lands
    # there (-1: none; the largest row index when several land on one slot); out-of-range rows
    # are sent to a spare column and dropped.
    batch, n = pos.shape
    slot = torch.where(valid, pos, torch.full_like(pos, max_len))
    rows = torch.arange(n, device=pos.device).expand(batch, n)
    source = torch.full((batch, max_len + 1), -1, dtype=torch.int64, device=pos.device)
    source = source.scatter_reduce(1, slot, rows, reduce="amax")[:, :max_len]
    written = (source >= 0)[..., None, None]
    batch_idx = torch.arange(batch, device=pos.device)[:, None]
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        if n == 0:
            continue
        cache.copy_(torch.where(written, new[batch_idx, source.clamp(min=0)], cache))
