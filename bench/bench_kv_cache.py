"""KV-cache scatter benchmarks (docs/benchmarks.md: K1 on CUDA; a CPU-sized K1 on CPU) against
index_copy_ and advanced indexing: ``python -m dlmfuse bench --only kv_cache`` as a script, same
flags. The implementation lives in ``dlmfuse.bench.kv_cache`` so that it also runs from a wheel."""

import sys

from dlmfuse import bench

if __name__ == "__main__":
    sys.exit(bench.script_main("kv_cache", __doc__))
