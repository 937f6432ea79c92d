// One row of sample_tokens computed entirely in float64 (CPU). See sampling_exact.cpp.
#pragma once

#include "dlmfuse/sampling_params.h"

namespace dlmfuse::cpu {

// token -1 and confidence -inf when no token can be emitted.
void sample_row_exact(const SamplingParams& p, int64_t row, int64_t* token, float* confidence);

}  // namespace dlmfuse::cpu
