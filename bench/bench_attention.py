"""Attention benchmarks (DESIGN.md §8 A1-A4 on CUDA, C1 and CPU-sized A1/A2/A4 on CPU) against
torch SDPA and FlexAttention: ``python -m dlmfuse bench --only attention`` as a script, same flags.
The implementation lives in ``dlmfuse.bench.attention`` so that it also runs from a wheel."""

import argparse
import sys

from dlmfuse import bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    bench.add_arguments(parser, families=False)
    args = parser.parse_args()
    args.only = ["attention"]
    return bench.main(args, command=bench.reproducer(["python", sys.argv[0]], sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
