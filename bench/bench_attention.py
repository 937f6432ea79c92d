"""Attention benchmarks (docs/benchmarks.md: A1-A4, A4g and A6 on CUDA, C1, C3 and CPU-sized A1/A2/A4 on CPU) against
torch SDPA and FlexAttention: ``python -m dlmfuse bench --only attention`` as a script, same flags.
The implementation lives in ``dlmfuse.bench.attention`` so that it also runs from a wheel."""

import sys

from dlmfuse import bench

if __name__ == "__main__":
    sys.exit(bench.script_main("attention", __doc__))
