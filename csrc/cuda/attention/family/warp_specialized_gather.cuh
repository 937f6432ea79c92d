// The gathered walk of the family's Hopper kernel (walk=gather): its producer, which walks the keys
// with the family's KeyWalk and loads K and V rows by cp.async (the kernel is in
// attention_fwd_warp_specialized.cuh).
#pragma once

#include <type_traits>

#include "cuda/attention/family/key_walk.cuh"
#include "cuda/attention/family/warp_specialized_pipeline.cuh"

namespace dlmfuse::cuda::family {

// Named barrier of the producer warpgroup's walk (1 and 2 are the consumers' turns).
constexpr int kProducerBarrier = 3;

// The producer of the gathered walk: the producer warpgroup's 128 threads walk keys [k_begin, k_end)
// with the family's KeyWalk (128-key tiles, the 128-row query tile, named barrier 3), which hands
// out whole tiles and, for runs of PARTIAL tiles, tiles of the keys some row sees gathered from
// them; they load each work tile's K and V rows by cp.async into the stage's swizzled tiles (rows
// past the tile's keys zero-filled: nothing to zero later) and a PARTIAL tile's key labels (a key
// per thread). cp.async groups go K(i), V(i); both are published (wait_group, a proxy fence for
// wgmma's reads, the walk's barrier, an arrival on each) once K(i + 1) has been issued, so that a
// tile's loads fly while the walk finds the next tile and K(i + 1) is issued. Ends with the
// end-of-walk stage.
template <class Tr, class Pipe>
__device__ __forceinline__ void gather_producer(const AttentionParams& p, const QueryRows& rows, Pipe& pipe,
                                                typename Tr::T* k_tiles, typename Tr::T* v_tiles, int64_t k_begin,
                                                int64_t k_end) {
  using T = typename Tr::T;
  constexpr int D = Tr::D, kTileN = Tr::kTileN, kStages = Tr::kStages;
  using Walk = WalkShape<kTileN, Tr::kTileM, kProducerBarrier>;
  static_assert(kTileN == kThreads, "a key per producer thread for a PARTIAL tile's labels");
  static_assert(sizeof(WalkShared<true, Walk>) <= kAttentionTmaGatherWalkBytes, "the planner's count");
  __shared__ WalkShared<true, Walk> walk_shared;
  KeyWalk<true, Walk> walk(p, rows, walk_shared, k_begin, k_end);
  Walk::sync();  // the query tile's ranges and groups
  walk.sort_groups();
  const int64_t b = rows.b;
  const T* k_src = static_cast<const T*>(p.k) + b * p.k_strides[0] + rows.kv_head * p.k_strides[2];
  const T* v_src = static_cast<const T*>(p.v) + b * p.v_strides[0] + rows.kv_head * p.v_strides[2];
  // Tile `i`'s K and V in stage s: once every producer thread's groups but the newest `pending` have
  // landed, one arrival on each of their mbarriers.
  auto publish = [&](int s, auto pending) {
    sm80::cp_async_wait<decltype(pending)::value>();
    sm90::fence_proxy_async_shared();
    Walk::sync();
    if (threadIdx.x == 0) {
      sm90::mbarrier_arrive(&pipe.k_full[s]);
      sm90::mbarrier_arrive(&pipe.v_full[s]);
    }
  };
  WorkTile tile;
  int issued = 0;
  while (walk.next(tile)) {
    const int s = issued % kStages;
    const uint32_t last_use = (issued / kStages - 1) & 1;  // parity of the stage's previous use
    auto key_of = [&](int j) { return walk.key(tile, j); };
    if (issued >= kStages) sm90::mbarrier_wait(&pipe.k_empty[s], last_use);
    if (tile.kind == TileKind::kPartial) {
      const int j = threadIdx.x;
      const bool inside = j < tile.cols;
      const int64_t key = inside ? key_of(j) : 0;
      pipe.key_labels[s][0][j] = inside ? p.k_order.at(b, key) : 0;
      pipe.key_labels[s][1][j] = inside ? p.k_group.at(b, key) : 0;
      pipe.key_labels[s][2][j] = inside && p.has_docs ? p.k_doc.at(b, key) : 0;
    }
    if (threadIdx.x == 0) pipe.tiles[s] = StageTile{static_cast<int32_t>(tile.k0), tile.cols, static_cast<int32_t>(tile.kind), 0};
    sm80::load_gathered_tile_async<T, D, true>(k_tiles + s * kTileN * D, k_src, p.k_strides[1], kTileN, tile.cols, key_of);
    sm80::cp_async_commit();
    // Tile i - 1 (its groups: all but K(i)), before the wait below: with two stages the consumers
    // release V(i - 2) only after tile i - 1's scores.
    if (issued > 0) publish((issued - 1) % kStages, std::integral_constant<int, 1>{});
    if (issued >= kStages) sm90::mbarrier_wait(&pipe.v_empty[s], last_use);
    sm80::load_gathered_tile_async<T, D, true>(v_tiles + s * kTileN * D, v_src, p.v_strides[1], kTileN, tile.cols, key_of);
    sm80::cp_async_commit();
    ++issued;
  }
  if (issued > 0) publish((issued - 1) % kStages, std::integral_constant<int, 0>{});
  // The end of the walk: a stage whose kind says so, arriving without loads.
  const int s = issued % kStages;
  if (issued >= kStages) sm90::mbarrier_wait(&pipe.k_empty[s], (issued / kStages - 1) & 1);
  if (threadIdx.x == 0) {
    pipe.tiles[s].kind = kEndOfWalk;
    sm90::mbarrier_arrive(&pipe.k_full[s]);
  }
}

}  // namespace dlmfuse::cuda::family
