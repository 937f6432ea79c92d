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
// FlashAttention-2's pipeline: V_j loads during Q K_j^T, K_j+1 during P V_j). 32 rows per warp
// (128-row CTAs) exist as the opt-in kM = 2 instance, and GQA packing (the query heads of a KV
// head share CTAs when few query rows make that need fewer CTAs) as part of the next paths, an
// sm_90a instance with warpgroup MMAs (kWgmma), and gathered keys (kGather: PARTIAL tiles' keys
// classified one by one into FULL and PARTIAL tiles, hidden keys never loaded); none has run on a
// GPU yet. Not yet: TMA, warp
// specialisation (FlashAttention-3's producer / consumer warpgroups).
//
// The per-warp tile math lives in attention_sm80_tile.cuh; this file has the kernel's tile loop;
// attention_sm80.cu the split-KV merge, the launch and the host-side checks.
#pragma once

#include "cuda/attention/attention_sm80_tile.cuh"
#include "cuda/attention/attention_sm90_tile.cuh"

namespace dlmfuse::cuda::sm80 {

DLMFUSE_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Gathered keys (kGather): one gathering round classifies the keys of up to this many consecutive
// PARTIAL tiles, 8 keys per thread.
constexpr int kGatherTiles = 16;
constexpr int kGatherKeys = kGatherTiles * kBlockN;
static_assert(kGatherKeys == 8 * kThreads, "8 keys per thread per gathering round");

// Q tile (kM x 64 rows), kStages K and V tiles (16-bit), kStages pairs of key-label rows.
template <int D, int kStages, int kM>
DLMFUSE_HOST_DEVICE constexpr int shared_bytes() {
  return (kM * kBlockM * D + 2 * kStages * kBlockN * D) * 2 + 2 * kStages * kBlockN * 4;
}

// kStages = 1: one K and one V buffer (V_j loads during Q K_j^T, K_j+1 during P V_j).
// kStages = 2: two of each; K and V of the next visible tile load during the whole of tile j.
// kNext: the changes made after the first kernels' device run (H200, d45fee2), selected by
// AttentionParams::next_paths (verified on an H200, 2026-11-27): load_bias_by_row; interior
// PARTIAL tiles without bounds tests (mask_scores); warps without query rows skip the tile math;
// o is rescaled only when a row of the warp has a new max (softmax_update); a 16-bit bias streams
// into shared memory with K and V (load_bias_tile_async); GQA packing (AttentionParams::pack_gqa,
// load_packed_q_tile_async, query_of / head_of); the heaviest-first grid order with labels
// (launch_sm80). With kNext false the kernel compiles to d45fee2's machine code
// (scripts/compare_sass.py d45fee2).
// kM = 2 (next paths and two buffers only; AttentionParams::wide_rows): 32 query rows per warp,
// 128 per CTA.
// kWgmma (AttentionParams::wgmma): the next paths with S = Q K^T and O += P V as warpgroup MMAs
// (sm90::score_tile / accumulate_pv) on 128-byte-swizzled, 1024-byte-aligned tiles, where the
// instance is compiled for sm_90a (kUseWgmma); compiled for other architectures it is the next
// paths' mma.sync kernel, so no device runs a wgmma it lacks.
// kGather (AttentionParams::gather_keys; labels, no bias): a run of up to kGatherTiles PARTIAL
// tiles is classified key by key (classify_key against the CTA's query labels) into a shared list:
// keys every row sees form FULL tiles, keys some row sees PARTIAL tiles, the rest are never loaded.
// K, V and labels of a gathered tile load row by row from the list. A run whose gathered tiles
// would not be fewer than its own runs as it is, and ends gathering in the CTA. Verified on an H200 (2026-11-27).
template <typename T, int D, int kStages, bool kNext, int kM, bool kWgmma = false, bool kGather = false>
__global__ void __launch_bounds__(kThreads) attention_sm80_kernel(const AttentionParams p) {
  static_assert(kStages == 1 || kStages == 2, "one or two K/V buffers");
  static_assert(!kGather || (kNext && kM == 1 && kStages == 2), "gathered keys: next paths, 64-row CTAs, two buffers");
  static_assert(kM == 1 || (kM == 2 && kStages == 2 && kNext), "32 rows per warp: next paths, two buffers");
  static_assert(!kWgmma || (kM == 1 && kStages == 2 && kNext), "wgmma: next paths, two buffers, 64-row CTAs");
  constexpr int kTileM = kBlockM * kM;  // query rows per CTA
  constexpr bool kUseWgmma = kWgmma && DLMFUSE_WGMMA;
  extern __shared__ __align__(128) unsigned char shared_raw[];
  unsigned char* shared_base = shared_raw;
  if constexpr (kWgmma)  // swizzle atoms of 1024 bytes (the launch adds the slack)
    shared_base += (1024 - smem_address(shared_raw) % 1024) % 1024;
  T* q_tile = reinterpret_cast<T*>(shared_base);     // [kTileM, D] swizzled
  T* k_tiles = q_tile + kTileM * D;                  // [kStages][kBlockN, D]
  T* v_tiles = k_tiles + kStages * kBlockN * D;      // [kStages][kBlockN, D]
  int32_t* k_orders = reinterpret_cast<int32_t*>(v_tiles + kStages * kBlockN * D);  // [kStages][kBlockN]
  int32_t* k_groups = k_orders + kStages * kBlockN;                                  // [kStages][kBlockN]
  // kNext, a tileable bias (bias_tileable): [2][kTileM][kBiasPitch] 16-bit, present only then.
  uint16_t* bias_tiles = reinterpret_cast<uint16_t*>(k_groups + kStages * kBlockN);
  // Own 16-byte slot: a widened LDS.128 of an unaligned q_range once also read the neighbouring
  // shared variable, a hazard with lane 0's write of it that racecheck reported.
  __shared__ alignas(16) LabelRange q_range;
  // TileKind of key tiles kinds_first / kBlockN + i, i < kThreads (one classification round).
  __shared__ uint8_t tile_kinds[kThreads];
  // kGather: the query rows' groups (raw, then ascending for classify_key), one gathering round's
  // list of keys (offsets from its first key: FULL keys from the front, PARTIAL keys from the
  // back) and the per-warp key counts of its scan.
  __shared__ int32_t q_groups_raw[kGather ? kBlockM : 1];
  __shared__ int32_t q_groups_sorted[kGather ? kBlockM : 1];
  __shared__ uint16_t gather_list[kGather ? kGatherKeys : 1];
  __shared__ int32_t gather_counts[kWarps];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // h: the query head; with GQA packing (kNext, pack_gqa) the KV head, whose `group` query heads
  // the CTA's rows interleave query-major: packed row P is query P / group of head h * group + P % group.
  // Grid: (query tiles, heads, batch x splits); kNext with labels: (heads, query tiles in
  // descending order, batch x splits), see launch_sm80.
  const bool heaviest_first = kNext && p.has_labels;
  const int64_t b = blockIdx.z / p.num_splits, split = blockIdx.z % p.num_splits;
  const int64_t h = heaviest_first ? blockIdx.x : blockIdx.y;
  const bool packed = kNext && kM == 1 && p.pack_gqa;  // (wide rows: its registers are spent)
  const int64_t group = p.q_heads / p.kv_heads;
  const int64_t kv_head = packed ? h : h / group;
  const int64_t rows_total = packed ? p.q_len * group : p.q_len;
  const int64_t tile_index = heaviest_first ? gridDim.y - 1 - blockIdx.y : blockIdx.x;
  const int64_t q0 = tile_index * kTileM;  // first (packed) row of the tile
  const int q_rows = static_cast<int>(rows_total - q0 < kTileM ? rows_total - q0 : kTileM);
  // Packed rows number below 2^31 (attention_sm80_supports): 32-bit division, fewer registers.
  auto query_of = [&](int row) -> int64_t {
    return packed ? (static_cast<int>(q0) + row) / static_cast<int>(group) : q0 + row;
  };
  auto head_of = [&](int row) -> int64_t {
    return packed ? h * group + (static_cast<int>(q0) + row) % static_cast<int>(group) : h;
  };
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
  if (packed) load_packed_q_tile_async<T, D, kUseWgmma>(q_tile, p, b, kv_head, group, q0, kTileM, q_rows);
  else load_tile_async<T, D, kUseWgmma>(q_tile, q_src, p.q_strides[1], kTileM, q_rows);
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
  const bool warp_has_rows = !kNext || kUseWgmma || warp * 16 * kM < q_rows;  // wgmma: the whole warpgroup
  RowLabels row_labels[kM];
#pragma unroll
  for (int m = 0; m < kM; ++m) row_labels[m] = {{0, 0}, {0, 0}};
  if (p.has_labels) {
#pragma unroll
    for (int m = 0; m < kM; ++m)
      for (int r = 0; r < 2; ++r)
        if (row_in_tile[m][r] < q_rows) {
          row_labels[m].order[r] = p.q_order.at(b, query_of(row_in_tile[m][r]));
          row_labels[m].group[r] = p.q_group.at(b, query_of(row_in_tile[m][r]));
        }
    if constexpr (kGather)
      if (threadIdx.x < q_rows) q_groups_raw[threadIdx.x] = p.q_group.at(b, query_of(threadIdx.x));
    if (warp == 0) {
      LabelRange range = LabelRange::empty();
      for (int i = lane; i < q_rows; i += 32) range.add(p.q_order.at(b, query_of(i)), p.q_group.at(b, query_of(i)));
      range = warp_reduce(range);
      if (lane == 0) q_range = range;
    }
  }
  cp_async_wait_all();
  if constexpr (kUseWgmma) sm90::fence_proxy_async_shared();  // Q for wgmma's operand reads
  __syncthreads();
  if constexpr (kGather) {
    // Rank sort of at most 64 groups (ties by row); read after the barrier that opens each
    // classification or gathering round.
    if (p.has_labels && threadIdx.x < q_rows) {
      const int32_t mine = q_groups_raw[threadIdx.x];
      int rank = 0;
      for (int j = 0; j < q_rows; ++j) {
        const int32_t other = q_groups_raw[j];
        rank += other < mine || (other == mine && j < static_cast<int>(threadIdx.x));
      }
      q_groups_sorted[rank] = mine;
    }
  }

  uint32_t q_frag[D / 16][4];  // kM = 1: Q in registers for the whole loop (not with wgmma)
  if constexpr (kM == 1 && !kUseWgmma)
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
    load_tile_async<T, D, kUseWgmma>(k_tiles + stage * kBlockN * D, k_src + k0 * p.k_strides[1], p.k_strides[1],
                                  kBlockN, tile_cols(k0));
  };
  auto load_v = [&](int64_t k0, int stage) {
    load_tile_async<T, D, kUseWgmma>(v_tiles + stage * kBlockN * D, v_src + k0 * p.v_strides[1], p.v_strides[1],
                                  kBlockN, tile_cols(k0));
  };
  // Key labels of a PARTIAL tile into label buffer `stage` (threads 0-63: orders, 64-127: groups),
  // in the caller's cp.async group; keys past the tile's end are never read.
  static_assert(kThreads == 2 * kBlockN, "one label per thread");
  // Keys j < cols of the tile are key_of(j) (gathered tiles, kGather).
  auto load_labels_of = [&](TileKind kind, int stage, int cols, auto&& key_of) {
    if (kind != TileKind::kPartial) return;
    const int j = threadIdx.x % kBlockN;
    if (j >= cols) return;
    const bool groups = threadIdx.x >= kBlockN;
    const LabelView& labels = groups ? p.k_group : p.k_order;
    int32_t* dst = (groups ? k_groups : k_orders) + stage * kBlockN + j;
    cp_async_4(smem_address(dst), labels.data + b * labels.batch_stride + key_of(j) * labels.row_stride);
  };
  auto load_labels = [&](int64_t k0, TileKind kind, int stage) {
    load_labels_of(kind, stage, tile_cols(k0), [&](int j) { return k0 + j; });
  };
  const bool has_bias = p.bias != nullptr;
  // Bias tiles: a tileable bias, and the launch gave them shared memory (else loads by row / element).
  const bool bias_tiled = kNext && bias_tileable(p) &&
                          dynamic_shared_bytes() >= shared_bytes<D, kStages, kM>() + (kWgmma ? 1024 : 0) +
                                                        bias_tiles_bytes(kTileM);
  auto load_bias_tile = [&](int64_t k0, int stage) {
    if (bias_tiled)
      load_bias_tile_async<kTileM>(bias_tiles + stage * kTileM * kBiasPitch, p, b, h, q0, q_rows, k0, tile_cols(k0));
  };

  // ---- kGather: the walk over work tiles, contiguous or gathered (uniform across the CTA).
  int64_t gather_k0 = 0;  // first key of the current gathering round (list entries are offsets)
  int gather_full = 0, gather_partial = 0;  // keys the round gathered of each kind
  int gather_full_tiles = 0, gather_tiles = 0, gather_next = 0;  // its tiles, FULL ones first
  int64_t scan_from = k_begin;    // where the walk over key tiles resumes
  int64_t plain_until = k_begin;  // PARTIAL tiles before this key run as they are (gathering saved nothing)
  // Keys [first, first + tiles * kBlockN) of a run of PARTIAL tiles into gather_list (all threads;
  // has barriers).
  auto gather_round = [&](int64_t first, int tiles) {
    __syncthreads();  // every thread has issued its loads from the previous round's list
    const int64_t run_end = first + tiles * kBlockN < k_end ? first + tiles * kBlockN : k_end;
    const int64_t key0 = first + 8 * static_cast<int64_t>(threadIdx.x);
    uint32_t full_bits = 0, partial_bits = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (key0 + i >= run_end) continue;
      const TileKind key_kind = classify_key(q_range, q_groups_sorted, q_rows, p.k_order.at(b, key0 + i),
                                             p.k_group.at(b, key0 + i));
      full_bits |= static_cast<uint32_t>(key_kind == TileKind::kFull) << i;
      partial_bits |= static_cast<uint32_t>(key_kind == TileKind::kPartial) << i;
    }
    // Exclusive scan of both counts at once: FULL in the low 16 bits, PARTIAL in the high 16
    // (each at most kGatherKeys).
    const int own = __popc(full_bits) | (__popc(partial_bits) << 16);
    int inclusive = own;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int x = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d) inclusive += x;
    }
    if (lane == 31) gather_counts[warp] = inclusive;
    __syncthreads();
    int before = inclusive - own, total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int count = gather_counts[w];
      if (w < warp) before += count;
      total += count;
    }
    int full_at = before & 0xffff, partial_at = before >> 16;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const auto offset = static_cast<uint16_t>(8 * threadIdx.x + i);
      if ((full_bits >> i) & 1u) gather_list[full_at++] = offset;
      if ((partial_bits >> i) & 1u) gather_list[kGatherKeys - 1 - partial_at++] = offset;
    }
    gather_k0 = first;
    gather_full = total & 0xffff;
    gather_partial = total >> 16;
    __syncthreads();  // the list is complete
  };
  // The next work tile after the current one: its first key (k_end: none left), kind, key count
  // and slot (-1: the contiguous tile at the returned key; else gathered tile `slot` of the
  // round). Call from every thread; its loads must be issued before the next call.
  auto next_work = [&](TileKind& kind_out, int& cols_out, int& slot_out) -> int64_t {
    for (;;) {
      if (gather_next < gather_tiles) {
        const int slot = gather_next++;
        const bool full = slot < gather_full_tiles;
        const int first = (full ? slot : slot - gather_full_tiles) * kBlockN;
        const int keys = (full ? gather_full : gather_partial) - first;
        cols_out = keys < kBlockN ? keys : kBlockN;
        kind_out = full ? TileKind::kFull : TileKind::kPartial;
        slot_out = slot;
        return gather_k0;
      }
      slot_out = -1;
      const int64_t k0 = next_tile(scan_from, kind_out);
      if (k0 >= k_end) return k_end;
      scan_from = k0 + kBlockN;
      cols_out = tile_cols(k0);
      if (kind_out != TileKind::kPartial || k0 < plain_until) return k0;
      // The run of PARTIAL tiles from k0: at most kGatherTiles, within this classification round.
      const int at = static_cast<int>((k0 - kinds_first) / kBlockN);
      int run = 1;
      while (run < kGatherTiles && at + run < kThreads && k0 + run * kBlockN < k_end &&
             tile_kinds[at + run] == static_cast<uint8_t>(TileKind::kPartial))
        ++run;
      gather_round(k0, run);
      gather_full_tiles = static_cast<int>(ceil_div(gather_full, kBlockN));
      gather_tiles = gather_full_tiles + static_cast<int>(ceil_div(gather_partial, kBlockN));
      gather_next = 0;
      if (gather_tiles < run) {  // fewer tiles gathered (none: every key of the run is hidden)
        scan_from = k0 + run * kBlockN;
        continue;
      }
      // Gathering saved nothing here: this run's tiles as they are, and no more rounds in this
      // CTA (a layout that hides nothing here, e.g. Eso-LM's interleaved orders or a causal
      // diagonal, seldom does further on, and each round costs a global round trip and barriers).
      gather_tiles = 0;
      plain_until = k_end;
      return k0;
    }
  };
  // Key j of gathered tile `slot` of the current round.
  auto gathered_key = [&](int slot, int j) -> int64_t {
    const bool full = slot < gather_full_tiles;
    const int e = (full ? slot : slot - gather_full_tiles) * kBlockN + j;
    return gather_k0 + gather_list[full ? e : kGatherKeys - 1 - e];
  };
  // K, V (and a PARTIAL tile's labels) of a work tile into buffer `stage`.
  auto load_work = [&](int64_t k0, int cols, TileKind work_kind, int slot, int stage) {
    if (slot < 0) {
      load_k(k0, stage);
      load_labels(k0, work_kind, stage);
      load_v(k0, stage);
      return;
    }
    auto key_of = [&](int row) { return gathered_key(slot, row); };
    load_gathered_tile_async<T, D, kUseWgmma>(k_tiles + stage * kBlockN * D, k_src, p.k_strides[1], kBlockN, cols,
                                              key_of);
    load_gathered_tile_async<T, D, kUseWgmma>(v_tiles + stage * kBlockN * D, v_src, p.v_strides[1], kBlockN, cols,
                                              key_of);
    load_labels_of(work_kind, stage, cols, key_of);
  };

  TileKind kind;
  int work_cols = 0, first_slot = -1;  // kGather: the current work tile's key count; the first one's slot
  int64_t k0 = kGather ? next_work(kind, work_cols, first_slot) : next_tile(k_begin, kind);
  if (k0 < k_end) {
    if constexpr (kGather) {
      load_work(k0, work_cols, kind, first_slot, 0);
    } else {
      load_k(k0, 0);
      load_labels(k0, kind, 0);
      if (kStages == 2) {
        load_v(k0, 0);
        load_bias_tile(k0, 0);
      }
    }
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
      const int cols = kGather ? work_cols : tile_cols(k0);
      TileKind next_kind;
      int next_cols = 0, next_slot = -1;
      const int64_t k_next = kGather ? next_work(next_kind, next_cols, next_slot) : next_tile(k0 + kBlockN, next_kind);
      if (k_next < k_end) {
        if constexpr (kGather) {
          load_work(k_next, next_cols, next_kind, next_slot, stage ^ 1);
        } else {
          load_k(k_next, stage ^ 1);
          load_labels(k_next, next_kind, stage ^ 1);
          load_v(k_next, stage ^ 1);
          load_bias_tile(k_next, stage ^ 1);
        }
      }
      cp_async_commit();
      float bias[kBlockN / 8][4];  // kM = 1: loaded ahead of the MMAs (kM = 2 adds it after masking)
      if (kM == 1 && has_bias && !bias_tiled && warp_has_rows)
        load_bias<kNext>(bias, p, b, h, q0, k0, row_in_tile[0], q_rows, cols, lane);
      cp_async_wait<1>();  // tile j's K, V and labels have landed (the next tile's may be in flight)
      if constexpr (kUseWgmma) sm90::fence_proxy_async_shared();
      __syncthreads();
      if (warp_has_rows) {
        const T* k_tile = k_tiles + stage * kBlockN * D;
        const T* v_tile = v_tiles + stage * kBlockN * D;
        float s[kM][kBlockN / 8][4];
        if constexpr (kUseWgmma) sm90::score_tile<T, D>(s[0], q_tile, k_tile);
        else if constexpr (kM == 1) score_tile<T, D>(s[0], q_frag, k_tile, lane);
        else score_tile_wide<T, D>(s, q_tile, warp, k_tile, lane);
        uint32_t pa[kM][kBlockN / 16][4];  // kM = 2: P packed per m-tile
#pragma unroll
        for (int m = 0; m < kM; ++m) {
          // A bias tile, or with kM = 2 the bias by rows, is added after the masking (no bias array).
          mask_scores<kNext>(s[m], bias, kM == 1 && has_bias && !bias_tiled, score_scale, kind,
                             k_orders + stage * kBlockN, k_groups + stage * kBlockN, row_labels[m], row_in_tile[m], q_rows, rows_full[m], cols,
                             lane);
          if (bias_tiled)
            add_bias_tile(s[m], p.bias_dtype, bias_tiles + stage * kTileM * kBiasPitch, row_in_tile[m], lane);
          else if (kM == 2 && has_bias) add_bias_by_row(s[m], p, b, h, q0, k0, row_in_tile[m], q_rows, cols, lane);
          softmax_update<D, kNext>(s[m], o[m], row_max[m], row_sum[m]);
          if constexpr (kM == 2) pack_p<T>(pa[m], s[m]);
        }
        if constexpr (kUseWgmma) sm90::accumulate_pv<T, D>(o[0], s[0], v_tile);
        else if constexpr (kM == 1) accumulate_pv<T, D>(o[0], s[0], v_tile, lane);
        else accumulate_pv_wide<T, D>(o, pa, v_tile, lane);
      }
      __syncthreads();  // every warp is done with buffer `stage` before the next look-ahead refills it
      k0 = k_next;
      kind = next_kind;
      work_cols = next_cols;
      stage ^= 1;
    }
  }
  cp_async_wait<0>();  // nothing left in flight (the last commit is an empty group)

#pragma unroll
  for (int m = 0; m < kM; ++m) {
    if (p.num_splits > 1) {
      if (packed) {
        for (int r = 0; r < 2; ++r)
          if (row_in_tile[m][r] < q_rows)
            write_partial_row<D>(p, o[m], row_max[m], row_sum[m], r,
                                 ((split * p.batch + b) * p.q_heads + head_of(row_in_tile[m][r])) * p.q_len +
                                     query_of(row_in_tile[m][r]),
                                 lane);
      } else {
        write_partial<D>(p, o[m], row_max[m], row_sum[m], ((split * p.batch + b) * p.q_heads + h) * p.q_len + q0,
                         row_in_tile[m], q_rows, lane);
      }
      continue;
    }
    for (int r = 0; r < 2; ++r) {
      if (row_in_tile[m][r] >= q_rows) continue;
      const float inv = softmax_inv_sum(row_sum[m][r]);
      const int64_t query = query_of(row_in_tile[m][r]), head = head_of(row_in_tile[m][r]);
      T* out = static_cast<T*>(p.out) + b * p.out_strides[0] + query * p.out_strides[1] + head * p.out_strides[2];
      for (int dt = 0; dt < D / 8; ++dt) {
        const int col = dt * 8 + 2 * (lane % 4);
        *reinterpret_cast<uint32_t*>(out + col) = MmaType<T>::pack(o[m][dt][2 * r] * inv, o[m][dt][2 * r + 1] * inv);
      }
      if (lane % 4 == 0)  // (the unpacked index keeps the verified kernel's machine code)
        p.lse[packed ? (b * p.q_heads + head) * p.q_len + query
                     : (b * p.q_heads + h) * p.q_len + q0 + row_in_tile[m][r]] =
            softmax_lse(row_max[m][r], row_sum[m][r]);
    }
  }
}

}  // namespace dlmfuse::cuda::sm80
