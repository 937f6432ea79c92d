"""Command line: ``python -m dlmfuse bench`` (the main job), ``python -m dlmfuse eval``,
``python -m dlmfuse info`` and ``python -m dlmfuse --version``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, bench, evaluation

    parser = argparse.ArgumentParser(
        prog="python -m dlmfuse",
        description="dlmfuse: compiled kernels for masked diffusion language models.")
    parser.add_argument("--version", action="version", version=f"dlmfuse {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench_parser = commands.add_parser(
        "bench", help="benchmark dlmfuse against torch SDPA, FlexAttention and other peers in the same run",
        description="Run the benchmark workloads that fit this device (CUDA: A1-A6 and A4g, K1, S1, E1; "
                    "CPU: C1, C2, C3, CPU-sized A1/A2/A4, K1, S1, E1; defined in docs/benchmarks.md). "
                    "dlmfuse and its peers are timed in interleaved rounds; the table gives, per "
                    "dlmfuse row, the best peer, the ratio peer time / dlmfuse time (>1: dlmfuse "
                    "faster) with its spread (interquartile range over the rounds) and a verdict, and "
                    "warns when the spread or a busy machine does not support a ratio.",
        epilog="example: python -m dlmfuse bench --quick --json bench_out/cpu.jsonl "
               "--plot bench_out/cpu.png  (how to read the output: docs/benchmarks.md in the dlmfuse repository)")
    bench.add_arguments(bench_parser)
    eval_parser = commands.add_parser(
        "eval", help="speed against quality of every sampler on the shipped tiny code model",
        description="On the tiny masked-diffusion code model shipped with dlmfuse: the held-out NLL bound "
                    "against a unigram baseline, then per sampler and cache mode the tokens per forward "
                    "pass, the wall time and the share of completions of held-out functions that "
                    "compile. Seeded: the same numbers on every run (the times aside).",
        epilog="example: python -m dlmfuse eval --quick --json eval_out/eval.jsonl --plot eval_out/eval.png "
               "(definitions: docs/evaluation.md in the dlmfuse repository)")
    evaluation.add_arguments(eval_parser)
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

    command = bench.reproducer(["python", "-m", "dlmfuse"], argv)
    if args.command == "eval":
        from . import evaluation

        return evaluation.main(args, command=command)
    return bench.main(args, command=command)


# torch's OpenMP threads spin for a while after each parallel region; in interleaved rounds they then
# hold the cores the next implementation needs (measured: dlmfuse's C1 20% slower right after SDPA).
# Passive waiting must be chosen before torch starts its runtime, so the bench re-runs itself with it.
_WAIT_POLICY = "OMP_WAIT_POLICY"


def _rerun_with_passive_openmp(argv: Sequence[str]) -> None:
    if argv[:1] == ["bench"] and _WAIT_POLICY not in os.environ:
        os.execve(sys.executable, [sys.executable, "-m", "dlmfuse", *argv], {**os.environ, _WAIT_POLICY: "PASSIVE"})


if __name__ == "__main__":
    _rerun_with_passive_openmp(sys.argv[1:])
    sys.exit(main())
