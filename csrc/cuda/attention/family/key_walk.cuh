// Which keys a CTA of the attention family reads, and in what order: the CTA's query rows
// (QueryRows), and the walk over its key range (KeyWalk) that hands the mainloop one work tile at
// a time.
//
// Key tiles are classified 128 at a time (one tile per thread, from the min/max of its labels and
// documents against the query tile's; dlmfuse/visibility.h) into a shared array, so that finding
// the next visible tile costs no global round trip: SKIP tiles are never loaded, FULL tiles need
// no per-element test, PARTIAL tiles bring their key labels with K. The gathered walk
// (AttentionWalk::kGather; labels, no bias) goes one step further for runs of PARTIAL tiles: it
// classifies their keys one by one and gathers the keys every row sees into FULL tiles and those
// some row sees into PARTIAL tiles; the rest are never loaded (mask-only steps read only the keys
// their rows see). A run whose gathered tiles would not be fewer than its own runs as it is and
// ends gathering in the CTA.
//
// Every thread of the walk's shape (WalkShape: the CTA, or a producer warpgroup) calls the walk and
// gets the same answer (the state is uniform); the calls that start a classification or gathering
// round have barriers.
#pragma once

#include "cuda/attention/attention_sm80_tile.cuh"

namespace dlmfuse::cuda::family {

using sm80::kBlockM;
using sm80::kBlockN;
using sm80::kThreads;
using sm80::kWarps;

// The shape a walk runs in: kThreads threads classify key tiles of kTileN keys against a query
// tile of at most kRows rows (one per thread) and meet at sync(): the whole CTA of the 64-row
// kernels, or named barrier kBarrier over the warp-specialized kernel's producer warpgroup. One
// gathering round classifies the keys of up to kGatherTiles consecutive PARTIAL tiles, 8 keys per
// thread.
template <int kTileN_, int kRows_, int kBarrier = 0>
struct WalkShape {
  static constexpr int kTileN = kTileN_;
  static constexpr int kRows = kRows_;
  static constexpr int kGatherKeys = 8 * kThreads;
  static constexpr int kGatherTiles = kGatherKeys / kTileN;
  static_assert(kGatherKeys % kTileN == 0 && kRows <= kThreads, "whole tiles per round, a thread per row");
  __device__ __forceinline__ static void sync() {
    if constexpr (kBarrier == 0) __syncthreads();
    else asm volatile("bar.sync %0, %1;\n" ::"n"(kBarrier), "n"(kThreads) : "memory");
  }
};
// The 64-row kernels' walk: the CTA, 64-key tiles.
using CtaWalk = WalkShape<kBlockN, kBlockM>;

// The CTA's query rows. Tile row r is query query(r) of query head head(r): rows q0 + r of head h,
// or with GQA packing (AttentionParams::pack_gqa) packed row q0 + r of KV head h, i.e. query
// (q0 + r) / group of head h * group + (q0 + r) % group.
struct QueryRows {
  int64_t b = 0, split = 0, h = 0, kv_head = 0, q0 = 0;
  int group = 1;   // query heads per KV head
  int count = 0;   // rows of this tile (the last tile may have fewer than tile_m)
  bool packed = false;

  // Packed rows number below 2^31 (the planner's grid check): 32-bit division, fewer registers.
  __device__ __forceinline__ int64_t query(int row) const {
    return packed ? (static_cast<int>(q0) + row) / group : q0 + row;
  }
  __device__ __forceinline__ int64_t head(int row) const {
    return packed ? h * group + (static_cast<int>(q0) + row) % group : h;
  }
};

// Grid: (query tiles, heads, batch x splits); with labels (heads, query tiles in descending
// order, batch x splits): under the masks of the field (causal, block-causal, BD3, Eso-LM) later
// query tiles see more keys, and with the heads fastest and the tiles descending the longest CTAs
// start first, so the tail holds the shortest (list scheduling). Without labels every CTA has the
// same work, and tiles fastest let concurrent CTAs share K/V heads.
template <int kTileM>
__device__ __forceinline__ QueryRows query_rows(const AttentionParams& p) {
  QueryRows rows;
  rows.packed = p.pack_gqa;
  rows.group = static_cast<int>(p.q_heads / p.kv_heads);
  rows.b = blockIdx.z / p.num_splits;
  rows.split = blockIdx.z % p.num_splits;
  rows.h = p.has_labels ? blockIdx.x : blockIdx.y;
  rows.kv_head = rows.packed ? rows.h : rows.h / rows.group;
  const int64_t total = rows.packed ? p.q_len * rows.group : p.q_len;
  const int64_t tile = p.has_labels ? gridDim.y - 1 - blockIdx.y : blockIdx.x;
  rows.q0 = tile * kTileM;
  rows.count = static_cast<int>(total - rows.q0 < kTileM ? total - rows.q0 : kTileM);
  return rows;
}

// Min/max of the document ids of keys [k0, k0 + cols) of row b: 16-byte loads when the row is
// contiguous and 16-byte aligned (the common case), else one id at a time.
template <int N = kBlockN>
__device__ __forceinline__ IdRange key_tile_docs(const LabelView& doc, int64_t b, int64_t k0, int cols) {
  const int32_t* d = doc.data + b * doc.batch_stride + k0 * doc.row_stride;
  IdRange range = IdRange::empty();
  if (cols == N && doc.row_stride == 1 && reinterpret_cast<uintptr_t>(d) % 16 == 0) {
#pragma unroll 4
    for (int j = 0; j < N; j += 4) {
      const int4 v = __ldg(reinterpret_cast<const int4*>(d + j));
      range.add(v.x);
      range.add(v.y);
      range.add(v.z);
      range.add(v.w);
    }
    return range;
  }
#pragma unroll 4
  for (int j = 0; j < cols; ++j) range.add(d[j * doc.row_stride]);
  return range;
}

// A tile of keys for the mainloop: keys [k0, k0 + cols) (slot < 0), or gathered tile `slot` of the
// walk's current round (its keys from KeyWalk::gathered_key).
struct WorkTile {
  int64_t k0 = 0;
  int cols = 0;
  TileKind kind = TileKind::kFull;
  int slot = -1;
};

// The walk's shared memory.
template <bool kGather, class Shape = CtaWalk>
struct WalkShared {
  // Own 16-byte slots: a widened LDS.128 of an unaligned q_range once also read a neighbouring
  // shared variable, a hazard with lane 0's write of it that racecheck reported.
  alignas(16) LabelRange q_range;
  alignas(16) IdRange q_docs;
  uint8_t kinds[kThreads];  // kinds of key tiles kinds_first / kTileN + i (one classification round)
  // The gathered walk: the query rows' groups (raw, then ascending for classify_key), one round's
  // list of keys (offsets from its first key: FULL keys from the front, PARTIAL keys from the
  // back) and the per-warp key counts of its scan.
  int32_t q_groups_raw[kGather ? Shape::kRows : 1];
  int32_t q_groups_sorted[kGather ? Shape::kRows : 1];
  uint16_t list[kGather ? Shape::kGatherKeys : 1];
  int32_t counts[kWarps];
};

template <bool kGather, class Shape = CtaWalk>
class KeyWalk {
  static constexpr int kTileN = Shape::kTileN, kGatherTiles = Shape::kGatherTiles, kGatherKeys = Shape::kGatherKeys;

 public:
  // Keys [k_begin, k_end) of batch row rows.b. Writes the query tile's label and document ranges
  // (warp 0) and, gathering, its groups: the caller's next barrier publishes them, then
  // sort_groups() (gathering) and the first next().
  __device__ KeyWalk(const AttentionParams& p, const QueryRows& rows, WalkShared<kGather, Shape>& shared, int64_t k_begin,
                     int64_t k_end)
      : p_(p), rows_(rows), s_(shared), k_end_(k_end), scan_from_(k_begin), plain_until_(k_begin) {
    if (!p.has_labels) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if constexpr (kGather)
      if (static_cast<int>(threadIdx.x) < rows.count) s_.q_groups_raw[threadIdx.x] = p.q_group.at(rows.b, rows.query(threadIdx.x));
    if (warp == 0) {
      LabelRange range = LabelRange::empty();
      for (int i = lane; i < rows.count; i += 32) range.add(p.q_order.at(rows.b, rows.query(i)), p.q_group.at(rows.b, rows.query(i)));
      range = warp_reduce(range);
      if (lane == 0) s_.q_range = range;
    } else if (warp == 1 && p.has_docs) {
      IdRange docs = IdRange::empty();
      for (int i = lane; i < rows.count; i += 32) docs.add(p.q_doc.at(rows.b, rows.query(i)));
      docs = warp_reduce(docs);
      if (lane == 0) s_.q_docs = docs;
    }
  }

  // Gathering: the rank sort of the query tile's (at most Shape::kRows) groups, ties by row; read after the
  // barrier that opens each round.
  __device__ void sort_groups() {
    if constexpr (kGather) {
      if (!p_.has_labels || static_cast<int>(threadIdx.x) >= rows_.count) return;
      const int32_t mine = s_.q_groups_raw[threadIdx.x];
      int rank = 0;
      for (int j = 0; j < rows_.count; ++j) {
        const int32_t other = s_.q_groups_raw[j];
        rank += other < mine || (other == mine && j < static_cast<int>(threadIdx.x));
      }
      s_.q_groups_sorted[rank] = mine;
    }
  }

  // The next work tile; false when the walk is over. Its loads must be issued before the next call.
  __device__ bool next(WorkTile& tile) {
    for (;;) {
      if (gather_next_ < gather_tiles_) {
        const int slot = gather_next_++;
        const bool full = slot < gather_full_tiles_;
        const int first = (full ? slot : slot - gather_full_tiles_) * kTileN;
        const int keys = (full ? gather_full_ : gather_partial_) - first;
        tile = WorkTile{gather_k0_, keys < kTileN ? keys : kTileN, full ? TileKind::kFull : TileKind::kPartial, slot};
        return true;
      }
      TileKind kind;
      const int64_t k0 = next_tile(scan_from_, kind);
      if (k0 >= k_end_) return false;
      scan_from_ = k0 + kTileN;
      tile = WorkTile{k0, cols_at(k0), kind, -1};
      if (!kGather || kind != TileKind::kPartial || k0 < plain_until_) return true;
      // The run of PARTIAL tiles from k0: at most kGatherTiles, within this classification round.
      const int at = static_cast<int>((k0 - kinds_first_) / kTileN);
      int run = 1;
      while (run < kGatherTiles && at + run < kThreads && k0 + run * kTileN < k_end_ &&
             s_.kinds[at + run] == static_cast<uint8_t>(TileKind::kPartial))
        ++run;
      gather_round(k0, run);
      gather_full_tiles_ = static_cast<int>(plan_ceil_div(gather_full_, kTileN));
      gather_tiles_ = gather_full_tiles_ + static_cast<int>(plan_ceil_div(gather_partial_, kTileN));
      gather_next_ = 0;
      if (gather_tiles_ < run) {  // fewer tiles gathered (none: every key of the run is hidden)
        scan_from_ = k0 + run * kTileN;
        continue;
      }
      // Gathering saved nothing here: this run's tiles as they are, and no more rounds in this CTA
      // (a layout that hides nothing here, e.g. Eso-LM's interleaved orders or a causal diagonal,
      // seldom does further on, and each round costs a global round trip and barriers).
      gather_tiles_ = 0;
      plain_until_ = k_end_;
      return true;
    }
  }

  // Key j of `tile` (contiguous or gathered).
  __device__ __forceinline__ int64_t key(const WorkTile& tile, int j) const {
    if (!kGather || tile.slot < 0) return tile.k0 + j;
    const bool full = tile.slot < gather_full_tiles_;
    const int e = (full ? tile.slot : tile.slot - gather_full_tiles_) * kTileN + j;
    return gather_k0_ + s_.list[full ? e : kGatherKeys - 1 - e];
  }

 private:
  __device__ __forceinline__ int cols_at(int64_t k0) const {
    return static_cast<int>(k_end_ - k0 < kTileN ? k_end_ - k0 : kTileN);
  }

  // One classification round (all threads; barriers): thread i classifies key tile
  // first + i * kTileN into kinds[i] (SKIP past k_end).
  __device__ void classify_round(int64_t first) {
    Shape::sync();  // every thread has read the previous round's kinds (and the ranges are written)
    const int64_t k0 = first + static_cast<int64_t>(threadIdx.x) * kTileN;
    TileKind kind = TileKind::kSkip;
    if (k0 < k_end_) {
      const int cols = cols_at(k0);
      kind = classify_tile(s_.q_range, sm80::key_tile_range<kTileN>(p_.k_order, p_.k_group, rows_.b, k0, cols));
      if (p_.has_docs) kind = within_documents(kind, s_.q_docs, key_tile_docs<kTileN>(p_.k_doc, rows_.b, k0, cols));
    }
    s_.kinds[threadIdx.x] = static_cast<uint8_t>(kind);
    kinds_first_ = first;
    kinds_valid_ = true;
    Shape::sync();
  }

  // The first tile at or after `from` (a tile start) that is not SKIP, k_end if none; its kind.
  __device__ int64_t next_tile(int64_t from, TileKind& kind) {
    kind = TileKind::kFull;
    if (!p_.has_labels) return from < k_end_ ? from : k_end_;
    for (int64_t k0 = from; k0 < k_end_; k0 += kTileN) {
      if (!kinds_valid_ || k0 >= kinds_first_ + static_cast<int64_t>(kThreads) * kTileN) classify_round(k0);
      kind = static_cast<TileKind>(s_.kinds[(k0 - kinds_first_) / kTileN]);
      if (kind != TileKind::kSkip) return k0;
    }
    return k_end_;
  }

  // Keys [first, first + tiles * kTileN) of a run of PARTIAL tiles into the list (all threads;
  // barriers).
  __device__ void gather_round(int64_t first, int tiles) {
    Shape::sync();  // every thread has issued its loads from the previous round's list
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t run_end = first + tiles * kTileN < k_end_ ? first + tiles * kTileN : k_end_;
    const int64_t key0 = first + 8 * static_cast<int64_t>(threadIdx.x);
    uint32_t full_bits = 0, partial_bits = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (key0 + i >= run_end) continue;
      TileKind kind = classify_key(s_.q_range, s_.q_groups_sorted, rows_.count, p_.k_order.at(rows_.b, key0 + i),
                                   p_.k_group.at(rows_.b, key0 + i));
      if (p_.has_docs) kind = key_within_documents(kind, s_.q_docs, p_.k_doc.at(rows_.b, key0 + i));
      full_bits |= static_cast<uint32_t>(kind == TileKind::kFull) << i;
      partial_bits |= static_cast<uint32_t>(kind == TileKind::kPartial) << i;
    }
    // Exclusive scan of both counts at once: FULL in the low 16 bits, PARTIAL in the high 16 (each
    // at most kGatherKeys).
    const int own = __popc(full_bits) | (__popc(partial_bits) << 16);
    int inclusive = own;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int x = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d) inclusive += x;
    }
    if (lane == 31) s_.counts[warp] = inclusive;
    Shape::sync();
    int before = inclusive - own, total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int count = s_.counts[w];
      if (w < warp) before += count;
      total += count;
    }
    int full_at = before & 0xffff, partial_at = before >> 16;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const auto offset = static_cast<uint16_t>(8 * threadIdx.x + i);
      if ((full_bits >> i) & 1u) s_.list[full_at++] = offset;
      if ((partial_bits >> i) & 1u) s_.list[kGatherKeys - 1 - partial_at++] = offset;
    }
    gather_k0_ = first;
    gather_full_ = total & 0xffff;
    gather_partial_ = total >> 16;
    Shape::sync();  // the list is complete
  }

  const AttentionParams& p_;
  const QueryRows rows_;  // a copy: a reference to the kernel's local would put it in local memory
  WalkShared<kGather, Shape>& s_;
  const int64_t k_end_;
  int64_t scan_from_;    // where the walk over key tiles resumes
  int64_t plain_until_;  // PARTIAL tiles before this key run as they are (gathering saved nothing)
  int64_t kinds_first_ = 0;
  bool kinds_valid_ = false;
  int64_t gather_k0_ = 0;                 // first key of the current round (list entries are offsets)
  int gather_full_ = 0, gather_partial_ = 0;  // keys the round gathered of each kind
  int gather_full_tiles_ = 0, gather_tiles_ = 0, gather_next_ = 0;  // its tiles, FULL ones first
};

}  // namespace dlmfuse::cuda::family
