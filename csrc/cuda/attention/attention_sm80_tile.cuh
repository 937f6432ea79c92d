// The per-warp tile math of the sm_80 tensor-core attention (attention_sm80_kernel.cuh): tile loads into
// swizzled shared memory, key-tile label ranges, S = Q K^T, bias, masking, the online softmax and
// O += P V, for 16 query rows per warp and (score_tile_wide / accumulate_pv_wide) for 32.
//
// Fragment layout: the thread's fragment covers rows row_in_tile[0..1] (lane / 4 and lane / 4 + 8
// of the warp's m16 tile) and, in n8 tile nt, columns nt * 8 + 2 * (lane % 4) + {0, 1}: element e
// of s[nt] is row e / 2, column offset e % 2.
#pragma once

#include <cstring>
#include <type_traits>

#include "cuda/attention/mma_sm80.cuh"
#include "cuda/attention/tile_common.cuh"
#include "cuda/attention/wgmma_sm90.cuh"
#include "dlmfuse/online_softmax.h"
#include "dlmfuse/visibility.h"

namespace dlmfuse::cuda::sm80 {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 16 * kWarps;  // query rows per CTA at 16 rows per warp
constexpr int kBlockN = 64;           // keys per tile

// Element offset of (row, col) in a [rows][D] tile whose 16-byte chunks are XOR-swizzled by
// row % 8, so that ldmatrix's 8 row addresses hit 8 different bank groups.
template <int D>
__device__ __forceinline__ int swizzled(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// Element offset of (row, col) in a [rows][D] shared tile: swizzled (ldmatrix, sm_80 MMAs) or,
// kSw128, wgmma's 128-byte-swizzled layout (sm90::sw128_offset).
template <int D, bool kSw128>
__device__ __forceinline__ int tile_offset(int row, int col, int rows) {
  if constexpr (kSw128) return sm90::sw128_offset<D>(row, col, rows);
  else return swizzled<D>(row, col);
}

// rows x D tile from global (row stride in elements) into swizzled shared memory; rows at and
// past `valid_rows` are zero-filled.
template <typename T, int D, bool kSw128 = false>
__device__ __forceinline__ void load_tile_async(T* tile, const T* src, int64_t row_stride, int rows,
                                                int valid_rows) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
    const int row = c / kChunks, chunk = c % kChunks;
    const bool valid = row < valid_rows;
    const T* from = src + (valid ? row * row_stride + chunk * 8 : 0);
    cp_async_16(smem_address(tile + tile_offset<D, kSw128>(row, chunk * 8, rows)), from, valid ? 16 : 0);
  }
}

// rows x D tile of gathered rows into swizzled shared memory: tile row r < valid_rows is row
// key_of(r) of src (row stride in elements); rows at and past valid_rows are zero-filled.
template <typename T, int D, bool kSw128, typename KeyOf>
__device__ __forceinline__ void load_gathered_tile_async(T* tile, const T* src, int64_t row_stride, int rows,
                                                         int valid_rows, KeyOf&& key_of) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
    const int row = c / kChunks, chunk = c % kChunks;
    const bool valid = row < valid_rows;
    const T* from = src + (valid ? key_of(row) * row_stride + chunk * 8 : 0);
    cp_async_16(smem_address(tile + tile_offset<D, kSw128>(row, chunk * 8, rows)), from, valid ? 16 : 0);
  }
}

// Q of a GQA-packed tile (AttentionParams::pack_gqa): tile row r is packed row q0 + r, i.e. query
// (q0 + r) / group of query head kv_head * group + (q0 + r) % group; rows at and past valid_rows
// are zero-filled.
template <typename T, int D, bool kSw128 = false>
__device__ __forceinline__ void load_packed_q_tile_async(T* tile, const AttentionParams& p, int64_t b, int64_t kv_head,
                                                         int64_t group, int64_t q0, int rows, int valid_rows) {
  constexpr int kChunks = D / 8;
  const T* heads = static_cast<const T*>(p.q) + b * p.q_strides[0] + kv_head * group * p.q_strides[2];
  for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
    const int row = c / kChunks, chunk = c % kChunks;
    const bool valid = row < valid_rows;
    const int packed = static_cast<int>(q0) + row, heads_per_kv = static_cast<int>(group);  // below 2^31
    const T* from = valid ? heads + static_cast<int64_t>(packed / heads_per_kv) * p.q_strides[1] +
                                static_cast<int64_t>(packed % heads_per_kv) * p.q_strides[2] + chunk * 8
                          : heads;
    cp_async_16(smem_address(tile + tile_offset<D, kSw128>(row, chunk * 8, rows)), from, valid ? 16 : 0);
  }
}

// Min/max of the labels of keys [k0, k0 + cols) of row b (tiles of N keys): 16-byte loads when
// both label rows are contiguous and 16-byte aligned (the common case), else one label at a time.
template <int N = kBlockN>
__device__ __forceinline__ LabelRange key_tile_range(const LabelView& order, const LabelView& group, int64_t b,
                                                     int64_t k0, int cols) {
  const int32_t* o = order.data + b * order.batch_stride + k0 * order.row_stride;
  const int32_t* g = group.data + b * group.batch_stride + k0 * group.row_stride;
  LabelRange range = LabelRange::empty();
  const bool vectors = cols == N && order.row_stride == 1 && group.row_stride == 1 &&
                       reinterpret_cast<uintptr_t>(o) % 16 == 0 && reinterpret_cast<uintptr_t>(g) % 16 == 0;
  if (vectors) {
#pragma unroll 4
    for (int j = 0; j < N; j += 4) {
      const int4 ov = __ldg(reinterpret_cast<const int4*>(o + j));
      const int4 gv = __ldg(reinterpret_cast<const int4*>(g + j));
      range.add(ov.x, gv.x);
      range.add(ov.y, gv.y);
      range.add(ov.z, gv.z);
      range.add(ov.w, gv.w);
    }
    return range;
  }
#pragma unroll 4
  for (int j = 0; j < cols; ++j) range.add(o[j * order.row_stride], g[j * group.row_stride]);
  return range;
}

// Max / sum over the 4 lanes of a quad (the threads sharing a row of an MMA fragment).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Split-KV epilogue: the normalised partial out_s = O / l (0 for an empty row) and lse_s of the
// thread's fragment row r (0 or 1), fp32, at workspace row `row` ([S, B, Hq, Lq] order).
template <int D>
__device__ __forceinline__ void write_partial_row(const AttentionParams& p, const float (&o)[D / 8][4],
                                                  const float (&row_max)[2], const float (&row_sum)[2], int r,
                                                  int64_t row, int lane) {
  const float inv = softmax_inv_sum(row_sum[r]);
  float* out = p.partial_out + row * D;
  for (int dt = 0; dt < D / 8; ++dt)
    *reinterpret_cast<float2*>(out + dt * 8 + 2 * (lane % 4)) = make_float2(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
  // A broken row (softmax_broke) writes a NaN lse, which the merge passes on to the float64 rescue
  // (exact_row.cuh).
  if (lane % 4 == 0) p.partial_lse[row] = softmax_broke(row_max[r], row_sum[r]) ? NAN : softmax_lse(row_max[r], row_sum[r]);
}

// The epilogue of one fragment row r (0 or 1) of the thread: O / l (0 for an empty row) as 16-bit
// pairs into out row (b, query, head), and its lse ([B, Hq, Lq]) by one lane of four.
template <typename T, int D>
__device__ __forceinline__ void write_output_row(const AttentionParams& p, const float (&o)[D / 8][4],
                                                 const float (&row_max)[2], const float (&row_sum)[2], int r,
                                                 int64_t b, int64_t query, int64_t head, int lane) {
  const float inv = softmax_inv_sum(row_sum[r]);
  T* out = static_cast<T*>(p.out) + b * p.out_strides[0] + query * p.out_strides[1] + head * p.out_strides[2];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
    *reinterpret_cast<uint32_t*>(out + dt * 8 + 2 * (lane % 4)) =
        MmaType<T>::pack(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
  if (lane % 4 == 0) p.lse[(b * p.q_heads + head) * p.q_len + query] = softmax_lse(row_max[r], row_sum[r]);
}

// Both fragment rows of the thread at workspace rows `row0 + row_in_tile` (rows of the tile only).
template <int D>
__device__ __forceinline__ void write_partial(const AttentionParams& p, const float (&o)[D / 8][4],
                                              const float (&row_max)[2], const float (&row_sum)[2],
                                              int64_t row0, const int (&row_in_tile)[2], int q_rows, int lane) {
  for (int r = 0; r < 2; ++r)
    if (row_in_tile[r] < q_rows) write_partial_row<D>(p, o, row_max, row_sum, r, row0 + row_in_tile[r], lane);
}

// ---------------------------------------------------------------- one key tile, per warp

// S = Q K^T for the warp's 16 rows and the tile's 64 keys (eight n8 tiles).
template <typename T, int D>
__device__ __forceinline__ void score_tile(float (&s)[kBlockN / 8][4], const uint32_t (&q_frag)[D / 16][4],
                                           const T* k_tile, int lane) {
  for (int nt = 0; nt < kBlockN / 8; ++nt)
    for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
  for (int ks = 0; ks < D / 16; ++ks)
    for (int pair = 0; pair < kBlockN / 16; ++pair) {
      uint32_t kb[4];
      ldmatrix_x4(kb, smem_address(k_tile + swizzled<D>(pair * 16 + (lane / 16) * 8 + lane % 8,
                                                        ks * 16 + ((lane / 8) % 2) * 8)));
      mma_16x8x16<T>(s[2 * pair], q_frag[ks], kb[0], kb[1]);
      mma_16x8x16<T>(s[2 * pair + 1], q_frag[ks], kb[2], kb[3]);
    }
}

// The bias of the thread's S fragment in log2 units (0 outside the tile's rows and keys), loaded
// ahead of the MMAs so that its latency hides behind them. kNext: one row
// address per fragment row and tile, and with a unit key stride each thread's two adjacent keys
// in one load.
template <typename B, int N, typename Sink>
__device__ __forceinline__ void bias_by_row_as(const AttentionParams& p, int64_t b, int64_t h, int64_t q0, int64_t k0,
                                               const int (&row_in_tile)[2], int q_rows, int cols, int lane,
                                               Sink&& sink) {
  using Pair = typename std::conditional<std::is_same<B, float>::value, float2, uint32_t>::type;
  const int64_t key_stride = p.bias_strides[3];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool row_inside = row_in_tile[r] < q_rows;
    const B* row = static_cast<const B*>(p.bias) + b * p.bias_strides[0] + h * p.bias_strides[1] +
                   (q0 + (row_inside ? row_in_tile[r] : 0)) * p.bias_strides[2] + k0 * key_stride;
    const bool pairs = key_stride == 1 && reinterpret_cast<uintptr_t>(row) % sizeof(Pair) == 0;
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt) {
      const int col = nt * 8 + 2 * (lane % 4);  // and col + 1
      float x0 = 0.0f, x1 = 0.0f;
      if (row_inside && pairs && col + 1 < cols) {
        const Pair two = *reinterpret_cast<const Pair*>(row + col);
        if constexpr (std::is_same<B, float>::value) {
          x0 = two.x;
          x1 = two.y;
        } else {
          B halves[2];
          memcpy(halves, &two, sizeof(two));
          x0 = to_float(halves[0]);
          x1 = to_float(halves[1]);
        }
      } else if (row_inside) {
        if (col < cols) x0 = to_float(row[col * key_stride]);
        if (col + 1 < cols) x1 = to_float(row[(col + 1) * key_stride]);
      }
      sink(nt, 2 * r, kLog2e * x0);
      sink(nt, 2 * r + 1, kLog2e * x1);
    }
  }
}

// bias_by_row_as for the bias dtype (one uniform branch per tile, not one per element); N keys.
template <int N = kBlockN, typename Sink>
__device__ __forceinline__ void bias_by_row(const AttentionParams& p, int64_t b, int64_t h, int64_t q0, int64_t k0,
                                            const int (&row_in_tile)[2], int q_rows, int cols, int lane, Sink&& sink) {
  switch (p.bias_dtype) {
    case DType::kBFloat16: return bias_by_row_as<bf16_t, N>(p, b, h, q0, k0, row_in_tile, q_rows, cols, lane, sink);
    case DType::kFloat16: return bias_by_row_as<fp16_t, N>(p, b, h, q0, k0, row_in_tile, q_rows, cols, lane, sink);
    default: return bias_by_row_as<float, N>(p, b, h, q0, k0, row_in_tile, q_rows, cols, lane, sink);
  }
}

__device__ __forceinline__ void load_bias_by_row(float (&bias)[kBlockN / 8][4], const AttentionParams& p, int64_t b,
                                                 int64_t h, int64_t q0, int64_t k0, const int (&row_in_tile)[2],
                                                 int q_rows, int cols, int lane) {
  bias_by_row(p, b, h, q0, k0, row_in_tile, q_rows, cols, lane, [&](int nt, int e, float x) { bias[nt][e] = x; });
}

// Adds the bias to masked scores in place (32 rows per warp: no registers for a bias array);
// hidden scores stay -inf whatever the bias. N: keys per tile.
template <int N = kBlockN>
__device__ __forceinline__ void add_bias_by_row(float (&s)[N / 8][4], const AttentionParams& p, int64_t b,
                                                int64_t h, int64_t q0, int64_t k0, const int (&row_in_tile)[2],
                                                int q_rows, int cols, int lane) {
  bias_by_row<N>(p, b, h, q0, k0, row_in_tile, q_rows, cols, lane, [&](int nt, int e, float x) {
    if (s[nt][e] != -INFINITY) s[nt][e] += x;
  });
}

// The verified loader (H200, 2026-11-26): every element's offset from the four strides, through
// bias_at's dtype switch. load_bias_by_row replaces it once a device run has passed.
__device__ __forceinline__ void load_bias_by_element(float (&bias)[kBlockN / 8][4], const AttentionParams& p,
                                                     int64_t b, int64_t h, int64_t q0, int64_t k0,
                                                     const int (&row_in_tile)[2], int q_rows, int cols, int lane) {
  for (int nt = 0; nt < kBlockN / 8; ++nt)
    for (int e = 0; e < 4; ++e) {
      const int r = e / 2, col = nt * 8 + 2 * (lane % 4) + e % 2;
      const bool inside = col < cols && row_in_tile[r] < q_rows;
      bias[nt][e] = inside ? kLog2e * bias_at(p, b * p.bias_strides[0] + h * p.bias_strides[1] +
                                                     (q0 + row_in_tile[r]) * p.bias_strides[2] +
                                                     (k0 + col) * p.bias_strides[3])
                           : 0.0f;
    }
}

// ---------------------------------------------------------------- bias tiles in shared memory
// kNext: a 16-bit bias whose key stride is 1 and whose rows start on
// 16-byte boundaries streams into shared memory by cp.async in the same group as K and V, a
// whole tile ahead, instead of 16 global loads per thread per tile issued just before the MMAs
// (A3, a dense bf16 [1, H, L, L] bias, took 3.8x the dense time on an H200 with those loads).
// fp32 biases keep the row loads: their two tiles would cost a second resident CTA per SM.
// Rows are padded to kBiasPitch elements so that the fragment reads (8 rows x 4 lanes, 4 bytes
// each) fall in 32 different banks.
constexpr int kBiasPitch = kBlockN + 8;

DLMFUSE_HOST_DEVICE inline bool bias_tileable(const AttentionParams& p) {
  if (p.bias == nullptr || (p.bias_dtype != DType::kBFloat16 && p.bias_dtype != DType::kFloat16)) return false;
  if (p.bias_strides[3] != 1 || reinterpret_cast<uintptr_t>(p.bias) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (p.bias_strides[d] % 8 != 0) return false;  // 8 elements of 16 bits: rows stay 16-byte aligned
  return true;
}

// Bytes of the two bias tiles of a CTA of tile_m query rows.
DLMFUSE_HOST_DEVICE constexpr int bias_tiles_bytes(int tile_m) { return 2 * tile_m * kBiasPitch * 2; }

// This CTA's dynamic shared memory in bytes: the launch adds the bias tiles only where they fit
// the device (not at head_dim 128 on GPUs with 99 KB per block), and the kernel reads that here.
__device__ __forceinline__ uint32_t dynamic_shared_bytes() {
  uint32_t bytes;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
  return bytes;
}

// The bias of query rows [q0, q0 + tile_m) and keys [k0, k0 + cols) into `tile` ([tile_m][kBiasPitch],
// 16-bit) by cp.async; rows at and past q_rows and keys at and past cols are zero (never read from
// global memory). Call from every thread, inside the caller's cp.async group.
template <int kTileM>
__device__ __forceinline__ void load_bias_tile_async(uint16_t* tile, const AttentionParams& p, int64_t b, int64_t h,
                                                     int64_t q0, int q_rows, int64_t k0, int cols) {
  constexpr int kChunks = kBlockN / 8;  // 16-byte chunks per tile row
  const uint16_t* first = static_cast<const uint16_t*>(p.bias) + b * p.bias_strides[0] + h * p.bias_strides[1] +
                          q0 * p.bias_strides[2] + k0;
  for (int c = threadIdx.x; c < kTileM * kChunks; c += kThreads) {
    const int row = c / kChunks, chunk = c % kChunks;
    const int keys = cols - chunk * 8;  // keys of this chunk inside the tile (may be <= 0 or > 8)
    const int bytes = row < q_rows && keys > 0 ? 2 * (keys < 8 ? keys : 8) : 0;
    const uint16_t* from = bytes > 0 ? first + row * p.bias_strides[2] + chunk * 8 : first;
    cp_async_16(smem_address(tile + row * kBiasPitch + chunk * 8), from, bytes);
  }
}

// Adds the tile's bias (log2 units) to the thread's masked scores; hidden scores stay -inf.
template <typename B>
__device__ __forceinline__ void add_bias_tile_as(float (&s)[kBlockN / 8][4], const uint16_t* tile,
                                                 const int (&row_in_tile)[2], int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const uint16_t* row = tile + row_in_tile[r] * kBiasPitch + 2 * (lane % 4);
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      const uint32_t two = *reinterpret_cast<const uint32_t*>(row + nt * 8);  // even offset: 4-byte aligned
      B halves[2];
      memcpy(halves, &two, sizeof(two));
      if (s[nt][2 * r] != -INFINITY) s[nt][2 * r] += kLog2e * to_float(halves[0]);
      if (s[nt][2 * r + 1] != -INFINITY) s[nt][2 * r + 1] += kLog2e * to_float(halves[1]);
    }
  }
}

__device__ __forceinline__ void add_bias_tile(float (&s)[kBlockN / 8][4], DType bias_dtype, const uint16_t* tile,
                                              const int (&row_in_tile)[2], int lane) {
  if (bias_dtype == DType::kBFloat16) add_bias_tile_as<bf16_t>(s, tile, row_in_tile, lane);
  else add_bias_tile_as<fp16_t>(s, tile, row_in_tile, lane);
}

template <bool kNext>
__device__ __forceinline__ void load_bias(float (&bias)[kBlockN / 8][4], const AttentionParams& p, int64_t b,
                                          int64_t h, int64_t q0, int64_t k0, const int (&row_in_tile)[2],
                                          int q_rows, int cols, int lane) {
  if constexpr (kNext) load_bias_by_row(bias, p, b, h, q0, k0, row_in_tile, q_rows, cols, lane);
  else load_bias_by_element(bias, p, b, h, q0, k0, row_in_tile, q_rows, cols, lane);
}

// Scale into log2 units, add the bias, hide what the labels (PARTIAL tiles), the row count and
// the key count hide.
struct RowLabels {
  int32_t order[2], group[2];
};
template <bool kNext>
__device__ __forceinline__ void mask_scores(float (&s)[kBlockN / 8][4], const float (&bias)[kBlockN / 8][4],
                                            bool has_bias, float score_scale, TileKind kind,
                                            const int32_t* k_order, const int32_t* k_group,
                                            const RowLabels& rows, const int (&row_in_tile)[2], int q_rows,
                                            bool rows_full, int cols, int lane) {
  if (kind == TileKind::kFull && !has_bias && cols == kBlockN && rows_full) {
    // Nothing to hide (the common case of dense rows): scale only.
    for (int nt = 0; nt < kBlockN / 8; ++nt)
      for (int e = 0; e < 4; ++e) s[nt][e] *= score_scale;
    return;
  }
  if constexpr (kNext) {
    if (!has_bias && cols == kBlockN && rows_full) {  // an interior tile: no bounds to test
      // PARTIAL (kNext): the rule per element, the labels of the thread's
      // two adjacent keys in one 8-byte shared load each (the label rows are 16-byte aligned,
      // the key offset is even).
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        const int col = nt * 8 + 2 * (lane % 4);
        const int2 order = *reinterpret_cast<const int2*>(k_order + col);
        const int2 group = *reinterpret_cast<const int2*>(k_group + col);
        for (int e = 0; e < 4; ++e) {
          const int r = e / 2;
          const bool visible = e % 2 ? is_visible(rows.order[r], rows.group[r], order.y, group.y)
                                     : is_visible(rows.order[r], rows.group[r], order.x, group.x);
          s[nt][e] = visible ? s[nt][e] * score_scale : -INFINITY;
        }
      }
      return;
    }
  }
  for (int nt = 0; nt < kBlockN / 8; ++nt)
    for (int e = 0; e < 4; ++e) {
      const int r = e / 2, col = nt * 8 + 2 * (lane % 4) + e % 2;
      bool visible = col < cols && row_in_tile[r] < q_rows;
      if (visible && kind == TileKind::kPartial)
        visible = is_visible(rows.order[r], rows.group[r], k_order[col], k_group[col]);
      float x = s[nt][e] * score_scale;
      if (has_bias) x += bias[nt][e];
      s[nt][e] = visible ? x : -INFINITY;
    }
}

// Online softmax (base 2) of the thread's two rows, the scores' part: s becomes the tile's
// probabilities relative to the new running max, the running max and sum move on, and alpha
// receives the factor by which the output accumulators must be rescaled (rescale_rows). N: keys
// per tile (64; 128 in the warp-specialized kernel, which rescales after its P V batch completes).
template <int N>
__device__ __forceinline__ void softmax_scores(float (&s)[N / 8][4], float (&row_max)[2], float (&row_sum)[2],
                                               float (&alpha)[2]) {
  for (int r = 0; r < 2; ++r) {
    float tile_max = -INFINITY;
    for (int nt = 0; nt < N / 8; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    const float m_new = fmaxf(row_max[r], quad_max(tile_max));
    const float offset = softmax_offset(m_new);
    float tile_sum = 0.0f;
    for (int nt = 0; nt < N / 8; ++nt)
      for (int e = 2 * r; e < 2 * r + 2; ++e) {
        s[nt][e] = exp2f(s[nt][e] - offset);
        tile_sum += s[nt][e];
      }
    alpha[r] = softmax_rescale(row_max[r], m_new);
    row_sum[r] = row_sum[r] * alpha[r] + quad_sum(tile_sum);
    row_max[r] = m_new;
  }
}

// o *= alpha per row; the warp skips it when no row of it has a new max (every factor is exactly
// 1), which after the first tiles is most of them.
template <int D>
__device__ __forceinline__ void rescale_rows(float (&o)[D / 8][4], const float (&alpha)[2]) {
  if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f))
    for (int dt = 0; dt < D / 8; ++dt)
      for (int e = 0; e < 4; ++e) o[dt][e] *= alpha[e / 2];
}

// Both parts at once: s becomes probabilities, o and the running sum are rescaled. kNext: with
// rescale_rows' warp-wide skip (otherwise every row always).
template <int D, bool kNext, int N = kBlockN>
__device__ __forceinline__ void softmax_update(float (&s)[N / 8][4], float (&o)[D / 8][4],
                                               float (&row_max)[2], float (&row_sum)[2]) {
  float alpha[2];
  softmax_scores<N>(s, row_max, row_sum, alpha);
  if constexpr (kNext) {
    rescale_rows<D>(o, alpha);
  } else {
    for (int dt = 0; dt < D / 8; ++dt)
      for (int e = 0; e < 4; ++e) o[dt][e] *= alpha[e / 2];
  }
}

// O += P V: P's C fragments become A fragments, 16 keys per MMA k-step.
template <typename T, int D>
__device__ __forceinline__ void accumulate_pv(float (&o)[D / 8][4], const float (&s)[kBlockN / 8][4],
                                              const T* v_tile, int lane) {
  for (int kk = 0; kk < kBlockN / 16; ++kk) {
    const uint32_t pa[4] = {MmaType<T>::pack(s[2 * kk][0], s[2 * kk][1]), MmaType<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                            MmaType<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                            MmaType<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
    for (int pair = 0; pair < D / 16; ++pair) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, smem_address(v_tile + swizzled<D>(kk * 16 + ((lane / 8) % 2) * 8 + lane % 8,
                                                              pair * 16 + (lane / 16) * 8)));
      mma_16x8x16<T>(o[2 * pair], pa, vb[0], vb[1]);
      mma_16x8x16<T>(o[2 * pair + 1], pa, vb[2], vb[3]);
    }
  }
}

// ---------------------------------------------------------------- 32 rows per warp (kM = 2)
// Two m16 tiles per warp, as FlashAttention-2: each K and V fragment read from shared memory feeds
// both, which halves the shared-memory traffic of P V per MMA. Q fragments come from shared
// memory at every k-step (in registers they would not fit next to 2 x 64 accumulators of O).

// S = Q K^T for the warp's 32 rows (rows warp * 32 + m * 16 .. + 15 of the tile).
template <typename T, int D>
__device__ __forceinline__ void score_tile_wide(float (&s)[2][kBlockN / 8][4], const T* q_tile, int warp,
                                                const T* k_tile, int lane) {
#pragma unroll
  for (int m = 0; m < 2; ++m)
    for (int nt = 0; nt < kBlockN / 8; ++nt)
      for (int e = 0; e < 4; ++e) s[m][nt][e] = 0.0f;
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t qa[2][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
      ldmatrix_x4(qa[m], smem_address(q_tile + swizzled<D>(warp * 32 + m * 16 + ((lane / 8) % 2) * 8 + lane % 8,
                                                           ks * 16 + (lane / 16) * 8)));
    for (int pair = 0; pair < kBlockN / 16; ++pair) {
      uint32_t kb[4];
      ldmatrix_x4(kb, smem_address(k_tile + swizzled<D>(pair * 16 + (lane / 16) * 8 + lane % 8,
                                                        ks * 16 + ((lane / 8) % 2) * 8)));
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        mma_16x8x16<T>(s[m][2 * pair], qa[m], kb[0], kb[1]);
        mma_16x8x16<T>(s[m][2 * pair + 1], qa[m], kb[2], kb[3]);
      }
    }
  }
}

// P of one m-tile as MMA A fragments (16-bit pairs), packed as soon as its softmax is done so
// that the fp32 scores die before the next m-tile's softmax (registers).
template <typename T, int N = kBlockN>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[N / 16][4], const float (&s)[N / 8][4]) {
  for (int kk = 0; kk < N / 16; ++kk) {
    pa[kk][0] = MmaType<T>::pack(s[2 * kk][0], s[2 * kk][1]);
    pa[kk][1] = MmaType<T>::pack(s[2 * kk][2], s[2 * kk][3]);
    pa[kk][2] = MmaType<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pa[kk][3] = MmaType<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

// O += P V for both m-tiles, each V fragment used twice.
template <typename T, int D>
__device__ __forceinline__ void accumulate_pv_wide(float (&o)[2][D / 8][4], const uint32_t (&pa)[2][kBlockN / 16][4],
                                                   const T* v_tile, int lane) {
  for (int kk = 0; kk < kBlockN / 16; ++kk)
    for (int pair = 0; pair < D / 16; ++pair) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, smem_address(v_tile + swizzled<D>(kk * 16 + ((lane / 8) % 2) * 8 + lane % 8,
                                                              pair * 16 + (lane / 16) * 8)));
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        mma_16x8x16<T>(o[m][2 * pair], pa[m][kk], vb[0], vb[1]);
        mma_16x8x16<T>(o[m][2 * pair + 1], pa[m][kk], vb[2], vb[3]);
      }
    }
}

}  // namespace dlmfuse::cuda::sm80
