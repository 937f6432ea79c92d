"""Token sampling benchmarks (docs/benchmarks.md: S1 on CUDA; [8, 32, 32000] fp32 and bf16 on CPU)
against LLaDA's float64 Gumbel path, torch greedy softmax + max and the read-once floor:
``python -m dlmfuse bench --only sampling`` as a script, same flags. The implementation lives in
``dlmfuse.bench.sampling`` so that it also runs from a wheel."""

import sys

from dlmfuse import bench

if __name__ == "__main__":
    sys.exit(bench.script_main("sampling", __doc__))
