// Attention forward on tensor cores (sm_80 mma.sync; runs on A100 and H100), bf16 / fp16 in,
// fp32 accumulation, head_dim 64 / 128. FlashAttention-2 structure:
//
//   CTA = 4 warps = 64 query rows of one (batch, head); warp w owns rows 16w .. 16w + 15.
//   Q tile -> shared -> registers once. The key tiles are classified up front, 128 at a time (one
//   tile per thread, from the min/max of its key labels against the query tile's, see
//   dlmfuse/visibility.h) into a shared array of kinds, so that walking to the next visible tile
//   costs no global round trip: SKIP tiles load nothing, FULL tiles skip the per-element rule,
//   PARTIAL tiles bring their key labels by cp.async with K. K and V tiles arrive into XOR-swizzled
//   shared memory; S = Q K^T with m16n8k16 MMAs, scale / bias / labels / kv_lens applied on the
//   accumulator fragments, online softmax in base 2 per row (quad shuffles), then O += P V with P
//   re-packed from the S fragments into A operands.
//
// Split-KV (flash-decoding) for calls with few query rows: with num_splits = S > 1 the grid gains
// S CTAs per (batch, head, query tile), split s attending to its own run of key tiles of the row's
// kv_lens-clamped key range; each writes its normalised partial (out_s, lse_s) in fp32 to the
// workspace, and merge_splits_kernel combines the S partials exactly (the S-part generalisation of
// merge_weights in dlmfuse/online_softmax.h) into out and lse.
//
// AttentionParams::kv_stages = 2 (the default) double-buffers K and V: K, V and the labels of the
// next visible tile load during the whole of tile j (4-9% faster on an H200 than kv_stages = 1,
// FlashAttention-2's pipeline: V_j loads during Q K_j^T, K_j+1 during P V_j). Not yet: GQA packing, 32 rows
// per warp, sm_90 wgmma/TMA.
#include "cuda/attention/attention.h"
#include "cuda/attention/mma_sm80.cuh"
#include "cuda/attention/tile_common.cuh"
#include "dlmfuse/online_softmax.h"
#include "dlmfuse/visibility.h"

#include <type_traits>

namespace dlmfuse::cuda {
namespace {

using namespace sm80;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 16 * kWarps;  // query rows per CTA
constexpr int kBlockN = 64;           // keys per tile

// Grid: (query tiles, q_heads, batch * num_splits), each dim kept within 65535 (CUDA's cap on y, z).
constexpr int64_t kMaxGridDim = 65535;
// Split-KV heuristic: the split count that brings the grid nearest to this many CTAs per SM (two
// waves: at D = 128 the kernel's 252 registers per thread keep 2 CTAs resident per SM), with at
// least this many key tiles per split (each split also writes and the merge reads 64 x D floats).
constexpr int64_t kSplitTargetCtasPerSm = 4;
constexpr int64_t kSplitMinKeyTiles = 2;
// Merge kernel: one warp per (batch, head, query row); lane s holds split s's lse.
constexpr int kMergeWarps = 4;
static_assert(kAttentionMaxSplits <= 32, "the merge kernel keeps one split per lane");

DLMFUSE_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Element offset of (row, col) in a [rows][D] tile whose 16-byte chunks are XOR-swizzled by
// row % 8, so that ldmatrix's 8 row addresses hit 8 different bank groups.
template <int D>
__device__ __forceinline__ int swizzled(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// rows x D tile from global (row stride in elements) into swizzled shared memory; rows at and
// past `valid_rows` are zero-filled.
template <typename T, int D>
__device__ __forceinline__ void load_tile_async(T* tile, const T* src, int64_t row_stride, int rows,
                                                int valid_rows) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
    const int row = c / kChunks, chunk = c % kChunks;
    const bool valid = row < valid_rows;
    const T* from = src + (valid ? row * row_stride + chunk * 8 : 0);
    cp_async_16(smem_address(tile + swizzled<D>(row, chunk * 8)), from, valid ? 16 : 0);
  }
}

// Min/max of the labels of keys [k0, k0 + cols) of row b: 16-byte loads when both label rows
// are contiguous and 16-byte aligned (the common case), else one label at a time.
__device__ __forceinline__ LabelRange key_tile_range(const LabelView& order, const LabelView& group, int64_t b,
                                                     int64_t k0, int cols) {
  const int32_t* o = order.data + b * order.batch_stride + k0 * order.row_stride;
  const int32_t* g = group.data + b * group.batch_stride + k0 * group.row_stride;
  LabelRange range = LabelRange::empty();
  const bool vectors = cols == kBlockN && order.row_stride == 1 && group.row_stride == 1 &&
                       reinterpret_cast<uintptr_t>(o) % 16 == 0 && reinterpret_cast<uintptr_t>(g) % 16 == 0;
  if (vectors) {
#pragma unroll 4
    for (int j = 0; j < kBlockN; j += 4) {
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
// thread's two fragment rows, fp32, at workspace row `row0 + row_in_tile` ([S, B, Hq, Lq] order).
template <int D>
__device__ __forceinline__ void write_partial(const AttentionParams& p, const float (&o)[D / 8][4],
                                              const float (&row_max)[2], const float (&row_sum)[2],
                                              int64_t row0, const int (&row_in_tile)[2], int q_rows, int lane) {
  for (int r = 0; r < 2; ++r) {
    if (row_in_tile[r] >= q_rows) continue;
    const int64_t row = row0 + row_in_tile[r];
    const float inv = softmax_inv_sum(row_sum[r]);
    float* out = p.partial_out + row * D;
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<float2*>(out + dt * 8 + 2 * (lane % 4)) =
          make_float2(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    if (lane % 4 == 0) p.partial_lse[row] = softmax_lse(row_max[r], row_sum[r]);
  }
}

// Q tile (kM x 64 rows), kStages K and V tiles (16-bit), kStages pairs of key-label rows.
template <int D, int kStages, int kM>
constexpr int shared_bytes() {
  return (kM * kBlockM * D + 2 * kStages * kBlockN * D) * 2 + 2 * kStages * kBlockN * 4;
}

// ---------------------------------------------------------------- one key tile, per warp
// The thread's fragment covers rows row_in_tile[0..1] (lane / 4 and lane / 4 + 8 of the warp's
// 16) and, in n8 tile nt, columns nt * 8 + 2 * (lane % 4) + {0, 1}: element e of s[nt] is row
// e / 2, column offset e % 2.

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
// ahead of the MMAs so that its latency hides behind them. kNext (not yet run on a GPU): one row
// address per fragment row and tile, and with a unit key stride each thread's two adjacent keys
// in one load.
template <typename B, typename Sink>
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
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
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

// bias_by_row_as for the bias dtype (one uniform branch per tile, not one per element).
template <typename Sink>
__device__ __forceinline__ void bias_by_row(const AttentionParams& p, int64_t b, int64_t h, int64_t q0, int64_t k0,
                                            const int (&row_in_tile)[2], int q_rows, int cols, int lane, Sink&& sink) {
  switch (p.bias_dtype) {
    case DType::kBFloat16: return bias_by_row_as<bf16_t>(p, b, h, q0, k0, row_in_tile, q_rows, cols, lane, sink);
    case DType::kFloat16: return bias_by_row_as<fp16_t>(p, b, h, q0, k0, row_in_tile, q_rows, cols, lane, sink);
    default: return bias_by_row_as<float>(p, b, h, q0, k0, row_in_tile, q_rows, cols, lane, sink);
  }
}

__device__ __forceinline__ void load_bias_by_row(float (&bias)[kBlockN / 8][4], const AttentionParams& p, int64_t b,
                                                 int64_t h, int64_t q0, int64_t k0, const int (&row_in_tile)[2],
                                                 int q_rows, int cols, int lane) {
  bias_by_row(p, b, h, q0, k0, row_in_tile, q_rows, cols, lane, [&](int nt, int e, float x) { bias[nt][e] = x; });
}

// Adds the bias to masked scores in place (32 rows per warp: no registers for a bias array);
// hidden scores stay -inf whatever the bias.
__device__ __forceinline__ void add_bias_by_row(float (&s)[kBlockN / 8][4], const AttentionParams& p, int64_t b,
                                                int64_t h, int64_t q0, int64_t k0, const int (&row_in_tile)[2],
                                                int q_rows, int cols, int lane) {
  bias_by_row(p, b, h, q0, k0, row_in_tile, q_rows, cols, lane, [&](int nt, int e, float x) {
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
      // PARTIAL (kNext, not yet run on a GPU): the rule per element, the labels of the thread's
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

// Online softmax (base 2) of the thread's two rows: s becomes the tile's probabilities relative
// to the new running max, o and the running sum are rescaled. kNext (not yet run on a GPU): the
// warp skips rescaling o when no row of it has a new max (every factor is exactly 1), which
// after the first tiles is most of them.
template <int D, bool kNext>
__device__ __forceinline__ void softmax_update(float (&s)[kBlockN / 8][4], float (&o)[D / 8][4],
                                               float (&row_max)[2], float (&row_sum)[2]) {
  float alpha[2];
  for (int r = 0; r < 2; ++r) {
    float tile_max = -INFINITY;
    for (int nt = 0; nt < kBlockN / 8; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    const float m_new = fmaxf(row_max[r], quad_max(tile_max));
    const float offset = softmax_offset(m_new);
    float tile_sum = 0.0f;
    for (int nt = 0; nt < kBlockN / 8; ++nt)
      for (int e = 2 * r; e < 2 * r + 2; ++e) {
        s[nt][e] = exp2f(s[nt][e] - offset);
        tile_sum += s[nt][e];
      }
    alpha[r] = softmax_rescale(row_max[r], m_new);
    row_sum[r] = row_sum[r] * alpha[r] + quad_sum(tile_sum);
    row_max[r] = m_new;
    if constexpr (!kNext) {
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][2 * r] *= alpha[r];
        o[dt][2 * r + 1] *= alpha[r];
      }
    }
  }
  if constexpr (kNext) {
    if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f))
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
template <typename T>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[kBlockN / 16][4], const float (&s)[kBlockN / 8][4]) {
  for (int kk = 0; kk < kBlockN / 16; ++kk) {
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

// kStages = 1: one K and one V buffer (V_j loads during Q K_j^T, K_j+1 during P V_j).
// kStages = 2: two of each; K and V of the next visible tile load during the whole of tile j.
// kNext: the changes made after the last device run (H200, d45fee2), opt-in through
// AttentionParams::next_paths until a GPU run has verified them: load_bias_by_row; interior
// PARTIAL tiles without bounds tests (mask_scores); warps without query rows skip the tile math;
// o is rescaled only when a row of the warp has a new max (softmax_update). With kNext false the
// kernel compiles to the verified machine code (scripts/compare_sass.py d45fee2).
// kM = 2 (next paths and two buffers only; AttentionParams::wide_rows): 32 query rows per warp,
// 128 per CTA.
template <typename T, int D, int kStages, bool kNext, int kM>
__global__ void __launch_bounds__(kThreads) attention_sm80_kernel(const AttentionParams p) {
  static_assert(kStages == 1 || kStages == 2, "one or two K/V buffers");
  static_assert(kM == 1 || (kM == 2 && kStages == 2 && kNext), "32 rows per warp: next paths, two buffers");
  constexpr int kTileM = kBlockM * kM;  // query rows per CTA
  extern __shared__ __align__(128) unsigned char shared_raw[];
  T* q_tile = reinterpret_cast<T*>(shared_raw);      // [kTileM, D] swizzled
  T* k_tiles = q_tile + kTileM * D;                  // [kStages][kBlockN, D]
  T* v_tiles = k_tiles + kStages * kBlockN * D;      // [kStages][kBlockN, D]
  int32_t* k_orders = reinterpret_cast<int32_t*>(v_tiles + kStages * kBlockN * D);  // [kStages][kBlockN]
  int32_t* k_groups = k_orders + kStages * kBlockN;                                  // [kStages][kBlockN]
  // Own 16-byte slot: a widened LDS.128 of an unaligned q_range once also read the neighbouring
  // shared variable, a hazard with lane 0's write of it that racecheck reported.
  __shared__ alignas(16) LabelRange q_range;
  // TileKind of key tiles kinds_first / kBlockN + i, i < kThreads (one classification round).
  __shared__ uint8_t tile_kinds[kThreads];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z / p.num_splits, split = blockIdx.z % p.num_splits, h = blockIdx.y;
  const int64_t kv_head = h / (p.q_heads / p.kv_heads);
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int q_rows = static_cast<int>(p.q_len - q0 < kTileM ? p.q_len - q0 : kTileM);
  int64_t k_len = p.k_len;
  if (p.kv_lens != nullptr) {
    const int64_t len = p.kv_lens[b];
    k_len = len < 0 ? 0 : (len < p.k_len ? len : p.k_len);
  }
  // This split's keys [k_begin, k_end): a run of whole tiles (all of them when num_splits = 1).
  const int64_t tiles_per_split = ceil_div(ceil_div(k_len, kBlockN), p.num_splits);
  const int64_t k_begin = split * tiles_per_split * kBlockN;
  const int64_t k_end = k_begin + tiles_per_split * kBlockN < k_len ? k_begin + tiles_per_split * kBlockN : k_len;

  const T* q_src = static_cast<const T*>(p.q) + b * p.q_strides[0] + q0 * p.q_strides[1] + h * p.q_strides[2];
  const T* k_src = static_cast<const T*>(p.k) + b * p.k_strides[0] + kv_head * p.k_strides[2];
  const T* v_src = static_cast<const T*>(p.v) + b * p.v_strides[0] + kv_head * p.v_strides[2];
  load_tile_async<T, D>(q_tile, q_src, p.q_strides[1], kTileM, q_rows);
  cp_async_commit();

  // The two fragment rows of this thread in each of its m-tiles (tile-local) and their labels.
  int row_in_tile[kM][2];
  // Rows the masking need not bound-check: the whole tile's (kNext: the m-tile's 16). kNext warps
  // without a row (a query tile of fewer rows than the CTA's, e.g. 32 sparse queries) skip the math.
  bool rows_full[kM];
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    const int first = warp * 16 * kM + m * 16;
    row_in_tile[m][0] = first + lane / 4;
    row_in_tile[m][1] = first + lane / 4 + 8;
    rows_full[m] = kNext ? first + 16 <= q_rows : q_rows == kTileM;
  }
  const bool warp_has_rows = !kNext || warp * 16 * kM < q_rows;
  RowLabels row_labels[kM];
#pragma unroll
  for (int m = 0; m < kM; ++m) row_labels[m] = {{0, 0}, {0, 0}};
  if (p.has_labels) {
#pragma unroll
    for (int m = 0; m < kM; ++m)
      for (int r = 0; r < 2; ++r)
        if (row_in_tile[m][r] < q_rows) {
          row_labels[m].order[r] = p.q_order.at(b, q0 + row_in_tile[m][r]);
          row_labels[m].group[r] = p.q_group.at(b, q0 + row_in_tile[m][r]);
        }
    if (warp == 0) {
      LabelRange range = LabelRange::empty();
      for (int i = lane; i < q_rows; i += 32) range.add(p.q_order.at(b, q0 + i), p.q_group.at(b, q0 + i));
      range = warp_reduce(range);
      if (lane == 0) q_range = range;
    }
  }
  cp_async_wait_all();
  __syncthreads();

  uint32_t q_frag[D / 16][4];  // kM = 1: Q in registers for the whole loop
  if constexpr (kM == 1)
    for (int ks = 0; ks < D / 16; ++ks)
      ldmatrix_x4(q_frag[ks], smem_address(q_tile + swizzled<D>(warp * 16 + ((lane / 8) % 2) * 8 + lane % 8,
                                                                ks * 16 + (lane / 16) * 8)));

  float o[kM][D / 8][4] = {};
  float row_max[kM][2], row_sum[kM][2];
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    row_max[m][0] = row_max[m][1] = -INFINITY;
    row_sum[m][0] = row_sum[m][1] = 0.0f;
  }
  const float score_scale = p.scale * kLog2e;

  auto tile_cols = [&](int64_t k0) { return static_cast<int>(k_end - k0 < kBlockN ? k_end - k0 : kBlockN); };
  // One classification round (all threads; has barriers): thread i classifies key tile
  // first + i * kBlockN against the query tile's labels into tile_kinds[i] (SKIP past k_end).
  int64_t kinds_first = k_begin;  // tile_kinds holds the kinds of keys [kinds_first, + kThreads * kBlockN)
  bool kinds_valid = false;
  auto classify_round = [&](int64_t first) {
    __syncthreads();  // every thread has read the previous round's kinds (and q_range is written)
    const int64_t k0 = first + static_cast<int64_t>(threadIdx.x) * kBlockN;
    TileKind kind = TileKind::kSkip;
    if (k0 < k_end) kind = classify_tile(q_range, key_tile_range(p.k_order, p.k_group, b, k0, tile_cols(k0)));
    tile_kinds[threadIdx.x] = static_cast<uint8_t>(kind);
    kinds_first = first;
    kinds_valid = true;
    __syncthreads();
  };
  // The first tile at or after `from` (a tile start) that the labels do not skip, k_end if none;
  // its kind in `kind`. Every thread walks the same shared kinds (uniform result); a new round
  // starts when the walk leaves the classified run, so call it from every thread.
  auto next_tile = [&](int64_t from, TileKind& kind) -> int64_t {
    kind = TileKind::kFull;
    if (!p.has_labels) return from;
    for (int64_t k0 = from; k0 < k_end; k0 += kBlockN) {
      if (!kinds_valid || k0 >= kinds_first + static_cast<int64_t>(kThreads) * kBlockN) {
        classify_round(k0);
      }
      kind = static_cast<TileKind>(tile_kinds[(k0 - kinds_first) / kBlockN]);
      if (kind != TileKind::kSkip) return k0;
    }
    return k_end;
  };
  auto load_k = [&](int64_t k0, int stage) {
    load_tile_async<T, D>(k_tiles + stage * kBlockN * D, k_src + k0 * p.k_strides[1], p.k_strides[1], kBlockN,
                          tile_cols(k0));
  };
  auto load_v = [&](int64_t k0, int stage) {
    load_tile_async<T, D>(v_tiles + stage * kBlockN * D, v_src + k0 * p.v_strides[1], p.v_strides[1], kBlockN,
                          tile_cols(k0));
  };
  // Key labels of a PARTIAL tile into label buffer `stage` (threads 0-63: orders, 64-127: groups),
  // in the caller's cp.async group; keys past the tile's end are never read.
  static_assert(kThreads == 2 * kBlockN, "one label per thread");
  auto load_labels = [&](int64_t k0, TileKind kind, int stage) {
    if (kind != TileKind::kPartial) return;
    const int j = threadIdx.x % kBlockN;
    if (j >= tile_cols(k0)) return;
    const bool groups = threadIdx.x >= kBlockN;
    const LabelView& labels = groups ? p.k_group : p.k_order;
    int32_t* dst = (groups ? k_groups : k_orders) + stage * kBlockN + j;
    cp_async_4(smem_address(dst), labels.data + b * labels.batch_stride + (k0 + j) * labels.row_stride);
  };
  const bool has_bias = p.bias != nullptr;

  TileKind kind;
  int64_t k0 = next_tile(k_begin, kind);
  if (k0 < k_end) {
    load_k(k0, 0);
    load_labels(k0, kind, 0);
    if (kStages == 2) load_v(k0, 0);
  }
  cp_async_commit();
  if (kStages == 1) {
    // FlashAttention-2's pipeline: V of tile j streams in while S = Q K_j^T and the softmax run;
    // K of the next visible tile streams in while O += P V_j runs. The barriers say which reads
    // must end before a buffer is refilled.
    while (k0 < k_end) {
      const int cols = tile_cols(k0);
      load_v(k0, 0);
      cp_async_commit();
      float bias[kBlockN / 8][4];
      if (has_bias) load_bias<kNext>(bias, p, b, h, q0, k0, row_in_tile[0], q_rows, cols, lane);
      cp_async_wait<1>();  // K_j and its labels have landed (V_j may still be in flight)
      __syncthreads();
      float s[kBlockN / 8][4];
      score_tile<T, D>(s, q_frag, k_tiles, lane);
      mask_scores<kNext>(s, bias, has_bias, score_scale, kind, k_orders, k_groups, row_labels[0], row_in_tile[0],
                         q_rows, rows_full[0], cols, lane);
      softmax_update<D, kNext>(s, o[0], row_max[0], row_sum[0]);
      cp_async_wait<0>();  // V_j has landed
      __syncthreads();     // ... for every thread; and every warp is done with the K tile and the labels
      TileKind next_kind;
      const int64_t k_next = next_tile(k0 + kBlockN, next_kind);
      if (k_next < k_end) {
        load_k(k_next, 0);
        load_labels(k_next, next_kind, 0);
      }
      cp_async_commit();
      accumulate_pv<T, D>(o[0], s, v_tiles, lane);
      __syncthreads();  // the next iteration's V load overwrites the V tile
      k0 = k_next;
      kind = next_kind;
    }
  } else {
    // Two buffers: tile j computes from buffer `stage` while K, V and the labels of the next
    // visible tile load into the other one, a whole tile's work ahead.
    int stage = 0;
    while (k0 < k_end) {
      const int cols = tile_cols(k0);
      TileKind next_kind;
      const int64_t k_next = next_tile(k0 + kBlockN, next_kind);
      if (k_next < k_end) {
        load_k(k_next, stage ^ 1);
        load_labels(k_next, next_kind, stage ^ 1);
        load_v(k_next, stage ^ 1);
      }
      cp_async_commit();
      float bias[kBlockN / 8][4];  // kM = 1: loaded ahead of the MMAs (kM = 2 adds it after masking)
      if (kM == 1 && has_bias && warp_has_rows)
        load_bias<kNext>(bias, p, b, h, q0, k0, row_in_tile[0], q_rows, cols, lane);
      cp_async_wait<1>();  // tile j's K, V and labels have landed (the next tile's may be in flight)
      __syncthreads();
      if (warp_has_rows) {
        const T* k_tile = k_tiles + stage * kBlockN * D;
        const T* v_tile = v_tiles + stage * kBlockN * D;
        float s[kM][kBlockN / 8][4];
        if constexpr (kM == 1) score_tile<T, D>(s[0], q_frag, k_tile, lane);
        else score_tile_wide<T, D>(s, q_tile, warp, k_tile, lane);
        uint32_t pa[kM][kBlockN / 16][4];  // kM = 2: P packed per m-tile
#pragma unroll
        for (int m = 0; m < kM; ++m) {
          // kM = 2: the bias is added after the masking, straight from memory (no bias array).
          mask_scores<kNext>(s[m], bias, kM == 1 && has_bias, score_scale, kind, k_orders + stage * kBlockN,
                             k_groups + stage * kBlockN, row_labels[m], row_in_tile[m], q_rows, rows_full[m], cols,
                             lane);
          if (kM == 2 && has_bias) add_bias_by_row(s[m], p, b, h, q0, k0, row_in_tile[m], q_rows, cols, lane);
          softmax_update<D, kNext>(s[m], o[m], row_max[m], row_sum[m]);
          if constexpr (kM == 2) pack_p<T>(pa[m], s[m]);
        }
        if constexpr (kM == 1) accumulate_pv<T, D>(o[0], s[0], v_tile, lane);
        else accumulate_pv_wide<T, D>(o, pa, v_tile, lane);
      }
      __syncthreads();  // every warp is done with buffer `stage` before the next look-ahead refills it
      k0 = k_next;
      kind = next_kind;
      stage ^= 1;
    }
  }
  cp_async_wait<0>();  // nothing left in flight (the last commit is an empty group)

#pragma unroll
  for (int m = 0; m < kM; ++m) {
    if (p.num_splits > 1) {
      write_partial<D>(p, o[m], row_max[m], row_sum[m], ((split * p.batch + b) * p.q_heads + h) * p.q_len + q0,
                       row_in_tile[m], q_rows, lane);
      continue;
    }
    for (int r = 0; r < 2; ++r) {
      if (row_in_tile[m][r] >= q_rows) continue;
      const float inv = softmax_inv_sum(row_sum[m][r]);
      T* out = static_cast<T*>(p.out) + b * p.out_strides[0] + (q0 + row_in_tile[m][r]) * p.out_strides[1] +
               h * p.out_strides[2];
      for (int dt = 0; dt < D / 8; ++dt) {
        const int col = dt * 8 + 2 * (lane % 4);
        *reinterpret_cast<uint32_t*>(out + col) = MmaType<T>::pack(o[m][dt][2 * r] * inv, o[m][dt][2 * r + 1] * inv);
      }
      if (lane % 4 == 0)
        p.lse[(b * p.q_heads + h) * p.q_len + q0 + row_in_tile[m][r]] = softmax_lse(row_max[m][r], row_sum[m][r]);
    }
  }
}

// out, lse of one (batch, head, query row) per warp from the S partials:
//   lse = log sum_s exp(lse_s),  out = sum_s exp(lse_s - lse) out_s;  all parts empty: 0 and -inf.
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
  for (int j = 0; j < kPerLane; j += 2) *reinterpret_cast<uint32_t*>(out + j) = MmaType<T>::pack(acc[j], acc[j + 1]);
  if (lane == 0) p.lse[row] = lse_max == -INFINITY ? -INFINITY : lse_max + logf(sum);
}

template <typename T, int D, int kStages, bool kNext, int kM = 1>
cudaError_t launch_sm80(const AttentionParams& p, cudaStream_t stream) {
  constexpr int bytes = shared_bytes<D, kStages, kM>();
  auto kernel = attention_sm80_kernel<T, D, kStages, kNext, kM>;
  const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (attr != cudaSuccess) return attr;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.q_len, kM * kBlockM)), static_cast<unsigned>(p.q_heads),
                  static_cast<unsigned>(p.batch * p.num_splits));
  kernel<<<grid, kThreads, bytes, stream>>>(p);
  if (p.num_splits == 1) return cudaGetLastError();
  const cudaError_t launched = cudaGetLastError();
  if (launched != cudaSuccess) return launched;
  const int64_t rows = p.batch * p.q_heads * p.q_len;
  merge_splits_kernel<T, D><<<static_cast<unsigned>(ceil_div(rows, kMergeWarps)), 32 * kMergeWarps, 0, stream>>>(p);
  return cudaGetLastError();
}

// The kernel instance for p.kv_stages, p.next_paths and p.wide_rows (next_paths and wide_rows: two
// buffers only).
template <typename T, int D>
cudaError_t launch_variant(const AttentionParams& p, cudaStream_t stream) {
  if (p.wide_rows) return launch_sm80<T, D, 2, true, 2>(p, stream);
  if (p.next_paths) return launch_sm80<T, D, 2, true>(p, stream);
  return p.kv_stages == 2 ? launch_sm80<T, D, 2, false>(p, stream) : launch_sm80<T, D, 1, false>(p, stream);
}

// cp.async moves 16 bytes: every row of q / k / v must start on a 16-byte boundary; the epilogue
// stores pairs of outputs as 4-byte words; the merge reads the split workspace as float4 / float2.
bool rows_are_16_byte_aligned(const AttentionParams& p) {
  if (p.num_splits > 1 && (reinterpret_cast<uintptr_t>(p.partial_out) % 16 != 0 ||
                           reinterpret_cast<uintptr_t>(p.partial_lse) % 4 != 0))
    return false;
  if (reinterpret_cast<uintptr_t>(p.out) % 4 != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (p.out_strides[d] % 2 != 0) return false;
  const void* ptrs[] = {p.q, p.k, p.v};
  const int64_t* strides[] = {p.q_strides, p.k_strides, p.v_strides};
  for (int t = 0; t < 3; ++t) {
    if (reinterpret_cast<uintptr_t>(ptrs[t]) % 16 != 0) return false;
    for (int d = 0; d < 3; ++d)
      if (strides[t][d] % 8 != 0) return false;  // 8 elements of 16 bits
  }
  return true;
}

}  // namespace

int attention_num_splits(int64_t batch, int64_t q_heads, int64_t q_len, int64_t k_len, int64_t head_dim,
                         int sm_count, int rows_per_cta) {
  if (batch <= 0 || q_heads <= 0 || q_len <= 0 || k_len <= 0 || sm_count <= 0) return 1;
  if (head_dim != 64 && head_dim != 128) return 1;  // the CUDA-core kernel runs: it never splits
  if (rows_per_cta != kBlockM && rows_per_cta != 2 * kBlockM) return 1;
  const int64_t ctas = batch * q_heads * ceil_div(q_len, rows_per_cta);
  int64_t splits = (kSplitTargetCtasPerSm * sm_count + ctas / 2) / ctas;  // nearest to the target
  const int64_t most_by_keys = ceil_div(ceil_div(k_len, kBlockN), kSplitMinKeyTiles);
  splits = splits < most_by_keys ? splits : most_by_keys;
  splits = splits < kAttentionMaxSplits ? splits : kAttentionMaxSplits;
  splits = splits < kMaxGridDim / batch ? splits : kMaxGridDim / batch;
  return splits > 1 ? static_cast<int>(splits) : 1;
}

bool attention_sm80_supports(const AttentionParams& p) {
  return (p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16) &&
         (p.head_dim == 64 || p.head_dim == 128) && rows_are_16_byte_aligned(p) &&
         p.num_splits >= 1 && p.num_splits <= kAttentionMaxSplits && (p.kv_stages == 1 || p.kv_stages == 2) &&
         (!p.next_paths || p.kv_stages == 2) &&
         (!p.wide_rows || (p.next_paths && p.kv_stages == 2)) &&
         p.q_len <= kMaxGridDim * kBlockM && p.q_heads <= kMaxGridDim && p.batch * p.num_splits <= kMaxGridDim;
}

cudaError_t attention_forward_sm80(const AttentionParams& p, cudaStream_t stream) {
  if (p.batch * p.q_heads * p.q_len == 0) return cudaSuccess;
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.head_dim == 64) return bf16 ? launch_variant<bf16_t, 64>(p, stream) : launch_variant<fp16_t, 64>(p, stream);
  return bf16 ? launch_variant<bf16_t, 128>(p, stream) : launch_variant<fp16_t, 128>(p, stream);
}

}  // namespace dlmfuse::cuda
