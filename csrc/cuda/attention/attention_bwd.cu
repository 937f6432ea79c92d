// Attention backward on tensor cores (sm_80 mma.sync; not yet run on a GPU), bf16 / fp16 in, fp32
// gradients, head_dim 64 / 128. FlashAttention-2's recomputation, without atomics, so every run
// gives the same bits:
//
//   P = exp(scale q.k + bias - lse) where visible (0 elsewhere and in rows whose lse is not finite:
//   -inf, no key; +inf, an lse beyond float32, which reaches here inside CUDA-graph capture, where
//   the caller cannot take such rows out for its float64 pass),
//   dP = dO V^T,  dS = P (dP - delta)  with delta = rowsum(dO * O) - dlse (computed by the caller),
//   dV = P^T dO,  dK = scale dS^T Q,  dQ = scale dS K,  dbias = dS.
//
// Two kernels, each owning what it writes: key_grads_kernel, one CTA per 64 keys of a KV head,
// walks the query tiles of every query head of its group and accumulates dK and dV in registers
// (S^T = K Q^T with the keys as fragment rows); query_grads_kernel, one CTA per 64 query rows of a
// query head, walks the key tiles and accumulates dQ (and writes dbias). Each recomputes S and dP,
// the price of having no atomics. Tiles are classified from their label and document ranges as in
// the forward (dlmfuse/visibility.h): SKIP pairs cost one label pass, FULL pairs no per-element
// test. 4 warps, 16 rows (keys or queries) per warp; P and dS are rounded to the input dtype for
// their MMAs, as the forward rounds P.
#include "cuda/attention/attention.h"
#include "cuda/attention/attention_sm80_tile.cuh"

namespace dlmfuse::cuda {
namespace {

using sm80::kBlockN;  // 64: rows of every tile here, queries and keys alike
using sm80::kThreads;
constexpr int kTile = kBlockN;

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// S[16][64] = A[a_row0, a_row0 + 16) B^T for [rows][D] tiles A and B (64 rows) swizzled in shared memory.
template <typename T, int D>
__device__ __forceinline__ void gemm_abt(float (&s)[kTile / 8][4], const T* a_tile, int a_row0, const T* b_tile,
                                         int lane) {
  for (int nt = 0; nt < kTile / 8; ++nt)
    for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[4];
    sm80::ldmatrix_x4(a, sm80::smem_address(a_tile + sm80::swizzled<D>(a_row0 + ((lane / 8) % 2) * 8 + lane % 8,
                                                                       ks * 16 + (lane / 16) * 8)));
    for (int pair = 0; pair < kTile / 16; ++pair) {
      uint32_t b[4];
      sm80::ldmatrix_x4(b, sm80::smem_address(b_tile + sm80::swizzled<D>(pair * 16 + (lane / 16) * 8 + lane % 8,
                                                                         ks * 16 + ((lane / 8) % 2) * 8)));
      sm80::mma_16x8x16<T>(s[2 * pair], a, b[0], b[1]);
      sm80::mma_16x8x16<T>(s[2 * pair + 1], a, b[2], b[3]);
    }
  }
}

// Labels of one row (query or key) of a tile, in shared memory or registers.
struct RowLabel {
  int32_t order = 0, group = 0, doc = 0;
};

__device__ __forceinline__ RowLabel label_at(const AttentionParams& p, bool query, int64_t b, int64_t i) {
  RowLabel l;
  if (!p.has_labels) return l;
  l.order = query ? p.q_order.at(b, i) : p.k_order.at(b, i);
  l.group = query ? p.q_group.at(b, i) : p.k_group.at(b, i);
  if (p.has_docs) l.doc = query ? p.q_doc.at(b, i) : p.k_doc.at(b, i);
  return l;
}

__device__ __forceinline__ bool pair_visible(const AttentionParams& p, const RowLabel& q, const RowLabel& k) {
  return is_visible(q.order, q.group, k.order, k.group) && (!p.has_docs || q.doc == k.doc);
}

// Shared label state of a tile pair's classification: the fixed side's ranges (written once) and
// the walked side's labels (written per tile).
struct TileLabels {
  RowLabel rows[kTile];
  alignas(16) LabelRange fixed_range;
  alignas(16) IdRange fixed_docs;
  int kind;
};

// Label and document range of rows [0, n) of `rows` (warp-wide; lanes 0-31 read two rows each).
__device__ __forceinline__ void range_of(const RowLabel* rows, int n, LabelRange& range, IdRange& docs) {
  const int lane = threadIdx.x % 32;
  LabelRange r = LabelRange::empty();
  IdRange d = IdRange::empty();
  for (int i = lane; i < n; i += 32) {
    r.add(rows[i].order, rows[i].group);
    d.add(rows[i].doc);
  }
  range = warp_reduce(r);
  docs = warp_reduce(d);
}

// The fixed side's label and document ranges of rows [0, n) into t (warp 0); the next barrier
// (classify_walked's first) publishes them.
__device__ __forceinline__ void set_fixed_side(const AttentionParams& p, TileLabels& t, const RowLabel* rows, int n) {
  if (!p.has_labels || threadIdx.x >= 32) return;
  LabelRange range;
  IdRange docs;
  range_of(rows, n, range, docs);
  if (threadIdx.x == 0) {
    t.fixed_range = range;
    t.fixed_docs = docs;
  }
}

// Loads the walked side's labels for rows [first, first + n) into t.rows and classifies the pair
// against the fixed side (all threads; two barriers). Without labels every pair is FULL.
__device__ __forceinline__ TileKind classify_walked(const AttentionParams& p, TileLabels& t, bool walked_queries,
                                                    int64_t b, int64_t first, int n) {
  if (!p.has_labels) return TileKind::kFull;
  if (static_cast<int>(threadIdx.x) < n) t.rows[threadIdx.x] = label_at(p, walked_queries, b, first + threadIdx.x);
  __syncthreads();
  if (threadIdx.x < 32) {
    LabelRange range;
    IdRange docs;
    range_of(t.rows, n, range, docs);
    TileKind kind = walked_queries ? classify_tile(range, t.fixed_range) : classify_tile(t.fixed_range, range);
    if (p.has_docs) kind = within_documents(kind, walked_queries ? docs : t.fixed_docs, walked_queries ? t.fixed_docs : docs);
    if (threadIdx.x == 0) t.kind = static_cast<int>(kind);
  }
  __syncthreads();
  return static_cast<TileKind>(t.kind);
}

// log2-unit bias of (query i, key j) of head h, 0 without a bias.
__device__ __forceinline__ float bias_log2(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (p.bias == nullptr) return 0.0f;
  return kLog2e * bias_at(p, b * p.bias_strides[0] + h * p.bias_strides[1] + i * p.bias_strides[2] + j * p.bias_strides[3]);
}


// ---------------------------------------------------------------- dQ (and dbias)
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) query_grads_kernel(const AttentionBackwardParams g) {
  const AttentionParams& p = g.fwd;
  extern __shared__ __align__(128) unsigned char shared_raw[];
  T* q_tile = reinterpret_cast<T*>(shared_raw);  // [64][D] swizzled, like the others
  T* do_tile = q_tile + kTile * D;
  T* k_tile = do_tile + kTile * D;
  T* v_tile = k_tile + kTile * D;
  __shared__ TileLabels labels;
  __shared__ RowLabel q_labels[kTile];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t kv_head = h / (p.q_heads / p.kv_heads);
  const int q_rows = static_cast<int>(min64(kTile, p.q_len - q0));
  const int64_t k_len = effective_k_len(p, b);

  sm80::load_tile_async<T, D>(q_tile, static_cast<const T*>(p.q) + b * p.q_strides[0] + q0 * p.q_strides[1] + h * p.q_strides[2],
                              p.q_strides[1], kTile, q_rows);
  sm80::load_tile_async<T, D>(do_tile, static_cast<const T*>(g.grad_out) + b * g.grad_out_strides[0] +
                                           q0 * g.grad_out_strides[1] + h * g.grad_out_strides[2],
                              g.grad_out_strides[1], kTile, q_rows);
  sm80::cp_async_commit();
  if (static_cast<int>(threadIdx.x) < q_rows) q_labels[threadIdx.x] = label_at(p, true, b, q0 + threadIdx.x);
  // The thread's two fragment rows: their lse (log2 units), delta and labels.
  int row[2];
  float lse2[2], delta[2];
  for (int r = 0; r < 2; ++r) {
    row[r] = warp * 16 + lane / 4 + 8 * r;
    const bool inside = row[r] < q_rows;
    const int64_t at = (b * p.q_heads + h) * p.q_len + q0 + row[r];
    lse2[r] = inside ? p.lse[at] * kLog2e : -INFINITY;
    delta[r] = inside ? g.delta[at] : 0.0f;
  }
  sm80::cp_async_wait_all();
  __syncthreads();
  set_fixed_side(p, labels, q_labels, q_rows);
  RowLabel mine[2];
  for (int r = 0; r < 2; ++r) mine[r] = row[r] < q_rows ? q_labels[row[r]] : RowLabel{};

  float dq[D / 8][4] = {};
  const float scale2 = p.scale * kLog2e;
  const T* k_src = static_cast<const T*>(p.k) + b * p.k_strides[0] + kv_head * p.k_strides[2];
  const T* v_src = static_cast<const T*>(p.v) + b * p.v_strides[0] + kv_head * p.v_strides[2];
  for (int64_t k0 = 0; k0 < k_len; k0 += kTile) {
    const int cols = static_cast<int>(min64(kTile, k_len - k0));
    const TileKind kind = classify_walked(p, labels, false, b, k0, cols);  // (its first barrier publishes the ranges)
    if (kind == TileKind::kSkip) continue;  // uniform
    sm80::load_tile_async<T, D>(k_tile, k_src + k0 * p.k_strides[1], p.k_strides[1], kTile, cols);
    sm80::load_tile_async<T, D>(v_tile, v_src + k0 * p.v_strides[1], p.v_strides[1], kTile, cols);
    sm80::cp_async_commit();
    sm80::cp_async_wait_all();
    __syncthreads();
    if (warp * 16 < q_rows) {
      float s[kTile / 8][4], dp[kTile / 8][4];
      gemm_abt<T, D>(s, q_tile, warp * 16, k_tile, lane);
      gemm_abt<T, D>(dp, do_tile, warp * 16, v_tile, lane);
#pragma unroll  // (s and dp stay in registers only when every index is a constant)
      for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e / 2, col = nt * 8 + 2 * (lane % 4) + e % 2;
          bool visible = col < cols && row[r] < q_rows && isfinite(lse2[r]);
          if (visible && kind == TileKind::kPartial) visible = pair_visible(p, mine[r], labels.rows[col]);
          const float prob = visible ? exp2f(s[nt][e] * scale2 + bias_log2(p, b, h, q0 + row[r], k0 + col) - lse2[r]) : 0.0f;
          const float ds = prob * (dp[nt][e] - delta[r]);
          s[nt][e] = ds;
          if (g.grad_bias != nullptr && visible)
            g.grad_bias[((b * p.q_heads + h) * p.q_len + q0 + row[r]) * p.k_len + k0 + col] = ds;
        }
      sm80::accumulate_pv<T, D>(dq, s, k_tile, lane);  // dQ += dS K
    }
    __syncthreads();  // every warp is done with K and V (and the labels) before the next tile
  }
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= q_rows) continue;
    float* out = g.grad_q + ((b * p.q_heads + h) * p.q_len + q0 + row[r]) * D;
    for (int dt = 0; dt < D / 8; ++dt) {
      const int col = dt * 8 + 2 * (lane % 4);
      *reinterpret_cast<float2*>(out + col) = make_float2(p.scale * dq[dt][2 * r], p.scale * dq[dt][2 * r + 1]);
    }
  }
}

// ---------------------------------------------------------------- dK, dV
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) key_grads_kernel(const AttentionBackwardParams g) {
  const AttentionParams& p = g.fwd;
  extern __shared__ __align__(128) unsigned char shared_raw[];
  T* k_tile = reinterpret_cast<T*>(shared_raw);  // [64][D] swizzled, like the others
  T* v_tile = k_tile + kTile * D;
  T* q_tile = v_tile + kTile * D;
  T* do_tile = q_tile + kTile * D;
  __shared__ TileLabels labels;
  __shared__ RowLabel k_labels[kTile];
  __shared__ float q_lse2[kTile], q_delta[kTile];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z, kv_head = blockIdx.y, k0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t group = p.q_heads / p.kv_heads;
  const int64_t k_len = effective_k_len(p, b);
  const int cols = static_cast<int>(min64(kTile, k_len - k0));  // keys of this tile (<= 0: all hidden)
  const int k_rows = static_cast<int>(min64(kTile, p.k_len - k0));  // rows to write (zeros past k_len)

  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  int row[2];
  for (int r = 0; r < 2; ++r) row[r] = warp * 16 + lane / 4 + 8 * r;
  if (cols > 0) {
    sm80::load_tile_async<T, D>(k_tile, static_cast<const T*>(p.k) + b * p.k_strides[0] + k0 * p.k_strides[1] +
                                            kv_head * p.k_strides[2], p.k_strides[1], kTile, cols);
    sm80::load_tile_async<T, D>(v_tile, static_cast<const T*>(p.v) + b * p.v_strides[0] + k0 * p.v_strides[1] +
                                            kv_head * p.v_strides[2], p.v_strides[1], kTile, cols);
    sm80::cp_async_commit();
    if (static_cast<int>(threadIdx.x) < cols) k_labels[threadIdx.x] = label_at(p, false, b, k0 + threadIdx.x);
    sm80::cp_async_wait_all();
    __syncthreads();
    set_fixed_side(p, labels, k_labels, cols);
    RowLabel mine[2];
    for (int r = 0; r < 2; ++r) mine[r] = row[r] < cols ? k_labels[row[r]] : RowLabel{};
    const float scale2 = p.scale * kLog2e;
    // Query tiles outer: their labels (and the pair's kind) are the same for every head of the group.
    for (int64_t q0 = 0; q0 < p.q_len; q0 += kTile) {
      const int q_rows = static_cast<int>(min64(kTile, p.q_len - q0));
      const TileKind kind = classify_walked(p, labels, true, b, q0, q_rows);
      if (kind == TileKind::kSkip) continue;  // uniform
      for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
        sm80::load_tile_async<T, D>(q_tile, static_cast<const T*>(p.q) + b * p.q_strides[0] + q0 * p.q_strides[1] +
                                                h * p.q_strides[2], p.q_strides[1], kTile, q_rows);
        sm80::load_tile_async<T, D>(do_tile, static_cast<const T*>(g.grad_out) + b * g.grad_out_strides[0] +
                                                 q0 * g.grad_out_strides[1] + h * g.grad_out_strides[2],
                                    g.grad_out_strides[1], kTile, q_rows);
        sm80::cp_async_commit();
        if (static_cast<int>(threadIdx.x) < kTile) {
          const int i = threadIdx.x;
          const int64_t at = (b * p.q_heads + h) * p.q_len + q0 + i;
          q_lse2[i] = i < q_rows ? p.lse[at] * kLog2e : -INFINITY;
          q_delta[i] = i < q_rows ? g.delta[at] : 0.0f;
        }
        sm80::cp_async_wait_all();
        __syncthreads();
        if (warp * 16 < cols) {
          float s[kTile / 8][4], dp[kTile / 8][4];
          gemm_abt<T, D>(s, k_tile, warp * 16, q_tile, lane);   // S^T: keys x queries
          gemm_abt<T, D>(dp, v_tile, warp * 16, do_tile, lane);  // dP^T
#pragma unroll  // (s and dp stay in registers only when every index is a constant)
          for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = e / 2, col = nt * 8 + 2 * (lane % 4) + e % 2;  // key row[r], query col
              bool visible = col < q_rows && row[r] < cols && isfinite(q_lse2[col]);
              if (visible && kind == TileKind::kPartial) visible = pair_visible(p, labels.rows[col], mine[r]);
              const float prob =
                  visible ? exp2f(s[nt][e] * scale2 + bias_log2(p, b, h, q0 + col, k0 + row[r]) - q_lse2[col]) : 0.0f;
              s[nt][e] = prob;
              dp[nt][e] = prob * (dp[nt][e] - q_delta[col]);
            }
          sm80::accumulate_pv<T, D>(dv, s, do_tile, lane);  // dV += P^T dO
          sm80::accumulate_pv<T, D>(dk, dp, q_tile, lane);  // dK += dS^T Q
        }
        __syncthreads();  // every warp is done with Q, dO and the stats before the next head or tile
      }
    }
  }
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= k_rows) continue;
    const int64_t at = ((b * p.k_len + k0 + row[r]) * p.kv_heads + kv_head) * D;
    for (int dt = 0; dt < D / 8; ++dt) {
      const int col = dt * 8 + 2 * (lane % 4);
      *reinterpret_cast<float2*>(g.grad_k + at + col) = make_float2(p.scale * dk[dt][2 * r], p.scale * dk[dt][2 * r + 1]);
      *reinterpret_cast<float2*>(g.grad_v + at + col) = make_float2(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  }
}

template <typename T, int D>
cudaError_t launch_backward(const AttentionBackwardParams& g, cudaStream_t stream) {
  const AttentionParams& p = g.fwd;
  constexpr int bytes = 4 * kTile * D * 2;
  for (const void* kernel : {reinterpret_cast<const void*>(query_grads_kernel<T, D>),
                             reinterpret_cast<const void*>(key_grads_kernel<T, D>)}) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) return err;
  }
  const auto batch = static_cast<unsigned>(p.batch);
  if (p.q_len > 0)
    query_grads_kernel<T, D><<<dim3(static_cast<unsigned>((p.q_len + kTile - 1) / kTile), static_cast<unsigned>(p.q_heads), batch),
                               kThreads, bytes, stream>>>(g);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.k_len == 0) return err;
  key_grads_kernel<T, D><<<dim3(static_cast<unsigned>((p.k_len + kTile - 1) / kTile), static_cast<unsigned>(p.kv_heads), batch),
                           kThreads, bytes, stream>>>(g);
  return cudaGetLastError();
}

}  // namespace

bool attention_backward_supports(const AttentionBackwardParams& g) {
  const AttentionParams& p = g.fwd;
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (p.q_heads > kAttentionMaxGridDim || p.kv_heads > kAttentionMaxGridDim || p.batch > kAttentionMaxGridDim) return false;
  return rows_16_byte_aligned(p.q, p.q_strides) && rows_16_byte_aligned(p.k, p.k_strides) &&
         rows_16_byte_aligned(p.v, p.v_strides) && rows_16_byte_aligned(g.grad_out, g.grad_out_strides);
}

cudaError_t attention_backward(const AttentionBackwardParams& g, cudaStream_t stream) {
  const AttentionParams& p = g.fwd;
  if (p.batch * p.q_heads == 0) return cudaSuccess;
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.head_dim == 64) return bf16 ? launch_backward<bf16_t, 64>(g, stream) : launch_backward<fp16_t, 64>(g, stream);
  return bf16 ? launch_backward<bf16_t, 128>(g, stream) : launch_backward<fp16_t, 128>(g, stream);
}

}  // namespace dlmfuse::cuda
