// Host-side facts about the CUDA runtime compiled into dlmfuse._C_cuda (no nanobind here).
#pragma once

#include <cuda_runtime.h>

namespace dlmfuse::cuda {

int runtime_version();  // e.g. 13000 for CUDA 13.0
// Visible devices; 0 when there is no driver or no GPU (never an error: the package must import).
int device_count();
// An attribute of the current device, 0 when it cannot be read.
int current_device_attribute(cudaDeviceAttr attribute);

}  // namespace dlmfuse::cuda
