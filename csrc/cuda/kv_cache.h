// CUDA launchers of the kv_cache family. Validated arguments in, cudaError_t out.
#pragma once

#include <cuda_runtime.h>

#include "dlmfuse/kv_cache_params.h"

namespace dlmfuse::cuda {

// One launch for K and V; rows with a position outside [0, Lmax) are skipped. No sync.
cudaError_t kv_scatter(const KvScatterParams& params, cudaStream_t stream);

}  // namespace dlmfuse::cuda
