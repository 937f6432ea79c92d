"""dlmfuse benchmarks (the main job: ``python -m dlmfuse bench``), shipped inside the package so
that they run from an installed wheel.

Each op family is one module with ``FAMILY`` (its name), ``PEERS`` (implementation names it
compares with) and ``workloads(device, quick) -> list[Workload]``; adding a family means adding
its module to ``FAMILIES``. The harness (timing, rows, table, JSONL, plot) is in ``common``.

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

from . import attention, backward, generate, kv_cache, sampling
from .common import (MissingMatplotlib, Timing, Workload, default_timing, is_skipped,
                     run as _run_harness)

# Registered op families, in the order the main job runs them.
FAMILIES = {module.FAMILY: module for module in (attention, backward, kv_cache, sampling, generate)}

__all__ = ["FAMILIES", "add_arguments", "main", "reproducer", "resolve_device", "run"]


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA when a GPU is visible, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def reproducer(prefix: Sequence[str], argv: Sequence[str]) -> str:
    """The command line that reproduces this run, e.g. ``python -m dlmfuse bench --quick``."""
    return shlex.join([*prefix, *argv])


def run(workloads: Sequence[Workload], *, device: Optional[torch.device] = None,
        quick: bool = False, timing: Optional[Timing] = None, skip: Iterable[str] = (),
        command: Optional[str] = None, json_path: Optional[str] = None,
        plot_path: Optional[str] = None, out=None, progress=None) -> list[dict]:
    """Run explicit ``workloads`` (e.g. tiny ones in tests); returns the JSONL rows as dicts.

    ``skip`` names peers not to run ("flex" also drops "flex.create_block_mask"); ``timing``
    overrides the warm-up/repeat counts that ``quick`` and the device would choose.
    """
    device = device if device is not None else resolve_device()
    return _run_harness(workloads, device=device,
                        timing=timing if timing is not None else default_timing(device, quick),
                        skip=skip, command=command if command is not None else shlex.join(sys.argv),
                        json_path=json_path, plot_path=plot_path,
                        out=out if out is not None else sys.stdout,
                        progress=progress if progress is not None else sys.stderr)


def _all_peers() -> list[str]:
    return sorted({peer for module in FAMILIES.values() for peer in module.PEERS})


def add_arguments(parser: argparse.ArgumentParser, *, families: bool = True) -> None:
    """The bench flags, shared by ``python -m dlmfuse bench`` and ``bench/bench_*.py``."""
    peers = _all_peers()
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats (and on CPU, drop the largest shapes): a few minutes")
    parser.add_argument("--json", metavar="PATH",
                        help="write one JSON line per (workload, implementation), with device, "
                             "versions, git SHA and the reproducer command (file is overwritten)")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG bar chart of peer/dlmfuse time ratios (needs matplotlib)")
    if families:
        parser.add_argument("--only", action="append", choices=sorted(FAMILIES), metavar="FAMILY",
                            help=f"run only this op family (repeatable; one of: "
                                 f"{', '.join(FAMILIES)}); default: all")
    parser.add_argument("--skip", action="append", default=[], metavar="PEER",
                        help=f"do not run this peer (repeatable; a prefix such as 'flex' or "
                             f"'sdpa' also drops its variants): {', '.join(peers)}")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device whose workloads run (default: cuda if available, else cpu)")


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
    names = getattr(args, "only", None) or list(FAMILIES)
    workloads = [w for name in names for w in FAMILIES[name].workloads(device, args.quick)]
    try:
        run(workloads, device=device, quick=args.quick, skip=args.skip, command=command,
            json_path=args.json, plot_path=args.plot)
    except MissingMatplotlib as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
