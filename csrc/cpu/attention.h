// CPU entry points of the attention family. Arguments are validated by csrc/bindings.
#pragma once

#include "dlmfuse/attention_params.h"

namespace dlmfuse::cpu {

void attention_forward(const AttentionParams& params);
void merge_attention(const MergeParams& params);

}  // namespace dlmfuse::cpu
