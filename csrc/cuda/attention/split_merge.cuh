// The split-KV merge of the tensor-core attention kernels: out and lse of every (batch, head,
// query row) from the num_splits normalised partials that the splits wrote to the workspace.
#pragma once

#include <type_traits>

#include "cuda/attention/attention_sm80_tile.cuh"

namespace dlmfuse::cuda {

// Merge kernel: one warp per (batch, head, query row); lane s holds split s's lse.
constexpr int kMergeWarps = 4;
static_assert(kAttentionMaxSplits <= 32, "the merge kernel keeps one split per lane");

// out, lse of one (batch, head, query row) per warp from the S partials:
//   lse = log sum_s exp(lse_s),  out = sum_s exp(lse_s - lse) out_s;  all parts empty: 0 and -inf;
//   a broken part (NaN lse): out and lse NaN, for the rescue that follows (exact_row.cuh).
template <typename T, int D>
__global__ void __launch_bounds__(32 * kMergeWarps) merge_splits_kernel(const AttentionParams p) {
  constexpr int kPerLane = D / 32;  // consecutive output elements per lane (2 or 4)
  static_assert(kPerLane == 2 || kPerLane == 4, "head_dim 64 or 128");
  using Vec = typename std::conditional<kPerLane == 4, float4, float2>::type;
  const int64_t rows = p.batch * p.q_heads * p.q_len;  // [B, Hq, Lq] order, as lse
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + threadIdx.x / 32;
  if (row >= rows) return;  // uniform across the warp
  const int lane = threadIdx.x % 32;

  const float part_lse = lane < p.num_splits ? p.partial_lse[lane * rows + row] : -INFINITY;
  const float lse_max = warp_max(part_lse);
  // A split whose scores overflowed float32 (or met a NaN) wrote a NaN lse (write_partial_row): the
  // row is NaN, lse included (merge_weights' rule), which sends it to the float64 rescue where one
  // follows (exact_row.cuh), as a row with no finite score.
  const bool broken = __any_sync(0xffffffffu, part_lse != part_lse);
  const float e = lse_max == -INFINITY ? 0.0f : expf(part_lse - lse_max);
  const float sum = warp_sum(e);
  const float weight = sum > 0.0f ? e / sum : 0.0f;

  float acc[kPerLane] = {};
  for (int s = 0; s < p.num_splits; ++s) {
    const float w = __shfl_sync(0xffffffffu, weight, s);
    if (w == 0.0f) continue;  // an empty split, or one whose weight underflows
    const Vec part = *reinterpret_cast<const Vec*>(p.partial_out + (s * rows + row) * D + lane * kPerLane);
    const float* x = reinterpret_cast<const float*>(&part);
    for (int j = 0; j < kPerLane; ++j) acc[j] += w * x[j];
  }

  const int64_t i = row % p.q_len, h = (row / p.q_len) % p.q_heads, b = row / (p.q_len * p.q_heads);
  T* out = static_cast<T*>(p.out) + b * p.out_strides[0] + i * p.out_strides[1] + h * p.out_strides[2] +
           lane * kPerLane;
  if (broken)
    for (int j = 0; j < kPerLane; ++j) acc[j] = NAN;
  for (int j = 0; j < kPerLane; j += 2) *reinterpret_cast<uint32_t*>(out + j) = sm80::MmaType<T>::pack(acc[j], acc[j + 1]);
  if (lane == 0) p.lse[row] = broken ? NAN : lse_max == -INFINITY ? -INFINITY : lse_max + logf(sum);
}

// Launches the merge of p.num_splits partials on `stream`.
template <typename T, int D>
cudaError_t launch_split_merge(const AttentionParams& p, cudaStream_t stream) {
  const int64_t merged_rows = p.batch * p.q_heads * p.q_len;
  const auto merge_ctas = static_cast<unsigned>((merged_rows + kMergeWarps - 1) / kMergeWarps);
  merge_splits_kernel<T, D><<<merge_ctas, 32 * kMergeWarps, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dlmfuse::cuda
