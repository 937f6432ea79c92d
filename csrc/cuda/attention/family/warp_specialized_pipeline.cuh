// The shared state of the family's Hopper kernel (attention_fwd_warp_specialized.cuh): its traits,
// the TMA descriptors of a call, and the ring of stages the producer fills and the consumers drain
// (a tile description, key labels and mbarriers per stage).
#pragma once

#include <cuda.h>

#include "cuda/attention/pipeline_sm90.cuh"
#include "dlmfuse/attention_planner.h"

namespace dlmfuse::cuda::family {

// How the bias reaches the consumers (an instance each: the ring costs shared memory, the row loads
// registers).
enum class BiasLoad { kNone, kTiles, kRows };

template <typename T_, int D_, BiasLoad kBiasLoad_, bool kGather_ = false>
struct WarpSpecializedTraits {
  using T = T_;
  static constexpr int D = D_;
  static constexpr BiasLoad kBiasLoad = kBiasLoad_;
  static constexpr bool kBiasTiles = kBiasLoad_ == BiasLoad::kTiles;
  // The gathered walk (walk=gather: labels, no bias): the producer warpgroup walks the keys with
  // the family's KeyWalk and loads K and V by cp.async (gather_producer below).
  static constexpr bool kGather = kGather_;
  static_assert(!kGather_ || kBiasLoad_ == BiasLoad::kNone, "a bias never comes with the gathered walk");
  static constexpr int kTileM = kAttentionTmaRows;      // two consumer warpgroups x 64 rows
  static constexpr int kTileN = kAttentionTmaKeyTile;   // keys per stage
  static constexpr int kStages = attention_tma_stages(D);
  static constexpr int kBiasStages = attention_tma_bias_stages(D);
  static constexpr int kThreads = 3 * 128;
  static constexpr int kConsumerWarps = 8;
  // Register split: 128 x 56 + 256 x 224 = 64512 of the SM's 65536 (the producer's tile
  // classification spills at 40, FlashAttention-3's producer budget); the gathered walk's producer
  // (KeyWalk and cp.async addressing) takes 72, spilling 12-24 bytes there (L1-resident reloads
  // of its addresses), since at 80 the consumers' 208 spilled in the main loop.
  static constexpr int kProducerRegisters = kGather_ ? 72 : 56;
  static constexpr int kConsumerRegisters = kGather_ ? 216 : 224;
  static_assert(128 * kProducerRegisters + 256 * kConsumerRegisters <= 64512, "the launch's 168 registers a thread");
  // 16-bit tiles of [rows][64] columns (one TMA box each); a tile of D columns is D / 64 of them.
  static constexpr uint32_t kQRows = 64;  // per consumer warpgroup
  static constexpr uint32_t kQBoxBytes = kQRows * 128;
  static constexpr uint32_t kKvBoxBytes = kTileN * 128;
  static constexpr uint32_t kQBytes = 2 * kQRows * D * 2;  // both consumers' rows
  static constexpr uint32_t kKvBytes = kTileN * D * 2;     // one K or one V stage
  static constexpr uint32_t kBiasHalfElems = kQRows * kTileN;  // one consumer's bias tile, 16-bit
  static constexpr int kSharedBytes = attention_fwd_tma_bytes(D, kBiasTiles);
  static_assert(kSharedBytes == static_cast<int>(kQBytes + 2 * kStages * kKvBytes +
                                                 (kBiasTiles ? kBiasStages * 2 * kBiasHalfElems * 2 : 0)) + 1024,
                "the planner's count");
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
};

// The TMA descriptors of one call: [B, L, H, D] tensors as 4-d maps (D, H, L, B), boxes of 64
// columns x one head x 64 (Q) or 128 (K, V) rows (GQA-packed Q: the 5-d map (D, G, L, Hkv, B), boxes
// of 64 columns x G heads x 64 / G rows); the [B, Hq, Lq, Lk] bias as the map (Lk, Lq, Hq,
// B), boxes of 64 keys x 64 rows (one row where rows broadcast); all with the 128-byte swizzle.
struct AttentionTensorMaps {
  CUtensorMap q, k, v, bias;
};

// What the producer tells the consumers about the tile in a stage (written before its arrivals).
struct StageTile {
  int32_t k0;          // first key (the planner keeps k_len below 2^31)
  int32_t cols;        // keys of the tile that exist for this row (kv_lens, k_len)
  int32_t kind;        // TileKind, or kEndOfWalk
  int32_t zeroed_tail;  // V rows past cols were zeroed by the producer: wait on v_tail, not v_full
};
constexpr int32_t kEndOfWalk = -1;

// The stages' metadata and mbarriers: Q landed; per stage K landed, V landed, both consumers done
// with K (and the stage's description and labels), both consumers done with V; the V tail zeroed
// (at most once per CTA: only the last tile has fewer keys). K and V are released apart: a
// consumer holds K(i) and V(i - 1) at once, so with two stages a shared release would hold the
// load of K(i + 1) until P V(i - 1) has completed. Per bias stage and consumer: its bias tile
// landed, its four warps are done with it.
template <int kStages, int kTileN, int kBiasStages>
struct PipelineShared {
  StageTile tiles[kStages];
  alignas(16) int32_t key_labels[kStages][3][kTileN];  // a PARTIAL tile's orders, groups, documents
  uint64_t q_full;
  uint64_t k_full[kStages];
  uint64_t v_full[kStages];
  uint64_t k_empty[kStages];
  uint64_t v_empty[kStages];
  uint64_t v_tail;
  uint64_t bias_full[kBiasStages][2];
  uint64_t bias_empty[kBiasStages][2];
};

// One 64-column box of rows [row, row + box rows) of head `head`, batch b, into `dst`, completing
// on `bar` (the planner bounds every axis below 2^31).
__device__ __forceinline__ void tma_load_box(const CUtensorMap& map, uint64_t* bar, void* dst, int col, int64_t head,
                                             int64_t row, int64_t b) {
  sm90::tma_load_4d(&map, bar, dst, col, static_cast<int32_t>(head), static_cast<int32_t>(row), static_cast<int32_t>(b));
}

template <int D>
constexpr bool pipeline_fits_the_plan =
    sizeof(PipelineShared<attention_tma_stages(D), kAttentionTmaKeyTile, attention_tma_bias_stages(D)>) <=
    attention_fwd_tma_static_bytes(D);
static_assert(pipeline_fits_the_plan<64> && pipeline_fits_the_plan<128>, "the planner's bound on static shared memory");
}  // namespace dlmfuse::cuda::family
