"""Tensor-parallel benchmarks on the CPU (docs/benchmarks.md: D1 a denoising step, D2 sampling):
2 gloo ranks against one rank and against gathering the logits, with the bytes each rank sends
per sampling step: ``python -m dlmfuse bench --only distributed`` as a script, same flags. The
implementation lives in ``dlmfuse.bench.distributed`` so that it also runs from a wheel."""

import sys

from dlmfuse import bench

if __name__ == "__main__":
    sys.exit(bench.script_main("distributed", __doc__))
