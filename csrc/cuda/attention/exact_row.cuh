// One attention row in float64 by one warp, the way dlmfuse.reference computes it: the rescue of
// rows that float32 cannot represent (the CUDA twin of cpu/attention_exact.cpp). When q.k
// overflows float32 (|score| > 3.4e38) the online softmax sees an infinite running max
// (inf - inf = NaN) or a NaN sum, and a row whose every visible score overflowed downwards looks
// like a row that saw no key; in float64 those scores are finite (a dot product of float32 values
// is below 1.5e79 at head_dim 128), so the row has a finite output. Its lse may still overflow to
// +inf when stored as float32, as the CPU's does.
//
// The kernels leave such a row with lse -inf (softmax_lse of a NaN sum or of no finite score), a
// split-KV merge with lse NaN (a partial in softmax_broke's state writes a NaN lse); rescue_rows_kernel, which the planned family launches after every
// plan (attention_forward_family), recomputes the rows whose lse says so. A kernel of its own
// because the tensor-core kernels sit at 255 registers: the rescue's code inside them, inlined or
// called, made ptxas spill in their main loops (inside the CUDA-core kernel it cost registers or
// spills per instance). Rows that really saw no key take the same path (their scan finds no
// visible key and writes 0, -inf). The verified kernels (attention_sm80.cu, and the CUDA-core
// kernel outside the family) are not followed by it until a GPU run has verified it.
#pragma once

#include "cuda/attention/tile_common.cuh"

namespace dlmfuse::cuda {

// Whether a row's written result may differ from float64's: its lse is -inf (it saw no finite
// score, or it broke: softmax_lse of a NaN sum) or NaN (a split-KV merge with a broken part).
__device__ __forceinline__ bool lse_needs_exact(float lse) { return !(lse > -INFINITY); }

// out[b, i, h, :] and lse[b, h, i] in float64 math; the whole warp calls it with the same row.
// Lane j scores keys j, j + 32, ...; each lane accumulates the output columns lane + 32 c.
template <typename T, int D>
__device__ __forceinline__ void attention_row_exact(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int lane) {
  static_assert(D % 32 == 0, "D / 32 output columns per lane");
  constexpr int kCols = D / 32;
  const int64_t kv_head = h / (p.q_heads / p.kv_heads);
  const int64_t k_len = effective_k_len(p, b);
  const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + i * p.q_strides[1] + h * p.q_strides[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + kv_head * p.k_strides[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides[0] + kv_head * p.v_strides[2];
  const int32_t q_order = p.has_labels ? p.q_order.at(b, i) : 0;
  const int32_t q_group = p.has_labels ? p.q_group.at(b, i) : 0;
  const int32_t q_doc = p.has_docs ? p.q_doc.at(b, i) : 0;
  const int64_t bias_row = b * p.bias_strides[0] + h * p.bias_strides[1] + i * p.bias_strides[2];

  // Key j's score; -inf where it is hidden. A -inf bias does not hide a NaN key (NaN + -inf is NaN,
  // as in the reference and on the CPU).
  auto score = [&](int64_t j) -> double {
    if (p.has_labels && !is_visible(q_order, q_group, p.k_order.at(b, j), p.k_group.at(b, j))) return -INFINITY;
    if (p.has_docs && p.k_doc.at(b, j) != q_doc) return -INFINITY;
    const double bias = p.bias != nullptr ? static_cast<double>(bias_at(p, bias_row + j * p.bias_strides[3])) : 0.0;
    double dot = 0.0;
    for (int d = 0; d < D; ++d) dot += static_cast<double>(to_float(q[d])) * to_float(k[j * p.k_strides[1] + d]);
    return dot * p.scale + bias;
  };

  double row_max = -INFINITY;  // NaN scores do not take the max (they propagate through the sum)
  for (int64_t j = lane; j < k_len; j += 32) row_max = fmax(row_max, score(j));
  row_max = warp_max(row_max);
  const double shift = row_max == -INFINITY ? 0.0 : row_max;

  double sum = 0.0, acc[kCols] = {};
  for (int64_t j0 = 0; j0 < k_len; j0 += 32) {
    const double mine = j0 + lane < k_len ? exp(score(j0 + lane) - shift) : 0.0;
    for (int jj = 0; jj < 32; ++jj) {
      const double w = __shfl_sync(0xffffffffu, mine, jj);
      if (w == 0.0) continue;  // hidden keys and underflow: weight exactly 0 (their V may be anything finite)
      sum += w;
      const T* v_row = v + (j0 + jj) * p.v_strides[1];
      for (int c = 0; c < kCols; ++c) acc[c] += w * to_float(v_row[lane + 32 * c]);
    }
  }
  const bool empty = !(sum > 0.0) && sum == sum;
  T* out = static_cast<T*>(p.out) + b * p.out_strides[0] + i * p.out_strides[1] + h * p.out_strides[2];
  for (int c = 0; c < kCols; ++c) out[lane + 32 * c] = from_float<T>(empty ? 0.0f : static_cast<float>(acc[c] / sum));
  if (lane == 0) p.lse[(b * p.q_heads + h) * p.q_len + i] = empty ? -INFINITY : static_cast<float>(shift + log(sum));
}

// Every (batch, head, query row) whose lse asks for it, again in float64. Each thread tests one
// row's lse per step (coalesced); its warp then recomputes the flagged rows one after another.
constexpr int kRescueThreads = 128;

template <typename T, int D>
__global__ void __launch_bounds__(kRescueThreads) rescue_rows_kernel(const AttentionParams p) {
  const int64_t rows = p.batch * p.q_heads * p.q_len;  // [B, Hq, Lq] order, as lse
  const int lane = threadIdx.x % 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kRescueThreads;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kRescueThreads + threadIdx.x - lane; first < rows;
       first += stride) {
    const int64_t mine = first + lane;
    unsigned pending = __ballot_sync(0xffffffffu, mine < rows && lse_needs_exact(p.lse[mine]));
    for (; pending != 0; pending &= pending - 1) {
      const int64_t row = first + __ffs(pending) - 1;
      const int64_t i = row % p.q_len, h = (row / p.q_len) % p.q_heads, b = row / (p.q_len * p.q_heads);
      attention_row_exact<T, D>(p, b, h, i, lane);
    }
  }
}

// Launches the rescue of p's rows on `stream`, after the kernel (and merge) that wrote out and lse.
template <typename T, int D>
cudaError_t launch_rescue_rows(const AttentionParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.q_heads * p.q_len;
  if (rows == 0) return cudaSuccess;
  constexpr int64_t kMostCtas = 1 << 16;  // the kernel strides over more rows
  const int64_t ctas = (rows + kRescueThreads - 1) / kRescueThreads;
  rescue_rows_kernel<T, D><<<static_cast<unsigned>(ctas < kMostCtas ? ctas : kMostCtas), kRescueThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dlmfuse::cuda
