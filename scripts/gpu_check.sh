#!/usr/bin/env bash
# Device runs (DEVICE.md): install the prebuilt wheel from $WHEEL_DIR (default .whl/; built by
# scripts/build_device_wheel.sh; another branch's wheel may wait in its own .whl-<name>/),
# then run the named parts in order (the not-yet-verified CUDA kernels only in their own steps):
#   tests     CUDA tests (first the planned family's plans, the fused backward and the family's
#             Hopper kernel, each in its own process; then every attention kernel of
#             DLMFUSE_CUDA_ATTENTION, forced split-KV)
#   sanitize  compute-sanitizer memcheck / racecheck over small cases of every kernel
#   bench     kernel benchmarks (K1, S1; A1-A5 and A4g with the peers; the planned family and the
#             fused backward alone; dlmfuse alone per attention kernel of BENCH_KERNELS, into one
#             file), JSONL for bench/results/
#   e1        where exact mode's bf16 logits part from the loop's (two probe scripts), then
#             the end-to-end LLaDA-8B-shaped generate benchmark, one step per batch size in
#             E1_BATCHES (default "1 8"; H200: the B=1 step took 84 s, B=8 never finished yet)
#   profile   Nsight Compute sections (speed of light, occupancy, warp stalls, memory) of each
#             kernel on its benchmark shape (scripts/profile_kernels.py), then of the family's
#             Hopper kernel forced on the same shapes, ~3-4 minutes
#   all       tests sanitize bench e1
# JSONL and one logs.tar.gz go under $OUT (default ./gpu_out; the device tool returns at most 8
# files); failing steps print their log's tail before the summary. Each step has its own timeout, and no step runs
# past GPU_CHECK_BUDGET seconds from the start (default 540), so one hang cannot eat the 15-minute
# budget; the summary table is printed last, then (after a bench) the issues' targets with their
# same-run ratios (scripts/targets.py).
#
#   device tool: run(command="GPU_CHECK_BUDGET=540 OUT=$OUT bash scripts/gpu_check.sh tests bench",
#                    carry=[".whl"], timeout_s=570)
set -uo pipefail
parts=("$@")
[[ ${#parts[@]} -eq 0 ]] && parts=(tests)
[[ " ${parts[*]} " == *" all "* ]] && parts=(tests sanitize bench e1)
for part in "${parts[@]}"; do
  case "$part" in tests | sanitize | bench | e1 | profile) ;; *) echo "usage: $0 [tests|sanitize|bench|e1|profile|all]..." >&2; exit 2 ;; esac
done
wants() { [[ " ${parts[*]} " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
budget="${GPU_CHECK_BUDGET:-540}"
logs="$(mktemp -d)"
mkdir -p "$OUT"
site=/tmp/dlmfuse-site
rm -rf "$site"  # pip --target keeps what a rerun on the same warm machine installed before
wheels="${WHEEL_DIR:-.whl}"
python3 -m pip install -q --no-index --no-deps --target "$site" "$wheels"/dlmfuse-*.whl >"$logs/install.log" 2>&1
export PYTHONPATH="$site"
[[ -f "$wheels/GIT_SHA" ]] && export DLMFUSE_GIT_SHA="$(cat "$wheels/GIT_SHA")"  # the wheel's commit, for the bench rows
# The unverified kernels (_ext._UNVERIFIED_CUDA_KERNELS: the planned attention family, the fused
# backward) take over every CUDA attention call when DLMFUSE_CUDA_KERNELS=1, so only their own
# steps set it (a fault there kills only that step's process): pytest_cuda_family,
# pytest_cuda_backward, pytest_cuda_warp_specialized, their sanitizer steps, the family's bench and
# profile steps.
family_env="env DLMFUSE_CUDA_KERNELS=1"
status=()

step() {  # step NAME SECONDS COMMAND...  (the timeout is cut to what is left of the budget)
  local name=$1 seconds=$2
  shift 2
  local left=$((budget - SECONDS))
  if ((left < 10)); then
    status+=("$(printf '%-26s not run: budget spent' "$name")")
    return
  fi
  ((seconds > left)) && seconds=$left
  local start=$SECONDS
  timeout "$seconds" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  if ((rc != 0)); then
    echo "== $name failed (rc=$rc); last lines of its log:"
    grep -E "^(FAILED|ERROR)|Error|error:|========= " "$logs/$name.log" | head -n 40
    tail -n 25 "$logs/$name.log"
  fi
  status+=("$(printf '%-26s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - start))" "$(tail -n 1 "$logs/$name.log")")")
}

step info 60 python3 -m dlmfuse info
step nvidia_smi 30 nvidia-smi
if wants tests; then
  # The tests import the installed wheel (PYTHONPATH), not the source tree. A kernel that faults
  # kills its process's CUDA context, so a kernel changed since its last device run goes in
  # `unverified` and runs in its own process after the others (DLMFUSE_TEST_KERNELS narrows the
  # `kernel` parameter of the matrix, bias-layout, GQA-packing and gather tests;
  # DLMFUSE_CUDA_ATTENTION picks the kernel of the other attention tests: graph capture,
  # torch.compile, split heuristics, KV-cache attend). Every kernel passed on an H200 on 2026-11-27.
  unverified="simple"  # the CUDA-core kernel reads document labels since its last device run
  verified=""  # every kernel of DLMFUSE_CUDA_ATTENTION (the installed package's list) but those
  for kernel in $(python3 -c 'from dlmfuse.attention import CUDA_ATTENTION_KERNELS as k; print(*k)'); do
    [[ " $unverified " == *" $kernel "* ]] || verified="$verified $kernel"
  done
  attention_tests="tests/test_torch_integration.py tests/test_attention.py tests/test_attention_gather.py"
  # First what waits for verification. The planned family: every plan forced through
  # DLMFUSE_CUDA_ATTENTION against the float64 reference (documents included), then the
  # packed-document tests under its automatic plans; the fused backward in its own process.
  step pytest_cuda_family 150 $family_env python3 -m pytest -m cuda -q -p no:cacheprovider \
    tests/test_attention_family.py tests/test_documents.py -k "not sm90_128"
  step pytest_cuda_backward 90 $family_env python3 -m pytest -m cuda -q -p no:cacheprovider \
    tests/test_attention_backward_cuda.py tests/test_attention_backward_extremes.py
  # The family's Hopper kernel (mma=sm90, tile_m=128: TMA, warp specialisation), the newest code:
  # its own tests, then the family's matrix under its plan.
  step pytest_cuda_warp_specialized 90 $family_env python3 -m pytest -m cuda -q -p no:cacheprovider \
    tests/test_attention_warp_specialized.py tests/test_attention_family.py -k "warp_specialized or sm90_128"
  step pytest_cuda 200 env DLMFUSE_TEST_KERNELS="$verified" python3 -m pytest -m cuda -q -p no:cacheprovider tests \
    --ignore=tests/test_attention_family.py --ignore=tests/test_attention_backward_cuda.py \
    --ignore=tests/test_attention_backward_extremes.py --ignore=tests/test_attention_warp_specialized.py
  # With split-KV forced the kernel-parametrised tests also cover each kernel's split partials
  # (the split tests set their own DLMFUSE_ATTENTION_SPLITS).
  step pytest_cuda_splits 90 env DLMFUSE_TEST_KERNELS="$verified" DLMFUSE_ATTENTION_SPLITS=3 \
    python3 -m pytest -m cuda -q -p no:cacheprovider $attention_tests
  per_kernel_tests="not test_cuda_matches_reference_and_cpu and not test_cuda_bias_layouts_match_reference"
  per_kernel_tests="$per_kernel_tests and not test_cuda_gqa_packing_matches_reference"
  per_kernel_tests="$per_kernel_tests and not test_cuda_gathered_keys_match_reference_and_double_buffer"
  # The non-parametrised attention tests under kernels auto never picks on sm_90.
  for kernel in double_buffer simple; do
    step "pytest_cuda_$kernel" 60 env DLMFUSE_CUDA_ATTENTION=$kernel \
      python3 -m pytest -m cuda -q -p no:cacheprovider $attention_tests -k "$per_kernel_tests"
  done
  for kernel in $unverified; do
    step "pytest_cuda_unverified_$kernel" 90 env DLMFUSE_TEST_KERNELS=$kernel DLMFUSE_CUDA_ATTENTION=$kernel \
      python3 -m pytest -m cuda -q -p no:cacheprovider $attention_tests
  done
  if [[ -n $unverified ]]; then
    step pytest_cuda_splits_unverified 90 env DLMFUSE_TEST_KERNELS="$unverified" DLMFUSE_ATTENTION_SPLITS=3 \
      python3 -m pytest -m cuda -q -p no:cacheprovider $attention_tests \
      -k "test_cuda_matches_reference_and_cpu or test_cuda_bias_layouts_match_reference"
  fi
fi
# racecheck PYTEST_ARGS...: compute-sanitizer's racecheck over CUDA tests. Hazards it reports in
# cuBLAS's own GEMM kernels (nvjet_*, run by the tests' torch matmuls; 2026-11-27 on an H200) are
# listed but do not fail the step; a hazard in any other kernel does (exit 9). Filtering kernels
# instead (--kernel-name / --kernel-name-exclude) made the sanitizer fail on those GEMMs.
racecheck() {
  local log
  log="$(mktemp)"
  compute-sanitizer --tool racecheck python3 -m pytest -m cuda -q -x -p no:cacheprovider "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local ours
  ours="$(grep "Race reported" "$log" | grep -vc "at nvjet_")"
  echo "racecheck: $(grep -c "Race reported" "$log") hazard reports, $ours outside cuBLAS (nvjet) kernels"
  ((ours == 0)) || return 9
  return "$rc"
}
export -f racecheck

if wants sanitize; then
  # Small cases of every kernel (labels, ragged lengths, kv_lens, sampling, scatter).
  sanitize="tests/test_torch_integration.py::test_cuda_matches_reference_and_cpu tests/test_torch_integration.py::test_cuda_bias_layouts_match_reference tests/test_torch_integration.py::test_cuda_gqa_packing_matches_reference tests/test_torch_integration.py::test_cuda_gathered_keys_match_reference_and_double_buffer tests/test_kv_cache.py tests/test_sampling.py"
  sanitize="$sanitize tests/test_attention.py::test_merge_attention_equals_full tests/test_attention.py::test_merge_attention_empty_sides"
  # The wgmma path (sm90) on its own: a failure there (-x) must not cut the others' coverage.
  step sanitizer_memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -m pytest -m cuda -q -x -p no:cacheprovider $sanitize -k "not graph and not sm90"
  step sanitizer_memcheck_sm90 90 compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -m pytest -m cuda -q -x -p no:cacheprovider $sanitize -k "sm90"
  # Split-KV workspace indexing and the merge kernel (the two smaller cases, 1 / 3 / 8 splits).
  step sanitizer_memcheck_splits 90 compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -m pytest -m cuda -q -x -p no:cacheprovider -k "not Lk2048" \
    tests/test_torch_integration.py::test_cuda_split_kv_matches_reference_and_cpu
  step sanitizer_racecheck 90 bash -c 'racecheck "$@"' _ tests/test_torch_integration.py::test_cuda_matches_reference_and_cpu \
    -k "not sm90"
  # The gathering rounds' shared key list and scan (not sm90: the step below covers it).
  step sanitizer_racecheck_gather 60 bash -c 'racecheck "$@"' _ \
    tests/test_torch_integration.py::test_cuda_gathered_keys_match_reference_and_double_buffer -k "not sm90 and not Lk8300"
  # The planned family: small cases of every plan (memcheck), the walk's shared state (racecheck).
  # (and the float64 rescue after every plan: its row scan, the rows it recomputes).
  family_small="tests/test_attention_family.py::test_mask_only_rows_kv_lens_and_empty_rows tests/test_attention_family.py::test_other_documents_tiles_are_never_read"
  family_small="$family_small tests/test_attention_family.py::test_scores_beyond_float32_are_recomputed_in_float64"
  step sanitizer_memcheck_family 120 $family_env compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -m pytest -m cuda -q -x -p no:cacheprovider $family_small
  step sanitizer_racecheck_family 90 $family_env bash -c 'racecheck "$@"' _ $family_small
  step sanitizer_memcheck_backward 90 $family_env compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -m pytest -m cuda -q -x -p no:cacheprovider tests/test_attention_backward_cuda.py -k "bias or kv_lens"
  step sanitizer_racecheck_backward 90 $family_env bash -c 'racecheck "$@"' _ \
    tests/test_attention_backward_cuda.py -k "kv_lens"
  step sanitizer_memcheck_warp_specialized 60 $family_env compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -m pytest -m cuda -q -x -p no:cacheprovider tests/test_attention_warp_specialized.py \
    -k "one or short_keys or kv_lens or (split_kv and 5)"
  step sanitizer_racecheck_sm90 90 bash -c 'racecheck "$@"' _ tests/test_torch_integration.py::test_cuda_matches_reference_and_cpu \
    tests/test_torch_integration.py::test_cuda_gathered_keys_match_reference_and_double_buffer -k "sm90 and not Lk8300"
fi
if wants bench; then
  # The op families; then attention with the peers in the same run (SDPA backends and
  # FlexAttention, whose inductor compiles take most of the time; the verified default kernel),
  # which the targets' ratios need; then dlmfuse alone with each other tensor-core kernel (A/B
  # against the default; listed at _CUDA_KERNEL_ARGS in python/dlmfuse/_cuda_attention.py), likeliest
  # winners first, so that a budget cut drops the least telling.
  step bench_ops 90 python3 -m dlmfuse bench --quick --device cuda --only kv_cache --only sampling \
    --json "$OUT/bench_ops.jsonl"
  step bench_attention 240 python3 -m dlmfuse bench --quick --device cuda --only attention --only backward \
    --json "$OUT/bench_attention.jsonl"
  # The planned family under its automatic plans (each row records the plan that ran) and the fused
  # backward (A5); the peers' times of this run are in bench_attention.jsonl.
  step bench_attention_family 120 $family_env python3 -m dlmfuse bench --quick --device cuda --only attention \
    --only backward --skip sdpa --skip flex --json "$logs/bench_attention_family.jsonl"
  cat "$logs/bench_attention_family.jsonl" >>"$OUT/bench_attention_kernels.jsonl" 2>/dev/null
  # The Hopper kernel forced (rows it cannot take, e.g. fp32 ones, are recorded as errors).
  step bench_attention_warp_specialized 60 $family_env DLMFUSE_CUDA_ATTENTION=mma=sm90,tile_m=128 python3 -m dlmfuse \
    bench --quick --device cuda --only attention --skip sdpa --skip flex --json "$logs/bench_attention_ws.jsonl"
  cat "$logs/bench_attention_ws.jsonl" >>"$OUT/bench_attention_kernels.jsonl" 2>/dev/null
  # One JSONL for all of them (the device tool returns at most 8 files).
  for kernel in ${BENCH_KERNELS:-wide sm90 gather sm90_gather next double_buffer}; do
    step "bench_attention_$kernel" 60 env DLMFUSE_CUDA_ATTENTION=$kernel python3 -m dlmfuse bench \
      --quick --device cuda --only attention --skip sdpa --skip flex --json "$logs/bench_attention_$kernel.jsonl"
    cat "$logs/bench_attention_$kernel.jsonl" >>"$OUT/bench_attention_kernels.jsonl" 2>/dev/null
  done
fi
if wants profile; then
  # The text report comes back inside logs.tar.gz (profile.log).
  step profile 240 ncu --kernel-name regex:'attention_sm80|kv_scatter|sample_tokens' \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    python3 scripts/profile_kernels.py
  # The family's Hopper kernel forced on the same shapes.
  step profile_warp_specialized 180 $family_env DLMFUSE_CUDA_ATTENTION=mma=sm90,tile_m=128 ncu \
    --kernel-name regex:'attention_fwd_warp_specialized' --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
    python3 scripts/profile_kernels.py
fi
if wants e1; then
  # Where exact mode's bf16 logits part from the loop's (bench/results/h200-2026-11-27.md): the
  # last layer's shapes at 32 and 768 rows, then the first step under kernel x split settings.
  step lm_head_rounding 60 python3 scripts/lm_head_rounding.py --layers
  step e1_first_step_probe 120 python3 scripts/e1_first_step_probe.py
  # One step (and JSONL) per batch size, so that a B=8 row cut by the budget keeps the B=1 rows.
  for batch in ${E1_BATCHES:-1 8}; do
    step "bench_e1_b$batch" 300 env DLMFUSE_E1_BATCHES="$batch" python3 -m dlmfuse bench --quick --device cuda \
      --only generate --json "$OUT/bench_e1_b$batch.jsonl"
  done
fi

tar czf "$OUT/logs.tar.gz" -C "$logs" .
echo "== summary (logs in $OUT/logs.tar.gz)"
printf '%s\n' "${status[@]}"
# The issues' targets with this run's same-run ratios (scripts/targets.py), for the bench summary.
if [[ -s "$OUT/bench_attention.jsonl" ]]; then
  echo "== targets (bench_attention.jsonl)"
  python3 scripts/targets.py "$OUT/bench_attention.jsonl" --device cuda
fi
