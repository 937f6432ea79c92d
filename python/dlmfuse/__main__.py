"""Command line: ``python -m dlmfuse bench`` (the main job) and ``python -m dlmfuse info``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from . import bench

    parser = argparse.ArgumentParser(
        prog="python -m dlmfuse",
        description="dlmfuse: compiled kernels for masked diffusion language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench_parser = commands.add_parser(
        "bench", help="benchmark dlmfuse against torch SDPA and FlexAttention in the same run",
        description="Run the DESIGN.md benchmark workloads that fit this device (CUDA: A1-A6 and "
                    "A4g, K1, S1, E1; CPU: C1, C2, C3, CPU-sized A1/A2/A4, K1, S1, E1), print a progress "
                    "line per workload and a "
                    "table of times with ratios peer/dlmfuse (>1: dlmfuse faster).",
        epilog="example: python -m dlmfuse bench --quick --json bench_out/cpu.jsonl "
               "--plot bench_out/cpu.png")
    bench.add_arguments(bench_parser)
    commands.add_parser("info", help="print dlmfuse.build_info() as JSON",
                        description="Print what this build of dlmfuse contains "
                                    "(version, CUDA on/off, CUDA architectures, ...) as JSON.")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from . import build_info

        print(json.dumps(build_info(), indent=2, sort_keys=True))
        return 0
    from . import bench

    return bench.main(args, command=bench.reproducer(["python", "-m", "dlmfuse"], argv))


if __name__ == "__main__":
    sys.exit(main())
