// CPU entry point of the sampling family. Arguments are validated by csrc/bindings.
#pragma once

#include "dlmfuse/sampling_params.h"

namespace dlmfuse::cpu {

// Fills tokens and confidence for every row. A row with no token that can be emitted
// (all suppressed, -inf or NaN) raises ValueError naming the row.
void sample_tokens(const SamplingParams& params);

}  // namespace dlmfuse::cpu
