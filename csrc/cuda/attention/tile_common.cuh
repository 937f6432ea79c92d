// Device helpers shared by the CUDA attention kernels: bias reads through strides in any float
// dtype, and warp-wide reductions (label ranges for tile classification, softmax max / sum).
#pragma once

#include "dlmfuse/attention_params.h"
#include "dlmfuse/half_convert.h"
#include "dlmfuse/visibility.h"

namespace dlmfuse::cuda {

__device__ __forceinline__ float bias_at(const AttentionParams& p, int64_t offset) {
  switch (p.bias_dtype) {
    case DType::kBFloat16: return to_float(static_cast<const bf16_t*>(p.bias)[offset]);
    case DType::kFloat16: return to_float(static_cast<const fp16_t*>(p.bias)[offset]);
    default: return static_cast<const float*>(p.bias)[offset];
  }
}

__device__ __forceinline__ int warp_reduce_min(int x) {
  for (int d = 16; d > 0; d /= 2) x = min(x, __shfl_xor_sync(0xffffffffu, x, d));
  return x;
}
__device__ __forceinline__ int warp_reduce_max(int x) {
  for (int d = 16; d > 0; d /= 2) x = max(x, __shfl_xor_sync(0xffffffffu, x, d));
  return x;
}
// Label range over the 32 lanes (each lane brings its own range, empty() for none).
__device__ __forceinline__ LabelRange warp_reduce(LabelRange r) {
  return {warp_reduce_min(r.order_min), warp_reduce_max(r.order_max), warp_reduce_min(r.group_min),
          warp_reduce_max(r.group_max)};
}
// Document id range over the 32 lanes (each lane brings its own range, empty() for none).
__device__ __forceinline__ IdRange warp_reduce(IdRange r) { return {warp_reduce_min(r.min), warp_reduce_max(r.max)}; }

// Keys of batch row b that kv_lens leaves visible (all k_len without kv_lens).
__device__ __forceinline__ int64_t effective_k_len(const AttentionParams& p, int64_t b) {
  if (p.kv_lens == nullptr) return p.k_len;
  const int64_t len = p.kv_lens[b];
  return len < 0 ? 0 : (len < p.k_len ? len : p.k_len);
}
__device__ __forceinline__ float warp_max(float x) {
  for (int d = 16; d > 0; d /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, d));
  return x;
}
__device__ __forceinline__ double warp_max(double x) {
  for (int d = 16; d > 0; d /= 2) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, d));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int d = 16; d > 0; d /= 2) x += __shfl_xor_sync(0xffffffffu, x, d);
  return x;
}

}  // namespace dlmfuse::cuda
