// CUDA launcher of sample_tokens (top_k / top_p by radix selection in the kernel).
#pragma once

#include <cuda_runtime.h>

#include "dlmfuse/sampling_params.h"

namespace dlmfuse::cuda {

// seed_device / offset_device: optional int64 scalars in device memory that override p.seed /
// p.offset (so a captured CUDA graph can be replayed with new noise). A row with no token that
// can be emitted gets token -1 and confidence -inf (no host sync to raise).
cudaError_t sample_tokens(const SamplingParams& p, const int64_t* seed_device,
                          const int64_t* offset_device, cudaStream_t stream);

}  // namespace dlmfuse::cuda
