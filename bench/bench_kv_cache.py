"""KV-cache scatter benchmarks (DESIGN.md §8 K1 on CUDA; a CPU-sized K1 on CPU) against
index_copy_ and advanced indexing: ``python -m dlmfuse bench --only kv_cache`` as a script, same
flags. The implementation lives in ``dlmfuse.bench.kv_cache`` so that it also runs from a wheel."""

import argparse
import sys

from dlmfuse import bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    bench.add_arguments(parser, families=False)
    args = parser.parse_args()
    args.only = ["kv_cache"]
    return bench.main(args, command=bench.reproducer(["python", sys.argv[0]], sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
