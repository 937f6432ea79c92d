// The family's Hopper kernel (plan mma=sm90 with tile_m=128), FlashAttention-3's structure:
//
//   384 threads = three warpgroups. Warpgroup 0 is the producer: it gives up registers (setmaxnreg)
//   and its first warp walks the key tiles: it classifies each against the query tile's label and
//   document ranges (SKIP tiles are never loaded), writes the tile's description (and a PARTIAL
//   tile's key labels) into the stage, and one lane issues the loads as TMA bulk copies (Q once; K
//   and V tile by tile into a ring of kStages stages), each arriving on an mbarrier with its byte
//   count. Warpgroups 1 and 2 are consumers with the registers: each owns 64 of the CTA's 128 query
//   rows, waits for a stage, computes S = Q K^T and O += P V as wgmma batches on the
//   128-byte-swizzled tiles the TMA wrote, masks PARTIAL and edge tiles (tile_mask.cuh), and releases
//   the stage's K and V (one arrival per consumer warp each) for the producer to refill. A stage marked
//   kEndOfWalk ends the walk. Two overlaps hide the softmax: within a consumer, tile i's S batch is
//   issued together with tile i - 1's P V batch and its softmax runs while P V computes; between
//   the consumers, named barriers make them take turns to issue (ping-pong), so one's softmax runs
//   under the other's MMAs. The online softmax, P packing and epilogue are the mma.sync path's
//   (wgmma's accumulator rows per warp are those of mma.sync m16n8 fragments, wgmma_sm90.cuh).
//
// Rows past q_len and keys past k_len arrive as zeros (the tensor maps' bounds). Keys that kv_lens
// hides but memory holds are loaded with the last tile: their scores are set to -inf and the
// producer zeroes their V rows before the consumers read them (0 x NaN would be NaN).
// A bias of the query's dtype with 16-byte aligned rows (bias_tma_loadable) streams in the same way:
// per key tile one [64 rows][128 keys] TMA tile per consumer, in a ring of its own with a full and
// an empty mbarrier per consumer, so that each consumer releases its half as soon as it has added it
// (at head_dim 128 the ring has one stage: two would not fit beside K and V). A stride-0 axis of
// the bias is read at coordinate 0; a stride-0 row axis loads one row that every row reads. Any
// other bias (fp32, another 16-bit type, odd row strides) is read from global memory by the
// consumers once S is there (its latency then hides only behind the other consumer's MMAs; the
// head_dim 128 instance spills 44 bytes in its main loop).
// Rows whose scores float32 cannot hold leave lse -inf (NaN after a split-KV merge) for the float64
// rescue that the launcher runs next (exact_row.cuh).
// The gathered walk (walk=gather, an instance of its own): the whole producer warpgroup walks the
// keys with the family's KeyWalk and loads K and V rows by cp.async (gather_producer).
// Split-KV: split s of num_splits walks its own run of whole key tiles and writes a normalised fp32
// partial, which split_merge.cuh combines. GQA packing (pack_gqa; group G = q_heads / kv_heads a
// divisor of 64): the CTA's rows are packed rows of its KV head, query-major (QueryRows), and a
// consumer's 64 rows are 64 / G queries x G heads, one TMA box of the 5-d map (D, G, L, Hkv, B).
//
// The traits, tensor maps and stage ring are in warp_specialized_pipeline.cuh, the gathered walk's
// producer in warp_specialized_gather.cuh; the sm_90 instructions (mbarriers, TMA, setmaxnreg,
// named barriers) come from pipeline_sm90.cuh, the MMAs from wgmma_sm90.cuh. Compiled for other architectures the kernel traps (the planner
// never sends it there).
#pragma once

#include <cuda.h>

#include <type_traits>

#include "cuda/attention/attention_sm90_tile.cuh"
#include "cuda/attention/family/key_walk.cuh"
#include "cuda/attention/family/tile_mask.cuh"
#include "cuda/attention/family/warp_specialized_gather.cuh"
#include "cuda/attention/family/warp_specialized_pipeline.cuh"
#include "cuda/attention/pipeline_sm90.cuh"
#include "cuda/attention/tile_common.cuh"
#include "dlmfuse/attention_planner.h"
#include "dlmfuse/online_softmax.h"

namespace dlmfuse::cuda::family {

// Adds the bias (log2 units) of the thread's two rows to its masked scores from one consumer's tile
// as the TMA wrote it: kTileN / 64 boxes of [64 rows][64 keys] of type B, 16-byte chunk c of row r
// stored at chunk c ^ (r % 8) (the 128-byte swizzle; the 8 rows a warp reads at once then fall in 8
// different chunks, 32 banks). Hidden scores stay -inf whatever the bias (keys past the tile's cols
// may read stale memory: the producer loads only the boxes that hold its keys). One bias type per
// instance (the query's): a switch over two made the head_dim 128 consumer spill.
template <typename B, int kTileN>
__device__ __forceinline__ void add_bias_tile_sw128(float (&s)[kTileN / 8][4], const uint16_t* tile,
                                                   const int (&rows)[2], int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int nt = 0; nt < kTileN / 8; ++nt) {
      const int col = nt * 8 + 2 * (lane % 4);  // and col + 1
      const uint32_t two = *reinterpret_cast<const uint32_t*>(tile + sm90::sw128_offset<kTileN>(rows[r], col, 64));
      float x0, x1;  // fp16 by the conversion instruction (to_float's bit version made the consumer spill)
      if constexpr (std::is_same<B, fp16_t>::value) {
        asm("{\n.reg .f16 lo, hi;\nmov.b32 {lo, hi}, %2;\ncvt.f32.f16 %0, lo;\ncvt.f32.f16 %1, hi;\n}\n"
            : "=f"(x0), "=f"(x1) : "r"(two));
      } else {
        x0 = __uint_as_float(two << 16);
        x1 = __uint_as_float(two & 0xffff0000u);
      }
      if (s[nt][2 * r] != -INFINITY) s[nt][2 * r] += kLog2e * x0;
      if (s[nt][2 * r + 1] != -INFINITY) s[nt][2 * r + 1] += kLog2e * x1;
    }
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    attention_fwd_warp_specialized_kernel(const AttentionParams p, const __grid_constant__ AttentionTensorMaps maps) {
#if DLMFUSE_WGMMA
  using T = typename Tr::T;
  constexpr int D = Tr::D, kTileN = Tr::kTileN, kStages = Tr::kStages, kBiasStages = Tr::kBiasStages;
  extern __shared__ __align__(128) unsigned char shared_raw[];
  // The 128-byte swizzle repeats every 1024 bytes: TMA and wgmma need tiles on 1024-byte boundaries.
  unsigned char* shared_base = shared_raw + (1024 - sm80::smem_address(shared_raw) % 1024) % 1024;
  T* q_tiles = reinterpret_cast<T*>(shared_base);  // [2 consumers][D / 64][64 rows][64]
  T* k_tiles = q_tiles + 2 * Tr::kQRows * D;        // [kStages][D / 64][kTileN][64]
  T* v_tiles = k_tiles + kStages * kTileN * D;      // [kStages][D / 64][kTileN][64]
  // With a bias: [kBiasStages][2 consumers][kTileN / 64][64 rows][64] 16-bit.
  uint16_t* bias_tiles = reinterpret_cast<uint16_t*>(v_tiles + kStages * kTileN * D);
  __shared__ PipelineShared<kStages, kTileN, kBiasStages> pipe;

  const int warpgroup = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
  // With labels, heads fastest and query tiles in descending order: under causal-like masks later
  // tiles see more keys, so the longest CTAs start first (as in the family's other kernels).
  // (QueryRows: the family's grid order; with pack_gqa, h is the KV head and q0 a packed row.)
  const QueryRows rows = query_rows<Tr::kTileM>(p);
  const int64_t b = rows.b, h = rows.h, q0 = rows.q0, kv_head = rows.kv_head;
  const int q_rows = rows.count;
  // Consumer 1 has rows only in tiles of more than 64; in the others (a ragged last tile, the few
  // rows of a mask-only step) it leaves at once: nothing is loaded for it, the stages are released
  // by consumer 0 alone and nobody takes turns.
  const int consumers_with_rows = q_rows > static_cast<int>(Tr::kQRows) ? 2 : 1;
  const bool bias_rows_broadcast = p.bias_strides[2] == 0;  // the map's boxes then hold one row

  if (threadIdx.x == 0) {
    sm90::mbarrier_init(&pipe.q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      sm90::mbarrier_init(&pipe.k_full[s], 1);
      sm90::mbarrier_init(&pipe.v_full[s], 1);
      sm90::mbarrier_init(&pipe.k_empty[s], Tr::kConsumerWarps / 2 * consumers_with_rows);
      sm90::mbarrier_init(&pipe.v_empty[s], Tr::kConsumerWarps / 2 * consumers_with_rows);
    }
    sm90::mbarrier_init(&pipe.v_tail, 1);
    for (int s = 0; s < kBiasStages; ++s)
      for (int c = 0; c < 2; ++c) {
        sm90::mbarrier_init(&pipe.bias_full[s][c], 1);
        sm90::mbarrier_init(&pipe.bias_empty[s][c], Tr::kConsumerWarps / 2);
      }
    sm90::fence_mbarrier_init();
  }
  __syncthreads();

  if (warpgroup == 0) {  // ------------------------------------------------------------ producer
    sm90::warpgroup_registers_decrease<Tr::kProducerRegisters>();
    if (threadIdx.x == 0) {
      // No box that lies wholly past q_len (consumer 1 then has no rows).
      sm90::mbarrier_arrive_expect_tx(&pipe.q_full, Tr::kQBytes / 2 * consumers_with_rows);
      for (int c = 0; c < consumers_with_rows; ++c)
        for (int col = 0; col < D; col += 64) {
          T* dst = q_tiles + c * Tr::kQRows * D + col * Tr::kQRows;
          if (rows.packed)  // packed rows q0 + 64 c.. are queries (q0 + 64 c) / G.. x the G heads
            sm90::tma_load_5d(&maps.q, &pipe.q_full, dst, col, 0,
                              (static_cast<int32_t>(q0) + c * static_cast<int32_t>(Tr::kQRows)) / rows.group,
                              static_cast<int32_t>(kv_head), static_cast<int32_t>(b));
          else
            tma_load_box(maps.q, &pipe.q_full, dst, col, h, q0 + c * Tr::kQRows, b);
        }
    }
    // This split's keys [k_begin, k_end): a run of whole tiles (all of them with one split), so only
    // the last tile of the last split has fewer than kTileN keys. 32-bit (the planner keeps k_len
    // below 2^31; unsigned, so k0 + kTileN cannot overflow): the producer has few registers.
    const uint32_t k_len = static_cast<uint32_t>(effective_k_len(p, b));
    const uint32_t split_keys = ((k_len + kTileN - 1) / kTileN + p.num_splits - 1) / p.num_splits * kTileN;
    const uint32_t k_begin = min(static_cast<uint32_t>(rows.split) * split_keys, k_len);
    const uint32_t k_end = min(k_begin + split_keys, k_len);
    if constexpr (Tr::kGather) {
      gather_producer<Tr>(p, rows, pipe, k_tiles, v_tiles, k_begin, k_end);
      return;
    }
    if (warp != 0) return;
    // The query tile's label and document ranges (the classification's left side).
    LabelRange q_range = LabelRange::empty();
    IdRange q_docs = IdRange::empty();
    if (p.has_labels) {
      for (int i = lane; i < q_rows; i += 32) {
        const int64_t query = rows.query(i);
        q_range.add(p.q_order.at(b, query), p.q_group.at(b, query));
        if (p.has_docs) q_docs.add(p.q_doc.at(b, query));
      }
      q_range = warp_reduce(q_range);
      q_docs = warp_reduce(q_docs);
    }
    int issued = 0;  // work tiles handed to the consumers
    for (uint32_t k0 = k_begin; k0 < k_end; k0 += kTileN) {
      const int cols = static_cast<int>(min(k_end - k0, static_cast<uint32_t>(kTileN)));
      TileKind kind = TileKind::kFull;
      if (p.has_labels) {
        LabelRange keys = LabelRange::empty();
        IdRange docs = IdRange::empty();
        for (int j = lane; j < cols; j += 32) {
          keys.add(p.k_order.at(b, k0 + j), p.k_group.at(b, k0 + j));
          if (p.has_docs) docs.add(p.k_doc.at(b, k0 + j));
        }
        kind = classify_tile(q_range, warp_reduce(keys));
        if (p.has_docs) kind = within_documents(kind, q_docs, warp_reduce(docs));
        if (kind == TileKind::kSkip) continue;
      }
      const int s = issued % kStages;
      const uint32_t last_use = (issued / kStages - 1) & 1;  // parity of the stage's previous use
      if (issued >= kStages) sm90::mbarrier_wait(&pipe.k_empty[s], last_use);
      if (kind == TileKind::kPartial)
        for (int j = lane; j < kTileN; j += 32) {
          const bool key = j < cols;
          pipe.key_labels[s][0][j] = key ? p.k_order.at(b, k0 + j) : 0;
          pipe.key_labels[s][1][j] = key ? p.k_group.at(b, k0 + j) : 0;
          pipe.key_labels[s][2][j] = key && p.has_docs ? p.k_doc.at(b, k0 + j) : 0;
        }
      // Keys kv_lens hides but memory holds (the TMA loads them with the tile).
      const bool zero_tail = cols < kTileN && k0 + cols < p.k_len;
      if (lane == 0) pipe.tiles[s] = StageTile{static_cast<int32_t>(k0), cols, static_cast<int32_t>(kind), zero_tail};
      __syncwarp();  // the lanes' labels before lane 0's arrivals publish them
      if (lane == 0) {
        sm90::mbarrier_arrive_expect_tx(&pipe.k_full[s], Tr::kKvBytes);
        for (int col = 0; col < D; col += 64)
          tma_load_box(maps.k, &pipe.k_full[s], k_tiles + s * kTileN * D + col * kTileN, col, kv_head, k0, b);
      }
      if constexpr (Tr::kBiasTiles) {
        // Each consumer's rows of the bias tile once it has released the stage's last use; only the
        // 64-key boxes that hold one of the tile's cols keys (the others' scores are -inf).
        const int bs = issued % kBiasStages;
        const uint32_t box_rows = bias_rows_broadcast ? 1 : Tr::kQRows, boxes = (cols + 63) / 64;
        for (int c = 0; c < consumers_with_rows; ++c) {
          if (issued >= kBiasStages) sm90::mbarrier_wait(&pipe.bias_empty[bs][c], (issued / kBiasStages - 1) & 1);
          if (lane == 0) {
            sm90::mbarrier_arrive_expect_tx(&pipe.bias_full[bs][c], boxes * box_rows * 128);
            for (int col = 0; col < cols; col += 64)
              sm90::tma_load_4d(&maps.bias, &pipe.bias_full[bs][c],
                                bias_tiles + (bs * 2 + c) * Tr::kBiasHalfElems + col * Tr::kQRows,
                                static_cast<int32_t>(k0) + col,
                                bias_rows_broadcast ? 0 : static_cast<int32_t>(q0) + c * static_cast<int32_t>(Tr::kQRows),
                                p.bias_strides[1] == 0 ? 0 : static_cast<int32_t>(h),
                                p.bias_strides[0] == 0 ? 0 : static_cast<int32_t>(b));
          }
        }
      }
      if (issued >= kStages) sm90::mbarrier_wait(&pipe.v_empty[s], last_use);
      if (lane == 0) {
        sm90::mbarrier_arrive_expect_tx(&pipe.v_full[s], Tr::kKvBytes);
        for (int col = 0; col < D; col += 64)
          tma_load_box(maps.v, &pipe.v_full[s], v_tiles + s * kTileN * D + col * kTileN, col, kv_head, k0, b);
      }
      if (zero_tail) {  // V rows cols.. of every 64-column box to zeros once the TMA has written them
        sm90::mbarrier_wait(&pipe.v_full[s], (issued / kStages) & 1);
        auto* v_rows = reinterpret_cast<uint4*>(v_tiles + s * kTileN * D);
        constexpr int kChunksPerRow = 128 / 16;
        for (int c = lane; c < (D / 64) * (kTileN - cols) * kChunksPerRow; c += 32) {
          const int box = c / ((kTileN - cols) * kChunksPerRow), rest = c % ((kTileN - cols) * kChunksPerRow);
          v_rows[(box * kTileN + cols + rest / kChunksPerRow) * kChunksPerRow + rest % kChunksPerRow] = make_uint4(0, 0, 0, 0);
        }
        sm90::fence_proxy_async_shared();  // the zeros, for wgmma's operand reads
        __syncwarp();
        if (lane == 0) sm90::mbarrier_arrive(&pipe.v_tail);
      }
      ++issued;
    }
    // The end of the walk: a stage whose kind says so, arriving without loads.
    const int s = issued % kStages;
    if (issued >= kStages) sm90::mbarrier_wait(&pipe.k_empty[s], (issued / kStages - 1) & 1);
    if (lane == 0) {
      pipe.tiles[s].kind = kEndOfWalk;
      sm90::mbarrier_arrive(&pipe.k_full[s]);
    }
    return;
  }

  // ---------------------------------------------------------------------------------- consumers
  sm90::warpgroup_registers_increase<Tr::kConsumerRegisters>();
  const int consumer = warpgroup - 1;
  if (consumer >= consumers_with_rows) return;
  const bool ping_pong = consumers_with_rows == 2;
  const int first_row = consumer * static_cast<int>(Tr::kQRows) + warp * 16 + lane / 4;  // and + 8, in the tile
  const uint32_t q_smem = sm80::smem_address(q_tiles + consumer * Tr::kQRows * D);
  // The labels of the thread's two fragment rows (0 past q_len: those rows are never written).
  RowLabels row_labels = {};
  if (p.has_labels)
    for (int r = 0; r < 2; ++r) {
      const int row = first_row + 8 * r;
      if (row >= q_rows) continue;
      const int64_t query = rows.query(row);
      row_labels.order[r] = p.q_order.at(b, query);
      row_labels.group[r] = p.q_group.at(b, query);
      row_labels.doc[r] = p.has_docs ? p.q_doc.at(b, query) : 0;
    }
  float o[D / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  const float score_scale = p.scale * kLog2e;

  // S = Q K^T for the tile in stage s, issued (not waited for): D / 16 k-steps, each 32 bytes into
  // the 128-byte swizzled rows.
  float sc[kTileN / 8][4];
  auto issue_scores = [&](int s) {
    const uint32_t k_smem = sm80::smem_address(k_tiles + s * kTileN * D);
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
      sm90::wgmma_ss<T, kTileN>(sc, sm90::sw128_descriptor(q_smem + (ks / 4) * Tr::kQBoxBytes + (ks % 4) * 32, 16, 1024),
                                sm90::sw128_descriptor(k_smem + (ks / 4) * Tr::kKvBoxBytes + (ks % 4) * 32, 16, 1024),
                                ks > 0);
    sm90::wgmma_commit();
  };
  // O += P V for the tile in stage s, issued: P as wgmma A fragments (per warp, the m16n8k16 A
  // layout), 16 keys a step.
  uint32_t pa[kTileN / 16][4];
  auto issue_pv = [&](int s) {
    const uint32_t v_smem = sm80::smem_address(v_tiles + s * kTileN * D);
#pragma unroll
    for (int kk = 0; kk < kTileN / 16; ++kk)
      sm90::wgmma_rs_mn_major_b<T, D>(o, pa[kk], sm90::sw128_descriptor(v_smem + kk * 16 * 128, Tr::kKvBoxBytes, 1024));
    sm90::wgmma_commit();
  };
  auto release = [&](uint64_t* empty) {  // this warp no longer reads what the barrier guards
    __syncwarp();
    if (lane == 0) sm90::mbarrier_arrive(empty);
  };
  // Scale to base 2; hide the keys past cols and, in PARTIAL tiles, what the labels hide (rows past
  // q_len need no test: they are never written); add the bias of work tile i (its stage of the
  // bias ring, released once added). Then the scores' part of the online softmax.
  float alpha[2];
  const int row_in_half = warp * 16 + lane / 4;
  const int bias_rows[2] = {bias_rows_broadcast ? 0 : row_in_half, bias_rows_broadcast ? 0 : row_in_half + 8};
  auto softmax_of = [&](const StageTile& tile, int s, int i) {
    const int32_t* labels = pipe.key_labels[s][0];
    const KeyLabels keys{labels, labels + kTileN, labels + 2 * kTileN};
    const int no_row_bound[2] = {0, 0};
    mask_tile<kTileN>(sc, score_scale, static_cast<TileKind>(tile.kind), keys, p.has_docs, row_labels, no_row_bound,
                      1, true, tile.cols, lane);
    if constexpr (Tr::kBiasTiles) {
      const int bs = i % kBiasStages;
      sm90::mbarrier_wait(&pipe.bias_full[bs][consumer], (i / kBiasStages) & 1);
      add_bias_tile_sw128<T, kTileN>(sc, bias_tiles + (bs * 2 + consumer) * Tr::kBiasHalfElems, bias_rows, lane);
      release(&pipe.bias_empty[bs][consumer]);
    } else if constexpr (Tr::kBiasLoad == BiasLoad::kRows) {
      const int rows_in_tile[2] = {first_row, first_row + 8};
      sm80::add_bias_by_row<kTileN>(sc, p, b, h, q0, tile.k0, rows_in_tile, q_rows, tile.cols, lane);
    }
    sm80::softmax_scores<kTileN>(sc, row_max, row_sum, alpha);
  };
  auto wait_v = [&](const StageTile& tile, int s, uint32_t phase) {
    if (tile.zeroed_tail) sm90::mbarrier_wait(&pipe.v_tail, 0);
    else sm90::mbarrier_wait(&pipe.v_full[s], phase);
  };
  // Ping-pong: the consumers take turns to issue their MMA batches (named barriers, 256 threads), so
  // that one's softmax runs while the other's MMAs do. Consumer 0 starts; every arrive meets a sync.
  // A lone consumer 0 takes no turns.
  const uint32_t my_turn = 1 + consumer, other_turn = 2 - consumer;  // named barriers 1 and 2
  auto take_turn = [&] {
    if (ping_pong) sm90::named_barrier_sync(my_turn, 256);
  };
  auto pass_turn = [&] {
    if (ping_pong) sm90::named_barrier_arrive(other_turn, 256);
  };
  if (consumer == 1) sm90::named_barrier_arrive(1, 256);

  // Every wgmma batch is issued where its warpgroup.arrive (wgmma_fence) directly precedes it, with
  // no branch between: otherwise ptxas inserts its own and serialises the batches.
  sm90::mbarrier_wait(&pipe.q_full, 0);
  sm90::mbarrier_wait(&pipe.k_full[0], 0);
  StageTile tile = pipe.tiles[0];
  if (tile.kind == kEndOfWalk) {  // no visible key: the turns still pair up
    take_turn();
    pass_turn();
  } else {
    take_turn();
    sm90::fence_operands(sc);
    sm90::wgmma_fence();
    issue_scores(0);
    pass_turn();
    sm90::wgmma_wait<0>();
    sm90::fence_operands(sc);
    softmax_of(tile, 0, 0);  // o is still zero: nothing to rescale
    release(&pipe.k_empty[0]);
    sm80::pack_p<T, kTileN>(pa, sc);
    // Tile i's S batch is issued with tile i - 1's P V batch; the softmax of S(i) runs while P V
    // (i - 1) computes; o is rescaled once that batch has completed.
    int i = 1;
    for (;; ++i) {
      const int s = i % kStages, prev = (i - 1) % kStages;
      sm90::mbarrier_wait(&pipe.k_full[s], (i / kStages) & 1);
      const StageTile next = pipe.tiles[s];
      if (next.kind == kEndOfWalk) break;
      wait_v(tile, prev, ((i - 1) / kStages) & 1);
      take_turn();
      sm90::fence_operands(sc);
      sm90::fence_operands(o);
      sm90::fence_operands(pa);
      sm90::wgmma_fence();
      issue_scores(s);
      issue_pv(prev);
      pass_turn();
      sm90::wgmma_wait<1>();  // S(i) has completed; P V (i - 1) may still run
      sm90::fence_operands(sc);
      softmax_of(next, s, i);
      release(&pipe.k_empty[s]);
      sm90::wgmma_wait<0>();
      sm90::fence_operands(o);
      sm90::fence_operands(pa);  // P (i - 1) is rewritten only now
      release(&pipe.v_empty[prev]);
      sm80::rescale_rows<D>(o, alpha);
      sm80::pack_p<T, kTileN>(pa, sc);
      tile = next;
    }
    // The last tile's P V.
    const int last = (i - 1) % kStages;
    wait_v(tile, last, ((i - 1) / kStages) & 1);
    take_turn();
    sm90::fence_operands(o);
    sm90::fence_operands(pa);
    sm90::wgmma_fence();
    issue_pv(last);
    pass_turn();
    sm90::wgmma_wait<0>();
    sm90::fence_operands(o);
    release(&pipe.v_empty[last]);
  }
  if (consumer == 0) take_turn();  // consumer 1's last pass_turn

  // Epilogue: the thread's rows of the tile (rows past q_len are never written); with split-KV a
  // normalised fp32 partial per row (a broken one with a NaN lse: write_partial_row).
  for (int r = 0; r < 2; ++r) {
    if (first_row + 8 * r >= q_rows) continue;
    const int64_t query = rows.query(first_row + 8 * r), head = rows.head(first_row + 8 * r);
    if (p.num_splits > 1) {
      const int64_t lse_row = (b * p.q_heads + head) * p.q_len + query;  // [B, Hq, Lq]
      const int64_t split = rows.split;
      sm80::write_partial_row<D>(p, o, row_max, row_sum, r, split * p.batch * p.q_heads * p.q_len + lse_row, lane);
    } else {
      sm80::write_output_row<T, D>(p, o, row_max, row_sum, r, b, query, head, lane);
    }
  }
#else
  __trap();  // never launched: the planner sends mma=sm90 to sm_90 GPUs only
#endif
}

}  // namespace dlmfuse::cuda::family
