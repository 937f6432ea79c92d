"""dlmfuse benchmarks (the main job: ``python -m dlmfuse bench``), shipped inside the package so
that they run from an installed wheel.

Each op family is one module with ``FAMILY`` (its name), ``PEERS`` (implementation names it
compares with, floors included: the names ``--skip`` takes) and ``workloads(device, quick) ->
list[Workload]``; adding a family means adding its module to ``FAMILIES``. The harness: ``common``
(workloads, implementations, environment), ``runner`` (interleaved rounds, ratios), ``stats``
(medians, spreads, verdicts), ``machine`` (load and calibration), ``report`` (tables), ``plot``.
The workloads and how to read the output: docs/benchmarks.md.

Programmatic use, e.g. a tiny run without FlexAttention::

    from dlmfuse import bench
    from dlmfuse.bench.attention import AttnSpec, workload
    rows = bench.run([workload(AttnSpec("T1", "dense", L=64))], skip=["flex"], quick=True)
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Iterable, Optional, Sequence

import torch

from . import attention, backward, distributed, generate, kv_cache, sampling
from .common import Timing, Workload, default_timing
from .plot import MissingMatplotlib
from .runner import is_skipped, run as _run_harness

# Registered op families, in the order the main job runs them.
FAMILIES = {module.FAMILY: module for module in (attention, backward, kv_cache, sampling, generate, distributed)}
# Families a plain run leaves out (they start processes): run with --only.
OPT_IN_FAMILIES = (distributed.FAMILY,)

__all__ = ["FAMILIES", "OPT_IN_FAMILIES", "add_arguments", "main", "reproducer", "resolve_device", "run"]


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA when a GPU is visible, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def reproducer(prefix: Sequence[str], argv: Sequence[str]) -> str:
    """The command line that reproduces this run, e.g. ``python -m dlmfuse bench --quick``."""
    return shlex.join([*prefix, *argv])


def run(workloads: Sequence[Workload], *, device: Optional[torch.device] = None,
        quick: bool = False, timing: Optional[Timing] = None, repeats: Optional[int] = None,
        skip: Iterable[str] = (), command: Optional[str] = None, json_path: Optional[str] = None,
        plot_path: Optional[str] = None, wide: bool = False, out=None, progress=None) -> list[dict]:
    """Run explicit ``workloads`` (e.g. tiny ones in tests); returns the JSONL rows as dicts.

    ``skip`` names peers not to run ("flex" also drops "flex.create_block_mask"); ``timing``
    overrides the warm-up/round counts that ``quick`` and the device would choose, ``repeats`` the
    timed rounds of every workload (those with their own timing too); ``wide`` prints the full
    table before the compact one.
    """
    device = device if device is not None else resolve_device()
    if repeats is not None and (isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1):
        raise ValueError(f"bench.run: repeats must be a positive int, got {repeats!r}")
    return _run_harness(workloads, device=device,
                        timing=timing if timing is not None else default_timing(device, quick),
                        repeats=repeats, skip=skip,
                        command=command if command is not None else shlex.join(sys.argv),
                        json_path=json_path, plot_path=plot_path, wide=wide,
                        out=out if out is not None else sys.stdout,
                        progress=progress if progress is not None else sys.stderr)


def _all_peers() -> list[str]:
    return sorted({peer for module in FAMILIES.values() for peer in module.PEERS})


def add_arguments(parser: argparse.ArgumentParser, *, families: bool = True) -> None:
    """The bench flags, shared by ``python -m dlmfuse bench`` and ``bench/bench_*.py``."""
    peers = _all_peers()
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds (and on CPU, drop the largest shapes): a few minutes")
    parser.add_argument("--repeats", type=_positive_int, metavar="N",
                        help="timed rounds per workload, every workload (default: 5 with --quick, "
                             "10 without on CPU; 20 / 100 on CUDA; the generate family fewer); each "
                             "round times dlmfuse and every peer once, interleaved")
    parser.add_argument("--wide", action="store_true",
                        help="also print the full table: every implementation with its ratio and "
                             "spread (default: one line per dlmfuse row with its best peer)")
    parser.add_argument("--json", metavar="PATH",
                        help="write one JSON line per (workload, implementation), with device, "
                             "versions, git SHA and the reproducer command (file is overwritten)")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG chart of the peer/dlmfuse time ratios with their spread, one panel "
                             "per family (needs matplotlib)")
    if families:
        parser.add_argument("--only", action="append", choices=sorted(FAMILIES), metavar="FAMILY",
                            help=f"run only this op family (repeatable; one of: "
                                 f"{', '.join(FAMILIES)}); default: all but "
                                 f"{', '.join(OPT_IN_FAMILIES)}")
    parser.add_argument("--skip", action="append", default=[], metavar="PEER",
                        help=f"do not run this peer (repeatable; a prefix such as 'flex' or "
                             f"'sdpa' also drops its variants): {', '.join(peers)}")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device whose workloads run (default: cuda if available, else cpu)")


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def script_main(family: str, description: str) -> int:
    """Entry point of the thin per-family scripts in bench/ (same flags as ``python -m dlmfuse
    bench``, minus ``--only``)."""
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser, families=False)
    args = parser.parse_args()
    args.only = [family]
    return main(args, command=reproducer(["python", sys.argv[0]], sys.argv[1:]))


def main(args: argparse.Namespace, command: str) -> int:
    """Run the families selected by parsed ``args`` (from :func:`add_arguments`)."""
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    unknown = [s for s in args.skip if not any(is_skipped(peer, [s]) for peer in _all_peers())]
    if unknown:
        print(f"error: --skip {unknown[0]!r} names no peer (peers: {', '.join(_all_peers())})",
              file=sys.stderr)
        return 2
    names = getattr(args, "only", None) or [name for name in FAMILIES if name not in OPT_IN_FAMILIES]
    workloads = [w for name in names for w in FAMILIES[name].workloads(device, args.quick)]
    try:
        run(workloads, device=device, quick=args.quick, repeats=args.repeats, skip=args.skip,
            command=command, json_path=args.json, plot_path=args.plot, wide=args.wide)
    except MissingMatplotlib as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
