// CPU entry points of the attention family. Arguments are validated by csrc/bindings.
#pragma once

#include "dlmfuse/attention_params.h"

namespace dlmfuse::cpu {

void attention_forward(const AttentionParams& params);
// Fills the gradients of q, k, v (and bias) by recomputing the probabilities from the saved lse,
// tile by tile with the forward's tile classification (FlashAttention-2's backward); parallel
// over (batch, KV head, key range), deterministic, no atomics.
void attention_backward(const AttentionBackwardParams& params);
void merge_attention(const MergeParams& params);

}  // namespace dlmfuse::cpu
