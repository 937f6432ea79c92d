#!/usr/bin/env bash
# One device run (DEVICE.md): install the prebuilt wheel from .whl/, run the CUDA tests with the
# not-yet-verified CUDA kernels enabled, compute-sanitizer on a subset, then the benchmarks.
# Everything it produces goes under $OUT (default ./gpu_out). Each step has its own timeout so
# one hang cannot eat the budget; the summary table is printed last.
#
#   device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
site=/tmp/dlmfuse-site
python3 -m pip install -q --no-index --no-deps --target "$site" .whl/dlmfuse-*.whl >"$OUT/install.log" 2>&1
export PYTHONPATH="$site"
export DLMFUSE_CUDA_KERNELS=1  # use the compiled CUDA kernels that this run verifies
status=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS
  timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  status+=("$(printf '%-22s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - start))" "$(tail -n 1 "$OUT/$name.log")")")
}

step info 60 python3 -m dlmfuse info
step nvidia_smi 30 nvidia-smi
# The tests import the installed wheel (PYTHONPATH), not the source tree.
step pytest_cuda 200 python3 -m pytest -m cuda -q -p no:cacheprovider tests
step pytest_cuda_simple_attn 60 env DLMFUSE_CUDA_ATTENTION=simple \
  python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_torch_integration.py tests/test_attention.py
# Sanitizers on small cases of every kernel (labels, ragged lengths, kv_lens, sampling, scatter).
sanitize="tests/test_torch_integration.py::test_cuda_matches_reference_and_cpu tests/test_kv_cache.py tests/test_sampling.py"
step sanitizer_memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
  python3 -m pytest -m cuda -q -x -p no:cacheprovider $sanitize -k "not graph"
step sanitizer_racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 \
  python3 -m pytest -m cuda -q -x -p no:cacheprovider tests/test_torch_integration.py::test_cuda_matches_reference_and_cpu
step bench 240 python3 -m dlmfuse bench --quick --device cuda --json "$OUT/bench_cuda.jsonl"

echo "== summary (logs in $OUT)"
printf '%s\n' "${status[@]}"
