"""End-to-end generation benchmark (docs/benchmarks.md, E1): tokens/s of dlmfuse.generate (exact, prefix
and dual cache, Fast-dLLM threshold decoding) against LLaDA's reference loop on the same random
model: ``python -m dlmfuse bench --only generate`` as a script, same flags. The implementation
lives in ``dlmfuse.bench.generate`` so that it also runs from a wheel."""

import sys

from dlmfuse import bench

if __name__ == "__main__":
    sys.exit(bench.script_main("generate", __doc__))
