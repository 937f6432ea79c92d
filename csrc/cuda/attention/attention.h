// CUDA launchers of the attention family. Validated AttentionParams in, cudaError_t out;
// launched on the caller's stream, no allocation, no host sync.
#pragma once

#include <cuda_runtime.h>

#include "dlmfuse/attention_params.h"

namespace dlmfuse::cuda {

// Reference-grade CUDA kernel (fp32 math on CUDA cores, every dtype, head_dim 64 / 128): the
// correctness baseline and the fp32 path; the tensor-core kernel comes next (issue: CUDA
// attention on tensor cores).
cudaError_t attention_forward_simple(const AttentionParams& params, cudaStream_t stream);

// Tensor-core kernel (mma.sync, sm_80+): bf16 / fp16, head_dim 64 / 128, rows 16-byte aligned.
// With params.num_splits > 1 it splits each row's key range and merges the partials (split-KV).
bool attention_sm80_supports(const AttentionParams& params);
cudaError_t attention_forward_sm80(const AttentionParams& params, cudaStream_t stream);

// Most key splits one call may use (the merge kernel keeps one split per lane of a warp).
constexpr int kAttentionMaxSplits = 16;

// Split count for the tensor-core kernel from the shapes alone (no host sync): enough CTAs for
// about two waves on `sm_count` SMs, at least two key tiles per split, 1 when splitting cannot
// help. Python sizes the workspace (AttentionParams::partial_out / partial_lse) from it.
// rows_per_cta: query rows per CTA of the kernel that runs (64; 128 with wide_rows); kv_heads > 0:
// the kernel may pack GQA heads (next paths, no bias), counted as attention_packs_gqa says.
int attention_num_splits(int64_t batch, int64_t q_heads, int64_t q_len, int64_t k_len, int64_t head_dim,
                         int sm_count, int rows_per_cta = 64, int64_t kv_heads = 0);

// Whether packing the q_heads / kv_heads query heads of each KV head into one run of CTA rows
// (AttentionParams::pack_gqa) needs fewer CTAs, i.e. fewer reads of each K/V tile, than one run
// per query head: calls with few query rows (sparse mask-only steps) and grouped heads.
bool attention_packs_gqa(int64_t q_heads, int64_t kv_heads, int64_t q_len, int rows_per_cta);

// Exact merge of two partial attentions (same math as the CPU: dlmfuse/online_softmax.h).
cudaError_t merge_attention(const MergeParams& params, cudaStream_t stream);

}  // namespace dlmfuse::cuda
