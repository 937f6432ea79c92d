// Launch decisions of the CUDA tensor-core attention that depend on shapes alone: host code with
// no CUDA in it, so that CPU-only builds compile (and test) the same decisions.
#pragma once

#include <cstdint>

#include "dlmfuse/config.h"

namespace dlmfuse {

// Most key splits one call may use (the merge kernel keeps one split per lane of a warp).
constexpr int kAttentionMaxSplits = 16;
// Query rows per CTA at 16 rows per warp, and keys per tile, of the tensor-core kernel.
constexpr int kAttentionCtaRows = 64;
constexpr int kAttentionKeyTile = 64;
// Grid: (query tiles, q_heads, batch * num_splits), each dim kept within 65535 (CUDA's cap on y, z).
constexpr int64_t kAttentionMaxGridDim = 65535;
// Split-KV heuristic: the split count that brings the grid nearest to this many CTAs per SM (two
// waves: at D = 128 the kernel's 252 registers per thread keep 2 CTAs resident per SM), with at
// least this many key tiles per split (each split also writes and the merge reads 64 x D floats).
constexpr int64_t kSplitTargetCtasPerSm = 4;
constexpr int64_t kSplitMinKeyTiles = 2;

DLMFUSE_HOST_DEVICE constexpr int64_t plan_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether packing the q_heads / kv_heads query heads of each KV head into one run of CTA rows
// (AttentionParams::pack_gqa) needs fewer CTAs, i.e. fewer reads of each K/V tile, than one run
// per query head: calls with few query rows (sparse mask-only steps) and grouped heads.
inline bool attention_packs_gqa(int64_t q_heads, int64_t kv_heads, int64_t q_len, int rows_per_cta) {
  if (kv_heads <= 0 || q_heads <= kv_heads || q_heads % kv_heads != 0 || q_len <= 0 || rows_per_cta <= 0) return false;
  return kv_heads * plan_ceil_div(q_len * (q_heads / kv_heads), rows_per_cta) < q_heads * plan_ceil_div(q_len, rows_per_cta);
}

// Split count for the tensor-core kernel from the shapes alone (no host sync): enough CTAs for
// about two waves on `sm_count` SMs, at least two key tiles per split, 1 when splitting cannot
// help. Python sizes the workspace (AttentionParams::partial_out / partial_lse) from it.
// rows_per_cta: query rows per CTA of the kernel that runs (64; 128 with wide_rows); kv_heads > 0:
// the kernel may pack GQA heads (next paths, no bias), counted as attention_packs_gqa says.
inline int attention_num_splits(int64_t batch, int64_t q_heads, int64_t q_len, int64_t k_len, int64_t head_dim,
                                int sm_count, int rows_per_cta = kAttentionCtaRows, int64_t kv_heads = 0) {
  if (batch <= 0 || q_heads <= 0 || q_len <= 0 || k_len <= 0 || sm_count <= 0) return 1;
  if (head_dim != 64 && head_dim != 128) return 1;  // the CUDA-core kernel runs: it never splits
  if (rows_per_cta != kAttentionCtaRows && rows_per_cta != 2 * kAttentionCtaRows) return 1;
  const int64_t ctas = attention_packs_gqa(q_heads, kv_heads, q_len, rows_per_cta)
                           ? batch * kv_heads * plan_ceil_div(q_len * (q_heads / kv_heads), rows_per_cta)
                           : batch * q_heads * plan_ceil_div(q_len, rows_per_cta);
  int64_t splits = (kSplitTargetCtasPerSm * sm_count + ctas / 2) / ctas;  // nearest to the target
  const int64_t most_by_keys = plan_ceil_div(plan_ceil_div(k_len, kAttentionKeyTile), kSplitMinKeyTiles);
  splits = splits < most_by_keys ? splits : most_by_keys;
  splits = splits < kAttentionMaxSplits ? splits : kAttentionMaxSplits;
  splits = splits < kAttentionMaxGridDim / batch ? splits : kAttentionMaxGridDim / batch;
  return splits > 1 ? static_cast<int>(splits) : 1;
}

}  // namespace dlmfuse
