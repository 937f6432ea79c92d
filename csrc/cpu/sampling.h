// CPU entry point of the sampling family. Arguments are validated by csrc/bindings.
#pragma once

#include "dlmfuse/sampling_params.h"

namespace dlmfuse::cpu {

// Fills tokens and confidence for every row. A row with no token that can be emitted
// (all suppressed, -inf or NaN) gets token -1 and confidence -inf, as on CUDA: the Python op
// raises for it, a vocabulary shard's row may legitimately have none.
void sample_tokens(const SamplingParams& params);

}  // namespace dlmfuse::cpu
