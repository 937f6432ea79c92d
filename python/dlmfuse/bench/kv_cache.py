"""KV-cache scatter benchmarks: workload K1 of docs/benchmarks.md on CUDA, a CPU-sized K1 on CPU.

Every workload writes ``n`` new rows per sequence, at random distinct positions (sorted within a
row), into K and V caches ``[B, Lmax, H, D]`` that hold random values, and times
``dlmfuse.kv_scatter_`` (one call for K and V) against what a user writes with torch today, two
calls each (K, then V), in the same run:

* ``index_copy_``: ``k_cache.view(B * Lmax, H, D).index_copy_(0, flat, k_new.view(B * n, H, D))``
  with ``flat = positions + b * Lmax`` computed in the timed call (positions change every step).
  This flattened form is the fastest honest one: a loop of ``k_cache[b].index_copy_(0,
  positions[b], k_new[b])`` over the batch pays B launches per cache instead of one.
* ``index_put_``: advanced indexing ``k_cache[b_idx, positions] = k_new`` with the constant
  ``b_idx = arange(B)[:, None]`` built beforehand, as a user would hoist it.

and the bandwidth floor ``floor.copy_``: ``k_out.copy_(k_new); v_out.copy_(v_new)`` into
contiguous buffers of the new rows' shape, the same bytes read and written as the scatter with
none of its addressing (a floor, not a peer: the report gives dlmfuse's "% of floor").

Each shape runs twice, as two workloads: once with ``validate=True`` (the default: positions are
checked on the host before any write, a device-to-host copy on CUDA) and once with
``validate=False`` (no host sync, CUDA-graph capturable; out-of-range rows are skipped), so that
every peer has a ratio against both and both are checked against every peer.

Correctness, in the run: every implementation starts from the same random cache contents and its
output is the whole cache pair after its calls; ``max |diff|`` is 0.0 exactly when the caches are
bit-identical (new rows written, nothing else changed).

Bandwidth: ``gbps`` counts ``2 x (K + V new rows)`` bytes, i.e. the new rows read once and
written once, the floor of any scatter.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

import dlmfuse

from .common import DLMFUSE, KIND_FLOOR, Case, Impl, Workload

FAMILY = "kv_cache"
PEERS = ("index_copy_", "index_put_", "floor.copy_")
SEED = 0


@dataclass(frozen=True)
class KVSpec:
    """Shape of one scatter: caches ``[B, Lmax, H, D]``, ``n`` new rows per sequence."""

    id: str
    n: int
    B: int = 4
    Lmax: int = 2048
    H: int = 8
    D: int = 128
    dtype: str = "float32"
    validate: bool = True

    @property
    def desc(self) -> str:
        return (f"scatter n={self.n} B={self.B} Lmax={self.Lmax} H={self.H} {self.dtype} "
                f"validate={self.validate}")

    @property
    def moved_bytes(self) -> int:
        """New K and V rows read once and written once."""
        itemsize = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return 2 * 2 * self.B * self.n * self.H * self.D * itemsize


def workload(spec: KVSpec) -> Workload:
    """A benchmark row for ``spec``; its inputs are allocated only when it runs."""
    if not 0 < spec.n <= spec.Lmax:
        raise ValueError(f"kv_cache bench: n must be in [1, Lmax={spec.Lmax}], got {spec.n}")
    return Workload(id=spec.id, desc=spec.desc, family=FAMILY, params=asdict(spec),
                    setup=functools.partial(_setup, spec))


def workloads(device: torch.device, quick: bool) -> list[Workload]:
    """K1 on CUDA; on CPU a CPU-sized K1 (the same list with or without ``quick``).

    The full K1 shape is left out on CPU: on the 2-core dev machine one such workload takes
    ~17 s, nearly all of it allocating, filling and comparing its 0.5 GB of caches;
    ``workload(KVSpec("K1", n=256, B=8, Lmax=4096, H=32, dtype="bfloat16"))`` runs it by hand.
    """
    if device.type == "cuda":
        shape = dict(B=8, Lmax=4096, H=32, D=128, dtype="bfloat16")  # K1: LLaDA-8B's K/V heads
    else:
        shape = dict(B=4, Lmax=2048, H=8, D=128, dtype="float32")
    return [workload(KVSpec("K1", n=n, validate=validate, **shape))
            for n in (32, 256) for validate in (True, False)]


def _setup(spec: KVSpec, device: torch.device) -> Case:
    """Allocate the caches and new rows of ``spec`` on ``device`` and list the implementations."""
    gen = torch.Generator(device=device).manual_seed(SEED)
    dtype = getattr(torch, spec.dtype)
    B, Lmax, H, D, n = spec.B, spec.Lmax, spec.H, spec.D, spec.n

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    initial_k, initial_v = randn(B, Lmax, H, D), randn(B, Lmax, H, D)
    k_new, v_new = randn(B, n, H, D), randn(B, n, H, D)
    positions = torch.rand(B, Lmax, generator=gen, device=device).argsort(dim=-1)[:, :n]
    positions = positions.sort(dim=-1).values  # int64 [B, n], distinct within a row
    # One working pair shared by all implementations, reset to the initial contents before each
    # (untimed); the repeated timed calls rewrite the same rows, so the end state is the result.
    k_cache, v_cache = torch.empty_like(initial_k), torch.empty_like(initial_v)

    def fresh(call):
        def prepare():
            k_cache.copy_(initial_k)
            v_cache.copy_(initial_v)
            return call
        return prepare

    def caches(_out) -> torch.Tensor:
        return torch.stack((k_cache, v_cache))  # a copy: the next prepare() resets the pair

    def dlmfuse_call():
        dlmfuse.kv_scatter_(k_cache, v_cache, k_new, v_new, positions, validate=spec.validate)

    row_offsets = torch.arange(B, device=device)[:, None] * Lmax  # [B, 1]
    k_rows, v_rows = k_cache.view(B * Lmax, H, D), v_cache.view(B * Lmax, H, D)
    k_new_rows, v_new_rows = k_new.view(B * n, H, D), v_new.view(B * n, H, D)

    def index_copy_call():
        flat = (positions + row_offsets).view(-1)
        k_rows.index_copy_(0, flat, k_new_rows)
        v_rows.index_copy_(0, flat, v_new_rows)

    batch_index = torch.arange(B, device=device)[:, None]  # [B, 1], broadcast against positions

    def index_put_call():
        k_cache[batch_index, positions] = k_new
        v_cache[batch_index, positions] = v_new

    k_out, v_out = torch.empty_like(k_new), torch.empty_like(v_new)

    def copy_floor():
        k_out.copy_(k_new)
        v_out.copy_(v_new)

    # validate=True reads the positions on the host: no CUDA graph for it.
    impls = [Impl(DLMFUSE, fresh(dlmfuse_call), to_common=caches, kind=DLMFUSE, graph=not spec.validate),
             Impl("index_copy_", fresh(index_copy_call), to_common=caches, graph=True),
             Impl("index_put_", fresh(index_put_call), to_common=caches, graph=True),
             Impl("floor.copy_", lambda: copy_floor, kind=KIND_FLOOR, graph=True)]
    return Case(impls=impls, bytes_read=spec.moved_bytes)
