"""Token sampling benchmarks (DESIGN.md §8 S1 on CUDA; [8, 32, 32000] fp32 and bf16 on CPU)
against LLaDA's float64 Gumbel path, torch greedy softmax + max and the read-once floor:
``python -m dlmfuse bench --only sampling`` as a script, same flags. The implementation lives in
``dlmfuse.bench.sampling`` so that it also runs from a wheel."""

import argparse
import sys

from dlmfuse import bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    bench.add_arguments(parser, families=False)
    args = parser.parse_args()
    args.only = ["sampling"]
    return bench.main(args, command=bench.reproducer(["python", sys.argv[0]], sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
