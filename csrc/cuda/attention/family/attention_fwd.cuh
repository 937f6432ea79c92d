// The attention family's forward kernel, attention_fwd<Traits>: bf16 / fp16 in, fp32 accumulation,
// head_dim 64 / 128, FlashAttention-2 structure, every launch decision from the planner
// (dlmfuse/attention_planner.h):
//
//   CTA = 4 warps over tile_m query rows (64: 16 rows per warp; 128: 32, two m16 tiles each).
//   Q tile -> shared once. The key walk (key_walk.cuh) hands out work tiles (SKIP tiles never
//   loaded); K, V, the key labels of PARTIAL tiles and, for a 16-bit bias, the bias tile of the
//   next work tile load by cp.async into the other of two buffers during the whole of the current
//   tile. S = Q K^T, masking (tile_mask.cuh), bias, online softmax in base 2, O += P V.
//   MMA policy sm80: mma.sync m16n8k16 (Q fragments in registers at 16 rows per warp); sm90: one
//   warpgroup's wgmma batches on 128-byte-swizzled tiles where compiled for sm_90a (elsewhere the
//   same instance runs mma.sync, so no device runs a wgmma it lacks).
//   Split-KV: split s of num_splits walks its own run of whole key tiles and writes a normalised
//   fp32 partial (out_s, lse_s); split_merge.cuh combines them.
//   Documents (packed sequences): tiles and gathered keys are classified with the document ranges,
//   PARTIAL tiles test q_doc == k_doc per element.
//   Rows whose scores float32 cannot hold leave lse -inf (NaN after a split-KV merge) for the
//   float64 rescue that the launcher runs next (exact_row.cuh).
//
// Not yet: TMA, warp specialisation and ping-pong (FlashAttention-3's Hopper mainloop); the sm90
// policy issues each wgmma batch and waits for it.
#pragma once

#include "cuda/attention/attention_sm90_tile.cuh"
#include "cuda/attention/family/key_walk.cuh"
#include "cuda/attention/family/tile_mask.cuh"
#include "dlmfuse/attention_planner.h"

namespace dlmfuse::cuda::family {

template <typename T_, int D_, int kTileM_, AttentionMma kMma_, AttentionWalk kWalk_>
struct FwdTraits {
  using T = T_;
  static constexpr int D = D_;
  static constexpr int kTileM = kTileM_;
  static constexpr int kM = kTileM / kBlockM;  // m16 tiles per warp
  static constexpr bool kSm90 = kMma_ == AttentionMma::kSm90;
  static constexpr bool kUseWgmma = kSm90 && DLMFUSE_WGMMA;  // this compilation has wgmma
  static constexpr bool kGather = kWalk_ == AttentionWalk::kGather;
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  static_assert(kM == 1 || (kM == 2 && kMma_ == AttentionMma::kSm80 && !kGather),
                "128-row tiles: mma.sync, whole-tile walk");
  static_assert(kMma_ != AttentionMma::kSimt, "the CUDA-core kernel is attention_simple.cu");
  // Q, two K and two V tiles (16-bit), two buffers of key labels (order, group, document), and
  // with sm90 the slack that aligns the tiles to wgmma's 1024-byte swizzle atoms: the planner's count.
  static constexpr int kLabelInts = kAttentionKeyLabelInts;
  static_assert(kBlockN == kAttentionKeyTile && kBlockM == kAttentionCtaRows, "the planner's tile sizes");
  static constexpr int kSharedBytes = attention_fwd_dynamic_bytes(kTileM, D, kSm90);
  static_assert(kSharedBytes == (kTileM * D + 4 * kBlockN * D) * 2 + 2 * kLabelInts * 4 + (kSm90 ? 1024 : 0),
                "the layout of attention_fwd_kernel");
  // Static: the key walk's state and the query rows' labels (q_labels in the kernel).
  static_assert(sizeof(WalkShared<kGather>) + 3 * kTileM * sizeof(int32_t) <= attention_fwd_static_bytes(kTileM, kGather),
                "the planner's bound on static shared memory");
};

template <class Tr>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const AttentionParams p) {
  using T = typename Tr::T;
  constexpr int D = Tr::D, kTileM = Tr::kTileM, kM = Tr::kM;
  constexpr bool kWgmma = Tr::kUseWgmma;
  extern __shared__ __align__(128) unsigned char shared_raw[];
  unsigned char* shared_base = shared_raw;
  if constexpr (Tr::kSm90) shared_base += (1024 - sm80::smem_address(shared_raw) % 1024) % 1024;
  T* q_tile = reinterpret_cast<T*>(shared_base);  // [kTileM, D] swizzled
  T* k_tiles = q_tile + kTileM * D;                // [2][kBlockN, D]
  T* v_tiles = k_tiles + 2 * kBlockN * D;          // [2][kBlockN, D]
  int32_t* key_labels = reinterpret_cast<int32_t*>(v_tiles + 2 * kBlockN * D);  // [2][order, group, doc][kBlockN]
  // A tileable bias (bias_tileable) whose tiles the launch gave room: [2][kTileM][kBiasPitch] 16-bit.
  uint16_t* bias_tiles = reinterpret_cast<uint16_t*>(key_labels + 2 * Tr::kLabelInts);
  __shared__ WalkShared<Tr::kGather> walk_shared;
  // Labels of the tile's query rows (order, group, document; 0 past the last row), read by the
  // masking of PARTIAL tiles: in registers they would cost 6 per m16 tile, which 128-row tiles spill.
  __shared__ int32_t q_labels[3][kTileM];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const QueryRows rows = query_rows<kTileM>(p);
  const int64_t b = rows.b;
  const int64_t k_len = effective_k_len(p, b);
  // This split's keys [k_begin, k_end): a run of whole tiles (all of them when num_splits = 1).
  const int64_t tiles_per_split = plan_ceil_div(plan_ceil_div(k_len, kBlockN), p.num_splits);
  const int64_t k_begin = rows.split * tiles_per_split * kBlockN;
  const int64_t k_end = k_begin + tiles_per_split * kBlockN < k_len ? k_begin + tiles_per_split * kBlockN : k_len;

  const T* k_src = static_cast<const T*>(p.k) + b * p.k_strides[0] + rows.kv_head * p.k_strides[2];
  const T* v_src = static_cast<const T*>(p.v) + b * p.v_strides[0] + rows.kv_head * p.v_strides[2];
  if (rows.packed) {
    sm80::load_packed_q_tile_async<T, D, kWgmma>(q_tile, p, b, rows.kv_head, rows.group, rows.q0, kTileM, rows.count);
  } else {
    const T* q_src = static_cast<const T*>(p.q) + b * p.q_strides[0] + rows.q0 * p.q_strides[1] + rows.h * p.q_strides[2];
    sm80::load_tile_async<T, D, kWgmma>(q_tile, q_src, p.q_strides[1], kTileM, rows.count);
  }
  sm80::cp_async_commit();

  // The thread's two fragment rows in each of its m16 tiles (tile-local).
  int row_in_tile[kM][2];
  bool rows_full[kM];  // the m16 tile has all its rows (no bounds test in the masking)
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    const int first = warp * 16 * kM + m * 16;
    rows_full[m] = first + 16 <= rows.count;
    for (int r = 0; r < 2; ++r) row_in_tile[m][r] = first + lane / 4 + 8 * r;
  }
  if (p.has_labels)
    for (int row = threadIdx.x; row < kTileM; row += kThreads) {
      const bool inside = row < rows.count;
      const int64_t query = inside ? rows.query(row) : 0;
      q_labels[0][row] = inside ? p.q_order.at(b, query) : 0;
      q_labels[1][row] = inside ? p.q_group.at(b, query) : 0;
      q_labels[2][row] = inside && p.has_docs ? p.q_doc.at(b, query) : 0;
    }
  // Warps without a query row (a tile of fewer rows, e.g. 32 sparse queries) skip the math; with
  // wgmma the whole warpgroup takes part in every batch.
  const bool warp_has_rows = kWgmma || warp * 16 * kM < rows.count;

  KeyWalk<Tr::kGather> walk(p, rows, walk_shared, k_begin, k_end);
  sm80::cp_async_wait_all();
  if constexpr (kWgmma) sm90::fence_proxy_async_shared();  // Q for wgmma's operand reads
  __syncthreads();
  walk.sort_groups();

  uint32_t q_frag[D / 16][4];  // 16 rows per warp with mma.sync: Q in registers for the whole loop
  if constexpr (kM == 1 && !kWgmma)
    for (int ks = 0; ks < D / 16; ++ks)
      sm80::ldmatrix_x4(q_frag[ks], sm80::smem_address(q_tile + sm80::swizzled<D>(warp * 16 + ((lane / 8) % 2) * 8 + lane % 8,
                                                                                  ks * 16 + (lane / 16) * 8)));

  float o[kM][D / 8][4] = {};
  float row_max[kM][2], row_sum[kM][2];
#pragma unroll
  for (int m = 0; m < kM; ++m)
    for (int r = 0; r < 2; ++r) {
      row_max[m][r] = -INFINITY;
      row_sum[m][r] = 0.0f;
    }
  const float score_scale = p.scale * kLog2e;
  const bool has_bias = p.bias != nullptr;
  const bool bias_tiled = sm80::bias_tileable(p) &&
                          sm80::dynamic_shared_bytes() >= Tr::kSharedBytes + sm80::bias_tiles_bytes(kTileM);

  // K, V, a PARTIAL tile's key labels and a bias tile of `tile` into buffer `stage` (the caller's
  // cp.async group). Threads 0-63 bring orders and documents, 64-127 groups; keys past cols are
  // never read.
  auto load_work = [&](const WorkTile& tile, int stage) {
    auto key_of = [&](int j) { return walk.key(tile, j); };
    T* k_dst = k_tiles + stage * kBlockN * D;
    T* v_dst = v_tiles + stage * kBlockN * D;
    if (tile.slot < 0) {
      sm80::load_tile_async<T, D, kWgmma>(k_dst, k_src + tile.k0 * p.k_strides[1], p.k_strides[1], kBlockN, tile.cols);
      sm80::load_tile_async<T, D, kWgmma>(v_dst, v_src + tile.k0 * p.v_strides[1], p.v_strides[1], kBlockN, tile.cols);
    } else {
      sm80::load_gathered_tile_async<T, D, kWgmma>(k_dst, k_src, p.k_strides[1], kBlockN, tile.cols, key_of);
      sm80::load_gathered_tile_async<T, D, kWgmma>(v_dst, v_src, p.v_strides[1], kBlockN, tile.cols, key_of);
    }
    if (tile.kind == TileKind::kPartial) {
      const int j = threadIdx.x % kBlockN;
      if (j < tile.cols) {
        const int64_t key = key_of(j);
        int32_t* labels = key_labels + stage * Tr::kLabelInts;
        const bool groups = threadIdx.x >= kBlockN;
        const LabelView& view = groups ? p.k_group : p.k_order;
        sm80::cp_async_4(sm80::smem_address(labels + (groups ? kBlockN : 0) + j),
                         view.data + b * view.batch_stride + key * view.row_stride);
        if (!groups && p.has_docs)
          sm80::cp_async_4(sm80::smem_address(labels + 2 * kBlockN + j),
                           p.k_doc.data + b * p.k_doc.batch_stride + key * p.k_doc.row_stride);
      }
    }
    if (bias_tiled)  // (a bias never comes with the gathered walk: the planner's rule)
      sm80::load_bias_tile_async<kTileM>(bias_tiles + stage * kTileM * sm80::kBiasPitch, p, b, rows.h, rows.q0,
                                         rows.count, tile.k0, tile.cols);
  };

  // Two buffers: tile j computes from buffer `stage` while the next work tile loads into the other.
  WorkTile tile;
  bool more = walk.next(tile);
  if (more) load_work(tile, 0);
  sm80::cp_async_commit();
  int stage = 0;
  while (more) {
    WorkTile next_tile;
    const bool next_more = walk.next(next_tile);
    if (next_more) load_work(next_tile, stage ^ 1);
    sm80::cp_async_commit();
    // A bias without tiles, loaded ahead of the MMAs so that its latency hides behind them (16 rows
    // per warp; 32 add it by rows after the masking: no registers for it there).
    float bias_regs[kBlockN / 8][4];
    const bool bias_ahead = kM == 1 && has_bias && !bias_tiled && warp_has_rows;
    if (bias_ahead)
      sm80::load_bias_by_row(bias_regs, p, b, rows.h, rows.q0, tile.k0, row_in_tile[0], rows.count, tile.cols, lane);
    sm80::cp_async_wait<1>();  // this tile's loads have landed (the next tile's may be in flight)
    if constexpr (kWgmma) sm90::fence_proxy_async_shared();
    __syncthreads();
    if (warp_has_rows) {
      const T* k_tile = k_tiles + stage * kBlockN * D;
      const T* v_tile = v_tiles + stage * kBlockN * D;
      const int32_t* labels = key_labels + stage * Tr::kLabelInts;
      const KeyLabels keys{labels, labels + kBlockN, labels + 2 * kBlockN};
      float s[kM][kBlockN / 8][4];
      if constexpr (kWgmma) sm90::score_tile<T, D>(s[0], q_tile, k_tile);
      else if constexpr (kM == 1) sm80::score_tile<T, D>(s[0], q_frag, k_tile, lane);
      else sm80::score_tile_wide<T, D>(s, q_tile, warp, k_tile, lane);
      uint32_t pa[kM][kBlockN / 16][4];  // 128-row tiles: P packed per m16 tile
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        RowLabels row_labels = {};
        if (tile.kind == TileKind::kPartial)
          for (int r = 0; r < 2; ++r) {
            row_labels.order[r] = q_labels[0][row_in_tile[m][r]];
            row_labels.group[r] = q_labels[1][row_in_tile[m][r]];
            row_labels.doc[r] = q_labels[2][row_in_tile[m][r]];
          }
        mask_tile(s[m], score_scale, tile.kind, keys, p.has_docs, row_labels, row_in_tile[m], rows.count,
                  rows_full[m], tile.cols, lane);
        if (bias_tiled) {
          sm80::add_bias_tile(s[m], p.bias_dtype, bias_tiles + stage * kTileM * sm80::kBiasPitch, row_in_tile[m], lane);
        } else if (bias_ahead) {
#pragma unroll
          for (int nt = 0; nt < kBlockN / 8; ++nt)
            for (int e = 0; e < 4; ++e)
              if (s[m][nt][e] != -INFINITY) s[m][nt][e] += bias_regs[nt][e];
        } else if (has_bias)
          sm80::add_bias_by_row(s[m], p, b, rows.h, rows.q0, tile.k0, row_in_tile[m], rows.count, tile.cols, lane);
        sm80::softmax_update<D, true>(s[m], o[m], row_max[m], row_sum[m]);
        if constexpr (kM == 2) sm80::pack_p<T>(pa[m], s[m]);
      }
      if constexpr (kWgmma) sm90::accumulate_pv<T, D>(o[0], s[0], v_tile);
      else if constexpr (kM == 1) sm80::accumulate_pv<T, D>(o[0], s[0], v_tile, lane);
      else sm80::accumulate_pv_wide<T, D>(o, pa, v_tile, lane);
    }
    __syncthreads();  // every warp is done with buffer `stage` before the next look-ahead refills it
    tile = next_tile;
    more = next_more;
    stage ^= 1;
  }
  sm80::cp_async_wait<0>();  // nothing left in flight (the last commit is an empty group)

#pragma unroll
  for (int m = 0; m < kM; ++m)
    for (int r = 0; r < 2; ++r) {
      if (row_in_tile[m][r] >= rows.count) continue;
      const int64_t query = rows.query(row_in_tile[m][r]), head = rows.head(row_in_tile[m][r]);
      const int64_t lse_row = (b * p.q_heads + head) * p.q_len + query;  // [B, Hq, Lq]
      if (p.num_splits > 1) {  // a broken partial writes a NaN lse (write_partial_row)
        sm80::write_partial_row<D>(p, o[m], row_max[m], row_sum[m], r,
                                   rows.split * p.batch * p.q_heads * p.q_len + lse_row, lane);
        continue;
      }
      sm80::write_output_row<T, D>(p, o[m], row_max[m], row_sum[m], r, b, query, head, lane);
    }
}

}  // namespace dlmfuse::cuda::family
