// Shared launch helpers for the CUDA kernels (no nanobind, no torch).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dlmfuse::cuda {

inline bool aligned_to(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace dlmfuse::cuda
