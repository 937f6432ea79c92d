// Attention forward on CUDA cores, fp32 math, for every dtype: the correctness baseline.
//
// One CTA per (batch, query head, tile of kRowsPerCta query rows); kWarps warps, each owning
// kRowsPerCta / kWarps rows. Key/value tiles of 32 keys are staged in shared memory as fp32.
// For a row, lane j scores key j of the tile (the visibility rule, bias and kv_lens applied per
// element), the warp runs the online softmax in base 2, and each lane accumulates D / 32 output
// columns. Tiles are classified from label (and document) min/max first (dlmfuse/visibility.h):
// SKIP tiles are never loaded. Document labels are read only by the planned family's calls
// (attention_forward_family with mma=simt), which are not yet verified on a GPU.
#include "cuda/attention/attention.h"
#include "cuda/attention/tile_common.cuh"
#include "dlmfuse/half_convert.h"
#include "dlmfuse/online_softmax.h"
#include "dlmfuse/visibility.h"

namespace dlmfuse::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerCta = 16;
constexpr int kRowsPerWarp = kRowsPerCta / kWarps;
constexpr int kKeysPerTile = 32;

__device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
__device__ __forceinline__ float load_float(const void* base, int64_t index) {
  return to_float(static_cast<const T*>(base)[index]);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_simple_kernel(const AttentionParams p) {
  constexpr int kCols = D / 32;  // output columns per lane
  __shared__ float k_tile[kKeysPerTile][D + 1];  // +1: lane j reads row j without bank conflicts
  __shared__ float v_tile[kKeysPerTile][D];
  __shared__ float q_rows[kRowsPerCta][D];
  __shared__ int tile_kind;

  const int64_t n_q_tiles = (p.q_len + kRowsPerCta - 1) / kRowsPerCta;
  const int64_t q_tile = blockIdx.x % n_q_tiles;
  const int64_t h = (blockIdx.x / n_q_tiles) % p.q_heads;
  const int64_t b = blockIdx.x / (n_q_tiles * p.q_heads);
  const int64_t kv_head = h / (p.q_heads / p.kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t q0 = q_tile * kRowsPerCta;
  const int rows = static_cast<int>(min_i64(kRowsPerCta, p.q_len - q0));

  const int64_t k_len = effective_k_len(p, b);

  // Queries of the tile, pre-scaled into log2 units.
  const float q_factor = p.scale * kLog2e;
  for (int idx = threadIdx.x; idx < kRowsPerCta * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    q_rows[r][d] = r < rows ? load_float<T>(p.q, b * p.q_strides[0] + (q0 + r) * p.q_strides[1] + h * p.q_strides[2] + d) * q_factor : 0.0f;
  }
  // Label range of the query tile (warp 0 reduces, everyone reads after the first barrier).
  // Own 16-byte slot: a widened LDS.128 of an unaligned q_range also read tile_kind, a hazard
  // with lane 0's write of it that racecheck reports.
  __shared__ alignas(16) LabelRange q_range;
  // Packed sequences: the tile's document range (warp 1), for tile classification.
  __shared__ alignas(16) IdRange q_docs;
  if (warp == 0) {
    LabelRange r = LabelRange::empty();
    if (p.has_labels)
      for (int i = lane; i < rows; i += 32) r.add(p.q_order.at(b, q0 + i), p.q_group.at(b, q0 + i));
    r = warp_reduce(r);
    if (lane == 0) q_range = r;
  } else if (warp == 1 && p.has_docs) {
    IdRange r = IdRange::empty();
    for (int i = lane; i < rows; i += 32) r.add(p.q_doc.at(b, q0 + i));
    r = warp_reduce(r);
    if (lane == 0) q_docs = r;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][kCols];
  int32_t my_q_order[kRowsPerWarp], my_q_group[kRowsPerWarp], my_q_doc[kRowsPerWarp];
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
    for (int c = 0; c < kCols; ++c) o[r][c] = 0.0f;
    const int row = warp * kRowsPerWarp + r;
    my_q_order[r] = p.has_labels && row < rows ? p.q_order.at(b, q0 + row) : 0;
    my_q_group[r] = p.has_labels && row < rows ? p.q_group.at(b, q0 + row) : 0;
    my_q_doc[r] = p.has_docs && row < rows ? p.q_doc.at(b, q0 + row) : 0;
  }
  __syncthreads();

  for (int64_t k0 = 0; k0 < k_len; k0 += kKeysPerTile) {
    const int cols = static_cast<int>(min_i64(kKeysPerTile, k_len - k0));
    const int64_t key = k0 + lane;
    const bool key_valid = lane < cols;
    const int32_t k_order = p.has_labels && key_valid ? p.k_order.at(b, key) : kOrderInfinity;
    const int32_t k_group = p.has_labels && key_valid ? p.k_group.at(b, key) : 0;
    const int32_t k_doc = p.has_docs && key_valid ? p.k_doc.at(b, key) : 0;
    if (warp == 0) {
      TileKind kind = TileKind::kFull;
      if (p.has_labels) {
        LabelRange kr = LabelRange::empty();
        if (key_valid) kr.add(k_order, k_group);
        kind = classify_tile(q_range, warp_reduce(kr));
      }
      if (p.has_docs) {
        IdRange kr = IdRange::empty();
        if (key_valid) kr.add(k_doc);
        kind = within_documents(kind, q_docs, warp_reduce(kr));
      }
      if (lane == 0) tile_kind = static_cast<int>(kind);
    }
    __syncthreads();
    const TileKind kind = static_cast<TileKind>(tile_kind);
    if (kind != TileKind::kSkip) {
      for (int idx = threadIdx.x; idx < kKeysPerTile * D; idx += kThreads) {
        const int j = idx / D, d = idx % D;
        const bool valid = j < cols;
        k_tile[j][d] = valid ? load_float<T>(p.k, b * p.k_strides[0] + (k0 + j) * p.k_strides[1] + kv_head * p.k_strides[2] + d) : 0.0f;
        v_tile[j][d] = valid ? load_float<T>(p.v, b * p.v_strides[0] + (k0 + j) * p.v_strides[1] + kv_head * p.v_strides[2] + d) : 0.0f;
      }
    }
    __syncthreads();
    if (kind != TileKind::kSkip) {
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int row = warp * kRowsPerWarp + r;
        if (row >= rows) break;  // uniform across the warp
        float s = -INFINITY;
        const bool doc_ok = !p.has_docs || my_q_doc[r] == k_doc;
        if (key_valid && (kind == TileKind::kFull || (doc_ok && is_visible(my_q_order[r], my_q_group[r], k_order, k_group)))) {
          float dot = 0.0f;
#pragma unroll 8
          for (int d = 0; d < D; ++d) dot += q_rows[row][d] * k_tile[lane][d];
          s = dot;
          if (p.bias != nullptr)
            s += kLog2e * bias_at(p, b * p.bias_strides[0] + h * p.bias_strides[1] + (q0 + row) * p.bias_strides[2] + key * p.bias_strides[3]);
        }
        const float m_new = fmaxf(m[r], warp_max(s));
        const float prob = exp2f(s - softmax_offset(m_new));
        const float alpha = softmax_rescale(m[r], m_new);
        l[r] = l[r] * alpha + warp_sum(prob);
        m[r] = m_new;
        for (int c = 0; c < kCols; ++c) o[r][c] *= alpha;
        for (int j = 0; j < cols; ++j) {
          const float pj = __shfl_sync(0xffffffffu, prob, j);
          for (int c = 0; c < kCols; ++c) o[r][c] += pj * v_tile[j][lane + 32 * c];
        }
      }
    }
    __syncthreads();
  }

  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = warp * kRowsPerWarp + r;
    if (row >= rows) break;
    const float inv = softmax_inv_sum(l[r]);
    T* out = static_cast<T*>(p.out) + b * p.out_strides[0] + (q0 + row) * p.out_strides[1] + h * p.out_strides[2];
    for (int c = 0; c < kCols; ++c) out[lane + 32 * c] = from_float<T>(o[r][c] * inv);
    if (lane == 0) p.lse[(b * p.q_heads + h) * p.q_len + q0 + row] = softmax_lse(m[r], l[r]);
  }
}

template <typename T>
__global__ void merge_kernel(const MergeParams p) {
  const int64_t row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // one warp per (b, l, h)
  if (row >= p.batch * p.seq_len * p.heads) return;
  const int lane = threadIdx.x % 32;
  const int64_t h = row % p.heads, l = (row / p.heads) % p.seq_len, b = row / (p.heads * p.seq_len);
  const float lse_a = p.lse_a[b * p.lse_a_strides[0] + h * p.lse_a_strides[1] + l * p.lse_a_strides[2]];
  const float lse_b = p.lse_b[b * p.lse_b_strides[0] + h * p.lse_b_strides[1] + l * p.lse_b_strides[2]];
  const MergeWeights w = merge_weights(lse_a, lse_b);
  if (lane == 0) p.lse[b * p.lse_strides[0] + h * p.lse_strides[1] + l * p.lse_strides[2]] = w.lse;
  const T* a = static_cast<const T*>(p.out_a) + b * p.out_a_strides[0] + l * p.out_a_strides[1] + h * p.out_a_strides[2];
  const T* c = static_cast<const T*>(p.out_b) + b * p.out_b_strides[0] + l * p.out_b_strides[1] + h * p.out_b_strides[2];
  T* o = static_cast<T*>(p.out) + b * p.out_strides[0] + l * p.out_strides[1] + h * p.out_strides[2];
  for (int64_t d = lane; d < p.head_dim; d += 32) {
    const float from_a = w.weight_a == 0.0f ? 0.0f : w.weight_a * to_float(a[d]);
    const float from_b = w.weight_b == 0.0f ? 0.0f : w.weight_b * to_float(c[d]);
    o[d] = from_float<T>(from_a + from_b);
  }
}

template <typename T>
cudaError_t launch_simple(const AttentionParams& p, cudaStream_t stream) {
  const int64_t n_q_tiles = (p.q_len + kRowsPerCta - 1) / kRowsPerCta;
  const int64_t blocks = p.batch * p.q_heads * n_q_tiles;
  if (blocks == 0) return cudaSuccess;
  if (p.head_dim == 64) attention_simple_kernel<T, 64><<<blocks, kThreads, 0, stream>>>(p);
  else if (p.head_dim == 128) attention_simple_kernel<T, 128><<<blocks, kThreads, 0, stream>>>(p);
  else return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_forward_simple(const AttentionParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return launch_simple<float>(p, stream);
    case DType::kBFloat16: return launch_simple<bf16_t>(p, stream);
    case DType::kFloat16: return launch_simple<fp16_t>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t merge_attention(const MergeParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.seq_len * p.heads;
  if (rows == 0) return cudaSuccess;
  constexpr int kMergeThreads = 256;
  const int64_t blocks = (rows + kMergeThreads / 32 - 1) / (kMergeThreads / 32);
  switch (p.dtype) {
    case DType::kFloat32: merge_kernel<float><<<blocks, kMergeThreads, 0, stream>>>(p); break;
    case DType::kBFloat16: merge_kernel<bf16_t><<<blocks, kMergeThreads, 0, stream>>>(p); break;
    case DType::kFloat16: merge_kernel<fp16_t><<<blocks, kMergeThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace dlmfuse::cuda
