"""Training benchmarks (C2 on CPU, A5 on CUDA: attention forward + backward under BD3-LM's
training mask) against SDPA and FlexAttention: ``python -m dlmfuse bench --only backward`` as a
script, same flags. The implementation lives in ``dlmfuse.bench.backward``."""

import sys

from dlmfuse import bench

if __name__ == "__main__":
    sys.exit(bench.script_main("backward", __doc__))
