// Portability macros shared by the g++ (CPU) and nvcc (CUDA) builds. No framework headers here.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DLMFUSE_HOST_DEVICE __host__ __device__
#define DLMFUSE_INLINE __forceinline__
#else
#define DLMFUSE_HOST_DEVICE
// always_inline: the CPU tile kernels are compiled once per instruction set; forcing the shared
// math inline keeps an AVX-512 copy of a helper from being picked by the linker for the baseline.
#define DLMFUSE_INLINE inline __attribute__((always_inline))
#endif

namespace dlmfuse {

// Key order label meaning "after every query" (padding, BD3-LM noisy keys): never visible by order.
constexpr int32_t kOrderInfinity = INT32_MAX;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

}  // namespace dlmfuse
