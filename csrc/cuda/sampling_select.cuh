// The top-k / top-p cut of sample_tokens on CUDA (sampling.cu), by radix selection over the row
// inside one CTA of kThreads threads (a multiple of 32): no sort, a few passes that stay in L2.
#pragma once

#include <cmath>
#include <cstdint>

#include "dlmfuse/sampling_params.h"

namespace dlmfuse::cuda::sampling {

// The cut is a value of w = l / T' (fp32, as the CPU computes it): tokens with w >= cut are kept.
// Both selections descend the 32-bit order-preserving key of w one byte at a time over the row
// (4 passes each, no sort): top-k counts tokens per byte bucket, top-p sums their probability
// mass; the CPU path (csrc/cpu/sampling_select.h) picks the same values.

__device__ __forceinline__ uint32_t order_key(float w) {
  const uint32_t bits = __float_as_uint(w);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// exp(w - w_max) in float64, the same weight the CPU's top-p selection uses.
__device__ __forceinline__ double token_weight(float w, float w_max) {
  return exp(static_cast<double>(w) - static_cast<double>(w_max));
}

// Block-wide max (is_max) or sum of a double; the result is valid in every thread.
template <int kThreads>
__device__ double block_reduce(double x, bool is_max, double* scratch) {
  for (int delta = 16; delta > 0; delta /= 2) {
    const double other = __shfl_xor_sync(0xffffffffu, x, delta);
    x = is_max ? fmax(x, other) : x + other;
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  double total = scratch[0];
  for (int w = 1; w < kThreads / 32; ++w) total = is_max ? fmax(total, scratch[w]) : total + scratch[w];
  __syncthreads();
  return total;
}

struct SelectShared {
  unsigned int count[256];
  double mass[256];
  uint32_t prefix;
  double above;
  int64_t remaining;
};

// One byte of the descent: histogram of the eligible tokens whose key matches `prefix` on the
// bits above `shift`, then thread 0 walks the buckets from the top. by_mass: weights
// exp(w - w_max) against `target`; else counts against `remaining`.
template <int kThreads, typename W>
__device__ void radix_step(int64_t vocab, W&& w_of, int shift, bool by_mass, float w_max,
                           double target, SelectShared& sh) {
  for (int i = threadIdx.x; i < 256; i += kThreads) sh.count[i] = 0, sh.mass[i] = 0.0;
  __syncthreads();
  const uint32_t high_mask = shift == 24 ? 0u : ~((1u << (shift + 8)) - 1u);
  for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
    float w;
    if (!w_of(j, w)) continue;
    const uint32_t key = order_key(w);
    if ((key & high_mask) != (sh.prefix & high_mask)) continue;
    const int bucket = (key >> shift) & 0xff;
    if (by_mass) atomicAdd(&sh.mass[bucket], token_weight(w, w_max));
    else atomicAdd(&sh.count[bucket], 1u);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int bucket = 255; bucket >= 0; --bucket) {
      const bool crosses = by_mass ? sh.above + sh.mass[bucket] >= target
                                   : static_cast<int64_t>(sh.count[bucket]) >= sh.remaining;
      if (crosses || bucket == 0) {
        sh.prefix = (sh.prefix & high_mask) | (static_cast<uint32_t>(bucket) << shift);
        break;
      }
      if (by_mass) sh.above += sh.mass[bucket];
      else sh.remaining -= sh.count[bucket];
    }
  }
  __syncthreads();
}

template <int kThreads, typename W>
__device__ float select_cut(const SamplingParams& p, int64_t eligible, W&& w_of, float w_max,
                            double total_mass, SelectShared& sh) {
  float cut = -INFINITY;
  if (p.top_p < 1.0) {
    if (threadIdx.x == 0) sh.prefix = 0, sh.above = 0.0;
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) radix_step<kThreads>(p.vocab, w_of, shift, true, w_max, p.top_p * total_mass, sh);
    cut = key_value(sh.prefix);
  }
  if (p.top_k > 0 && p.top_k < eligible) {
    if (threadIdx.x == 0) sh.prefix = 0, sh.remaining = p.top_k;
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) radix_step<kThreads>(p.vocab, w_of, shift, false, w_max, 0.0, sh);
    cut = fmaxf(cut, key_value(sh.prefix));
  }
  __syncthreads();
  return cut;
}

}  // namespace dlmfuse::cuda::sampling
