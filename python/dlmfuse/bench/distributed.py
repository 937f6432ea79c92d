"""Tensor-parallel benchmarks on the CPU (workloads D1, D2 of docs/benchmarks.md): 2 ranks in a
local gloo group (one thread each) against one rank, and vocabulary-parallel sampling against
gathering the logits.

Rows of each workload:

* ``dlmfuse``: 2 ranks (:func:`dlmfuse.distributed.tensor_parallel`), the logits sampled where
  they lie (one all-gather of ``STATS_PER_ROW`` float64 per row);
* ``gather-logits``: the same 2 ranks, but every rank all-gathers the logits and samples the
  whole rows (what a tensor-parallel stack without vocabulary-parallel sampling does);
* ``one-rank``: the unsharded model (or the whole logits) in one process with one thread.

Workloads: D1, one denoising step of a small random DenoiserLM (4 layers, hidden 512, 8 heads
over 4 KV heads, MLP 1408, vocabulary 32000, fp32): the forward of a 128-token sequence with
logits for the 32 rows of the current block, then sampling (temperature 1, confidence prob); D2,
sampling alone on logits ``[8, 32, 32000]`` fp32.

The ranks live in :class:`dlmfuse.distributed.RankPool` processes started at the first workload
(a few seconds) and kept until the run ends; the harness times a call in this process, which
sends the step to every rank and waits for all of them, so each time includes ~0.1-0.5 ms of
pipe round trip (as the one-rank row does). Every row returns rank 0's tokens: ``max |diff|``
against dlmfuse is the largest token id difference (0 = the same tokens; the one-rank model's
logits differ from the sharded ones by float rounding, so a near-tie may flip).

``stats`` (printed below the table): ``bytes_sent_per_rank`` in one sampling step (counted at
the all-gathers: (ranks - 1) x a rank's block, ring all-gather), ``bytes_per_row`` and
``rows``. CPU only (gloo): NCCL on GPUs is not benchmarked here.
"""

from __future__ import annotations

import atexit
import functools
import sys
from dataclasses import asdict, dataclass

import torch

from .common import DLMFUSE, Case, Impl, Workload

FAMILY = "distributed"
ONE_RANK, GATHER = "one-rank", "gather-logits"
PEERS = (ONE_RANK, GATHER)
WORLD = 2
SEED = 0
SAMPLING = dict(temperature=1.0, seed=SEED, offset=4, confidence="prob")

__all__ = ["FAMILY", "PEERS", "DistSpec", "workload", "workloads", "close_pools"]


@dataclass(frozen=True)
class DistSpec:
    """A step (``kind="step"``: forward + sampling of a DenoiserLM) or sampling alone
    (``kind="sampling"``: logits ``[B, rows, V]``)."""

    id: str
    kind: str
    B: int = 1
    L: int = 128
    rows: int = 32
    V: int = 32000
    hidden: int = 512
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 1408

    @property
    def desc(self) -> str:
        if self.kind == "step":
            return f"TP step {self.layers}x{self.hidden} V={self.V} L={self.L} rows={self.rows} ranks={WORLD}"
        return f"TP sampling [{self.B}, {self.rows}, {self.V}] ranks={WORLD}"


def workloads(device: torch.device, quick: bool) -> list[Workload]:
    """D1 and D2 on the CPU (the same with or without ``quick``); none on CUDA."""
    if device.type != "cpu":
        print("distributed bench: CPU only (gloo ranks); run it with --device cpu", file=sys.stderr)
        return []
    return [workload(DistSpec("D1", "step")), workload(DistSpec("D2", "sampling", B=8))]


def workload(spec: DistSpec) -> Workload:
    """A benchmark row for ``spec``; its ranks start when it runs."""
    return Workload(id=spec.id, desc=spec.desc, family=FAMILY, params={**asdict(spec), "ranks": WORLD},
                    setup=functools.partial(_setup, spec))


# --------------------------------------------------------------------------------- the ranks
_pools: dict = {}


def _pool(world: int):
    """The run's pool of ``world`` ranks (started once, ended by :func:`close_pools` or at exit)."""
    from dlmfuse.distributed import RankPool

    if not _pools:
        atexit.register(close_pools)
    if world not in _pools or _pools[world].closed:
        _pools[world] = RankPool(world, threads=1, timeout=300.0)
    return _pools[world]


def close_pools() -> None:
    """Ends the ranks the workloads started."""
    while _pools:
        _pools.popitem()[1].close()


def _setup(spec: DistSpec, device: torch.device) -> Case:
    sent: dict = {}

    def implementation(name: str, world: int, kind: str) -> Impl:
        def prepare():
            pool = _pool(world)
            sent[name] = pool.run(_prepare_rank, spec, name, world > 1)[0]
            return functools.partial(_step_all, pool, name)
        return Impl(name, prepare, to_common=lambda tokens: tokens.float(), kind=kind)

    def stats(_times: dict) -> dict:
        rows = spec.B * spec.rows
        return {name: {"bytes_sent_per_rank": value, "bytes_per_row": value / rows, "rows": rows}
                for name, value in sent.items()}

    return Case(impls=[implementation(DLMFUSE, WORLD, DLMFUSE), implementation(GATHER, WORLD, "peer"),
                       implementation(ONE_RANK, 1, "peer")], stats=stats)


def _step_all(pool, name: str) -> torch.Tensor:
    return pool.run(_step_rank, name)[0]


def _prepare_rank(spec: DistSpec, name: str, sharded: bool) -> int:
    """Builds this rank's inputs for implementation ``name``; returns the bytes one sampling
    step sends from this rank."""
    import dlmfuse
    from dlmfuse.distributed import count_sent_bytes, rank_state

    torch.set_grad_enabled(False)
    logits_of = rank_state.get((spec, sharded))  # dlmfuse and gather-logits share the model
    if logits_of is None:
        logits_of = rank_state[(spec, sharded)] = _inputs(spec, sharded)
    step = functools.partial(_sample, logits_of, name == GATHER)
    rank_state[name] = step
    with count_sent_bytes() as sent:  # the sampling's all-gathers (the forward's all-reduces aside)
        step()
    return sent.bytes


def _inputs(spec: DistSpec, sharded: bool):
    """A callable returning the step's logits: the model's forward, or fixed logits."""
    import dlmfuse

    torch.manual_seed(SEED)
    if spec.kind == "step":
        model = dlmfuse.nn.DenoiserLM(spec.V, spec.hidden, spec.layers, spec.heads, spec.kv_heads,
                                      spec.intermediate)
        if sharded:
            from torch.distributed.device_mesh import init_device_mesh
            dlmfuse.distributed.tensor_parallel(model, init_device_mesh("cpu", (WORLD,)))
        ids = torch.randint(0, spec.V, (spec.B, spec.L))
        rows = torch.arange(spec.L - spec.rows, spec.L).expand(spec.B, -1)
        logits_of = functools.partial(model, ids, logits_for=rows)
    else:
        logits = torch.randn(spec.B, spec.rows, spec.V) * 4
        if sharded:
            logits = _as_vocabulary_shards(logits)
        logits_of = functools.partial(_same, logits)
    return logits_of


def _same(value):
    return value


def _as_vocabulary_shards(logits: torch.Tensor):
    """This rank's columns of ``logits`` as a Shard(-1) DTensor (what a sharded LM head returns)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    width = logits.shape[-1] // dist.get_world_size()
    local = logits[..., dist.get_rank() * width:(dist.get_rank() + 1) * width].contiguous()
    return DTensor.from_local(local, init_device_mesh("cpu", (dist.get_world_size(),)), [Shard(-1)])


def _sample(logits_of, gather: bool) -> torch.Tensor:
    """One sampling step on the logits ``logits_of()`` returns: where they lie, or gathered first."""
    import dlmfuse
    from dlmfuse.distributed.collectives import all_gather_rows

    logits = logits_of()
    if gather and hasattr(logits, "to_local"):
        local = logits.to_local()
        shards = all_gather_rows(local, None)  # [ranks, B, n, V / ranks]
        logits = torch.cat(shards.unbind(0), dim=-1)
    return dlmfuse.sample_tokens(logits, **SAMPLING)[0]


def _step_rank(name: str) -> torch.Tensor:
    from dlmfuse.distributed import rank_state

    return rank_state[name]()
