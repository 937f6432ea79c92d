#!/usr/bin/env bash
# Device runs (DEVICE.md): install the prebuilt wheel from .whl/ (scripts/build_device_wheel.sh),
# then, with the not-yet-verified CUDA kernels enabled:
#   bash scripts/gpu_check.sh tests   CUDA tests (both attention kernels, forced split-KV), sanitizers
#   bash scripts/gpu_check.sh bench   the benchmarks (kernels, then E1), JSONL for bench/results/
#   bash scripts/gpu_check.sh all     both (only when one call may take ~9 minutes)
# Everything goes under $OUT (default ./gpu_out). Each step has its own timeout so one hang cannot
# eat the 15-minute budget; the summary table is printed last.
#
#   device tool: run(command="bash scripts/gpu_check.sh tests", carry=[".whl"], timeout_s=420)
set -uo pipefail
mode="${1:-tests}"
case "$mode" in tests | bench | all) ;; *) echo "usage: $0 tests|bench|all" >&2; exit 2 ;; esac
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
if [[ "$mode" != bench ]]; then
# The tests import the installed wheel (PYTHONPATH), not the source tree.
step pytest_cuda 200 python3 -m pytest -m cuda -q -p no:cacheprovider tests
step pytest_cuda_simple_attn 60 env DLMFUSE_CUDA_ATTENTION=simple \
  python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_torch_integration.py tests/test_attention.py
# The whole CUDA attention matrix (bias, every mask family, GQA, kv_lens) again with split-KV forced
# (the split tests themselves set their own DLMFUSE_ATTENTION_SPLITS).
step pytest_cuda_splits 90 env DLMFUSE_ATTENTION_SPLITS=3 \
  python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_torch_integration.py tests/test_attention.py
# Sanitizers on small cases of every kernel (labels, ragged lengths, kv_lens, sampling, scatter).
sanitize="tests/test_torch_integration.py::test_cuda_matches_reference_and_cpu tests/test_kv_cache.py tests/test_sampling.py"
step sanitizer_memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
  python3 -m pytest -m cuda -q -x -p no:cacheprovider $sanitize -k "not graph"
# Split-KV workspace indexing and the merge kernel (the two smaller cases, 1 / 3 / 8 splits).
step sanitizer_memcheck_splits 90 compute-sanitizer --tool memcheck --error-exitcode 9 \
  python3 -m pytest -m cuda -q -x -p no:cacheprovider -k "not Lk2048" \
  tests/test_torch_integration.py::test_cuda_split_kv_matches_reference_and_cpu
step sanitizer_racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 \
  python3 -m pytest -m cuda -q -x -p no:cacheprovider tests/test_torch_integration.py::test_cuda_matches_reference_and_cpu
fi
if [[ "$mode" != tests ]]; then
  step bench 240 python3 -m dlmfuse bench --quick --device cuda --only attention --only kv_cache \
    --only sampling --json "$OUT/bench_cuda.jsonl"
  step bench_e1 300 python3 -m dlmfuse bench --quick --device cuda --only generate --json "$OUT/bench_e1.jsonl"
fi

echo "== summary (logs in $OUT)"
printf '%s\n' "${status[@]}"
