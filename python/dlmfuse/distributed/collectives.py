"""The one collective the vocabulary-parallel code uses (an all-gather of a few numbers per row),
and a count of the bytes it sends.

Results combine gathered numbers rather than all-reducing them: a softmax over shards needs
max-then-rescale, not a sum, and combining every rank's numbers in rank order makes every rank
compute bit-identical tokens and confidences (which the generation loop needs: all ranks must
write the same tokens).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_rows", "count_sent_bytes", "SentBytes", "group_size"]

# all_gather_single replaces all_gather_into_tensor in recent torch; dlmfuse supports both.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class SentBytes:
    """Bytes this rank sent through :func:`all_gather_rows` while counting (a ring all-gather
    sends every rank's block on to the next rank: (world - 1) x this rank's block)."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0


_counters: list = []


@contextlib.contextmanager
def count_sent_bytes() -> Iterator[SentBytes]:
    """Counts what :func:`all_gather_rows` sends inside the block (in this process)."""
    counter = SentBytes()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def group_size(group) -> int:
    return dist.get_world_size(group)


def all_gather_rows(t: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """``[world, *t.shape]``: every rank's ``t`` (same shape and dtype on every rank), in rank order."""
    world = dist.get_world_size(group)
    flat = t.reshape(1, -1).contiguous()  # the output is the inputs concatenated along dim 0
    out = flat.new_empty((world, flat.shape[1]))
    _all_gather(out, flat, group=group)
    for counter in _counters:
        counter.bytes += (world - 1) * flat.numel() * flat.element_size()
        counter.calls += 1
    return out.view(world, *t.shape)
