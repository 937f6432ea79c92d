"""What the benchmark harness is made of: workloads, implementations, timings, the environment.

A family module (``attention.py``, ``kv_cache.py``, ``sampling.py``, ...) only describes *what* to
run: a list of :class:`Workload`, each of which builds a :class:`Case` holding the implementations
to compare (dlmfuse first, then its peers). :mod:`.runner` decides *how* it is run, identically
for every family, :mod:`.report` and :mod:`.plot` how it is shown; ``docs/benchmarks.md`` describes
the workloads and how to read the output.

Two hooks serve end-to-end rows (``generate``), whose calls take seconds: a workload may carry
its own :class:`Timing`, and a case may add family-specific numbers to its rows (``stats``:
tokens/s, steps, token agreement), printed below the table.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

DLMFUSE = "dlmfuse"   # name of the implementation every peer is compared with
MAX_ERROR_CHARS = 500  # a peer's failure reason is cut to this length in rows and tables

# Implementation kinds.
#: dlmfuse itself; "dlmfuse.<variant>" rows (e.g. a cache mode) are of this kind too.
KIND_DLMFUSE = DLMFUSE
#: a competitor: ratio, verdict, plotted.
KIND_PEER = "peer"
#: a cost a peer pays besides its kernel (e.g. building a BlockMask): ratio, not plotted.
KIND_OVERHEAD = "overhead"
#: a lower bound on the time (e.g. reading the input once): reported as "% of floor", not a peer.
KIND_FLOOR = "floor"
KINDS = (KIND_DLMFUSE, KIND_PEER, KIND_OVERHEAD, KIND_FLOOR)


@dataclass
class Impl:
    """One implementation of a workload.

    ``prepare()`` does the untimed setup (layout copies, BlockMask, compilation happens on the
    first call) and returns the callable that is timed. ``to_common`` maps that callable's output
    to dlmfuse's output layout for the correctness check; None means "nothing to compare" (e.g. a
    mask-building overhead). ``kind`` is one of KINDS. ``peers`` (dlmfuse kinds only): the peers
    this row is compared with (None: every peer of the workload), e.g. greedy sampling only
    against greedy peers.
    """

    name: str
    prepare: Callable[[], Callable[[], Any]]
    to_common: Optional[Callable[[Any], torch.Tensor]] = None
    kind: str = KIND_PEER
    # The call can be captured in a CUDA graph (no host sync): on CUDA its row also reports
    # graph_time_ms, the time of a graph replay, i.e. the device time without launch overhead.
    graph: bool = False
    peers: Optional[tuple] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"bench Impl {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")


@dataclass
class Case:
    """The inputs of one workload, built on the device, and the work they represent."""

    impls: list[Impl]
    flops_dense: Optional[float] = None    # as if every (query, key) pair were computed
    flops_visible: Optional[float] = None  # only the visible pairs ("effective" FLOP/s)
    bytes_read: Optional[float] = None     # minimum bytes an implementation must read, for GB/s
    # {impl name: median seconds} of the implementations that ran -> {impl name: {stat: value}},
    # stored in those rows' "stats" (called once, after every implementation ran).
    stats: Optional[Callable[[dict], dict]] = None


@dataclass
class Workload:
    """A fixed benchmark row (docs/benchmarks.md). ``setup(device)`` allocates its inputs lazily."""

    id: str           # workload id of docs/benchmarks.md, e.g. "A2" or "C1"
    desc: str         # short human description, e.g. "block-causal L=1024"
    family: str       # op family, e.g. "attention"
    params: dict      # shapes and dtypes, copied into every JSONL row
    setup: Callable[[torch.device], Case]
    timing: Optional[Timing] = None  # replaces the run's warm-up/repeats (seconds-long calls)


@dataclass
class Timing:
    """How many untimed warm-up rounds and timed rounds each implementation gets (one call per
    implementation per round)."""

    warmup: int
    repeats: int


def default_timing(device: torch.device, quick: bool) -> Timing:
    if device.type == "cuda":
        return Timing(warmup=5, repeats=20) if quick else Timing(warmup=10, repeats=100)
    return Timing(warmup=1, repeats=5) if quick else Timing(warmup=3, repeats=10)


def format_ratio(ratio: float) -> str:
    """``0.52``, ``1.71``, ``14.2``, ``378``: about three significant digits."""
    decimals = 2 if ratio < 10 else 1 if ratio < 100 else 0
    return f"{ratio:.{decimals}f}"


def format_time(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    if ms < 1.0:
        us = ms * 1e3
        return f"{us:.1f} us" if us < 100 else f"{us:.0f} us"
    if ms >= 1e3:
        return f"{format_ratio(ms / 1e3)} s"
    decimals = 2 if ms < 10 else 1 if ms < 100 else 0
    return f"{ms:.{decimals}f} ms"


# ---------------------------------------------------------------------------------- environment

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # OMP_WAIT_POLICY: whether torch's OpenMP threads spin between ops (python -m dlmfuse bench sets
    # PASSIVE, so that they do not hold the cores of the implementation timed next).
    return (f"{model} ({os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")


def git_sha() -> str:
    """DLMFUSE_GIT_SHA when set (scripts/gpu_check.sh sets it to the commit the carried wheel was
    built from: a device machine's copy of the checkout may carry stale git metadata), else HEAD
    of the checkout dlmfuse was loaded from (else of the cwd), or "unknown"."""
    if os.environ.get("DLMFUSE_GIT_SHA"):
        return os.environ["DLMFUSE_GIT_SHA"]
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for where in (package_dir, os.getcwd()):
        try:
            result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                                    text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    return "unknown"


def environment(device: torch.device, command: str) -> dict:
    """What every row records so that a number can be traced and reproduced."""
    import dlmfuse

    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dlmfuse": dlmfuse.__version__,
        "build_info": dlmfuse.build_info(),
        "git_sha": git_sha(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


