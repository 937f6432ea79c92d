// CUDA launchers of the attention family. Validated AttentionParams in, cudaError_t out;
// launched on the caller's stream, no allocation, no host sync.
#pragma once

#include <cuda_runtime.h>

#include "dlmfuse/attention_params.h"
#include "dlmfuse/attention_plan.h"
#include "dlmfuse/attention_planner.h"

namespace dlmfuse::cuda {

// Reference-grade CUDA kernel (fp32 math on CUDA cores, every dtype, head_dim 64 / 128): the
// correctness baseline and the fp32 path; the tensor-core kernel comes next (issue: CUDA
// attention on tensor cores).
cudaError_t attention_forward_simple(const AttentionParams& params, cudaStream_t stream);

// Tensor-core kernel (mma.sync, sm_80+): bf16 / fp16, head_dim 64 / 128, rows 16-byte aligned.
// With params.num_splits > 1 it splits each row's key range and merges the partials (split-KV).
bool attention_sm80_supports(const AttentionParams& params);
cudaError_t attention_forward_sm80(const AttentionParams& params, cudaStream_t stream);

// The planned attention family (cuda/attention/family; opt-in until a GPU run verifies it): runs
// `plan` (plan_attention's for these params, or one plan_mismatch accepts), the CUDA-core kernel
// for mma=simt. Documents are honoured by every plan.
cudaError_t attention_forward_family(const AttentionParams& params, const AttentionPlan& plan, cudaStream_t stream);

// The family's Hopper kernel (plan mma=sm90 with tile_m=128; attention_fwd_warp_specialized.cuh):
// TMA loads and warp specialisation; labels, documents, kv_lens, biases, split-KV (merged as the
// family's), GQA packing (p.pack_gqa) and the gathered walk (plan.walk).
cudaError_t attention_forward_warp_specialized(const AttentionParams& params, const AttentionPlan& plan,
                                               cudaStream_t stream);

// Fused backward on tensor cores (attention_bwd.cu; not yet run on a GPU): bf16 / fp16, head_dim
// 64 / 128, 16-byte aligned rows of q, k, v and grad_out. Fills grad_q, grad_k, grad_v (and
// grad_bias where given; the caller zeroes it) without atomics.
bool attention_backward_supports(const AttentionBackwardParams& params);
cudaError_t attention_backward(const AttentionBackwardParams& params, cudaStream_t stream);

// Exact merge of two partial attentions (same math as the CPU: dlmfuse/online_softmax.h).
cudaError_t merge_attention(const MergeParams& params, cudaStream_t stream);

}  // namespace dlmfuse::cuda
