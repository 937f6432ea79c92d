// Helpers for the CUDA module's bindings: run on the tensors' device, raise on CUDA errors.
#pragma once

#include <cuda_runtime.h>

#include "bindings/tensor_checks.h"
#include "dlmfuse/errors.h"

namespace dlmfuse::bindings {

// Makes `device` current for the scope (tensors may live on another GPU than the current one).
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device) {
    cudaGetDevice(&previous_);
    if (device != previous_) cudaSetDevice(device);
  }
  ~CudaDeviceGuard() { cudaSetDevice(previous_); }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

inline cudaStream_t as_stream(uint64_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

inline void check_launch(cudaError_t err, const char* op, const char* kernel) {
  if (err != cudaSuccess)
    throw_runtime_error(op, ": CUDA kernel ", kernel, " failed: ", cudaGetErrorName(err), " (",
                        cudaGetErrorString(err), ")");
}

}  // namespace dlmfuse::bindings
