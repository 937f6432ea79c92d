// CPU attention: the per-task tile kernel, compiled once per instruction set (attention_tiles.cpp),
// and the plan that the dispatcher (attention.cpp) computes once per call.
#pragma once

#include <cstddef>

#include "dlmfuse/attention_params.h"
#include "dlmfuse/visibility.h"

namespace dlmfuse::cpu {

constexpr int kAttnTileM = 64;  // query rows per task
constexpr int kAttnTileN = 64;  // keys per inner tile
constexpr int kAttnTileRowBlock = 4;  // rows of the micro-kernels' register block (M % it == 0)

// Per-call precomputation shared by all tasks (read-only while tasks run).
struct AttentionPlan {
  int64_t n_q_tiles = 0;
  int64_t n_k_tiles = 0;
  int64_t group_size = 1;                // Hq / Hkv
  const LabelRange* q_ranges = nullptr;  // [B, n_q_tiles], null when the call has no labels
  const LabelRange* k_ranges = nullptr;  // [B, n_k_tiles]
  const IdRange* q_doc_ranges = nullptr;  // [B, n_q_tiles], null when the call has no documents
  const IdRange* k_doc_ranges = nullptr;  // [B, n_k_tiles]
};

// Number of tasks: one per (batch, kv head, query tile, query head of the group).
inline int64_t attention_task_count(const AttentionParams& p, const AttentionPlan& plan) {
  return p.batch * p.q_heads * plan.n_q_tiles;
}

// The narrowest compiled tile width holding head_dim (head_dim in [1, kAttentionMaxHeadDim]).
inline int64_t attention_tile_width(int64_t head_dim) {
  constexpr int64_t kWidths[] = {DLMFUSE_ATTENTION_TILE_DIMS};
  for (int64_t width : kWidths)
    if (head_dim <= width) return width;
  return kAttentionMaxHeadDim;
}

// fp32 scratch a thread needs for one task (64-byte aligned by the caller).
inline size_t attention_scratch_floats(int64_t head_dim) {
  const size_t m = kAttnTileM, n = kAttnTileN, d = static_cast<size_t>(attention_tile_width(head_dim));
  // Q, O, V tiles; K^T tile; S tile; bias row; running max and sum; key labels and documents of a
  // gathered and of a contiguous PARTIAL tile (6 x n int32); the query groups, sorted, and the
  // rows' overflow flags (2 x m int32); the gathered keys of a FULL and a PARTIAL tile (2 x n int64).
  return m * d * 2 + n * d * 2 + m * n + n + 2 * m + 6 * n + 2 * m + 4 * n + 64;
}

// Query row i of (batch b, head h) in float64, written to out and lse: for rows whose float32
// scores overflowed (attention_exact.cpp). Not ISA-specific.
void attention_row_exact(const AttentionParams& p, int64_t b, int64_t h, int64_t i);

// Whether bias[b, h, i, :k_len] holds a finite value. A row that ends without a finite score
// although it does saw that bias overflow in the kernel's log2 units (finfo(float32).min times
// log2 e is -inf) or in its sum with a score; only such rows read their bias row a second time.
bool row_has_finite_bias(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t k_len);

// One task of one (dtype, tile width) instantiation.
using AttentionTaskFn = void (*)(const AttentionParams& p, const AttentionPlan& plan, int64_t task,
                                 float* scratch);

// The backward's split of each (batch, KV head) into key ranges, each with its own dQ slice.
struct BackwardPlan {
  AttentionPlan tiles;
  int64_t splits = 1;         // key ranges per (batch, KV head)
  int64_t q_rows_padded = 0;  // Lq rounded up to the micro-kernel's row block (rows per (b, h) in a slice)
  float* grad_q_slices = nullptr;  // [splits, B, Hq, q_rows_padded, D_tile] float32, zeroed
  int64_t tile_width = 0;     // D_tile
};

// Fp32 scratch of one backward task (64-byte aligned by the caller).
inline size_t attention_backward_scratch_floats(int64_t head_dim) {
  const size_t m = kAttnTileM, n = kAttnTileN, d = static_cast<size_t>(attention_tile_width(head_dim));
  // K tile twice (rows, transposed), V transposed, dK and dV accumulators, Q and dO tiles; S / P /
  // dS and dP; the rows' lse and delta; a bias row; key labels (3 x n int32).
  return 7 * n * d + 2 * m * n + 2 * m + n + 3 * n + 64;
}

using AttentionBackwardTaskFn = void (*)(const AttentionBackwardParams& p, const BackwardPlan& plan, int64_t task,
                                         float* scratch);

// Each ISA namespace returns its kernels for (dtype, head_dim): the narrowest tile width that holds
// head_dim, or null when none does
// (the dispatcher has already raised a clear error for unsupported values by then).
#define DLMFUSE_DECLARE_ATTENTION_ISA(isa) \
  namespace isa {                          \
  AttentionTaskFn attention_task_fn(DType dtype, int64_t head_dim); \
  AttentionBackwardTaskFn attention_backward_task_fn(DType dtype, int64_t head_dim); \
  }

DLMFUSE_DECLARE_ATTENTION_ISA(baseline)
DLMFUSE_DECLARE_ATTENTION_ISA(avx2)
DLMFUSE_DECLARE_ATTENTION_ISA(avx512)
#undef DLMFUSE_DECLARE_ATTENTION_ISA

}  // namespace dlmfuse::cpu
