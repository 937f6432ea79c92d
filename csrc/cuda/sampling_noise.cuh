// The Gumbel noise of sample_tokens on CUDA (sampling.cu): Philox4x32-10 words per column, a row at
// a time (RowNoise), and the noise -log(-log u) from them, in fp32 for screening and in float64 for
// the exact re-scoring. The same words as dlmfuse/philox.h's gumbel_words on the CPU.
#pragma once

#include <cstdint>

#include "dlmfuse/philox.h"

namespace dlmfuse::cuda::sampling {

// log2 on the special function unit: __log2f's instruction without its rescaling of subnormal
// arguments (no argument here is below 2^-53). Error, as CUDA documents for __log2f: <= 2^-22
// absolute on [1/2, 2], else <= 2 ulp (<= 2^-22 relative).
__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Gumbel noise -log(-log u) in fp32, for screening only (the winner is re-scored in float64).
// Error, from fast_log2's bounds: m below is within 2^-23 relative of min(u, 1 - u); -log2 u is
// within 5.4e-6 relative (u in [1/2, 15/16], log2 u >= 0.093 in size), 6e-7 elsewhere (series,
// or u < 1/2); the outer log adds 2.4e-7 relative of |log2(-log2 u)| and a rounding. So
// |g error| <= 7e-6 + 3e-7 |g| (score_margin's budget).
__device__ __forceinline__ float gumbel_fp32(GumbelWords w) {
  // Complementing both words maps u to 1 - u exactly (the layout's a becomes 2^52 - 1 - a), so
  // m = min(u, 1 - u) comes from the words with the top bit of hi clear: u > 1/2 iff it is set.
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(w.hi) >> 31);
  const uint32_t hi = w.hi ^ flip, lo = w.lo ^ flip;
  // (2 (lo >> 12) + 1) 2^-53 exactly, without an int-to-float conversion: it is the fraction of
  // the float 1 + (2 (lo >> 12) + 1) 2^-21, scaled by 2^-32.
  const float one_plus_low = __uint_as_float(0x3f800000u | ((lo >> 9) & 0x7ffff8u) | 4u);
  const float low = fmaf(one_plus_low, 0x1.0p-32f, -0x1.0p-32f);
  const float m = fmaf(static_cast<float>(hi), 0x1.0p-32f, low);  // min(u, 1 - u), in (0, 1/2)
  const bool u_above_half = flip != 0;
  // -log2 u = log2(e) (v + v^2/2 + ... + v^5/5) for u > 15/16, v = 1 - u = m: no cancellation,
  // unlike the log of a u near 1; truncation < 1.7e-7 relative for v < 1/16.
  float series = 0.28853901f;             // log2(e) / 5
  series = fmaf(m, series, 0.36067376f);  // log2(e) / 4
  series = fmaf(m, series, 0.48089835f);  // log2(e) / 3
  series = fmaf(m, series, 0.72134752f);  // log2(e) / 2
  series = fmaf(m, series, 1.44269504f);  // log2(e)
  series *= m;
  const float u = u_above_half ? 1.0f - m : m;  // u in (1/2, 15/16] comes out within 2^-25
  const float minus_log2_u = u_above_half && m < 0.0625f ? series : -fast_log2(u);
  // -log E for E = -log u = minus_log2_u ln 2:  -ln 2 log2(minus_log2_u) - log(ln 2)
  return fmaf(fast_log2(minus_log2_u), -0.69314718f, 0.36651292f);
}

__device__ __forceinline__ double gumbel_fp64(GumbelWords w) {
  return -log(-log(gumbel_uniform(w)));
}

// Philox4x32-10 of one row: counter (pair, row, offset lo, offset hi), key = seed; the same bits
// as philox4x32_10. Only the counter's first word changes along the row, so what the first two
// rounds compute from the other words is done once per row. Pair indices are the row's own; the
// counter takes them shifted by first_pair = column_offset / 2 (a vocabulary shard's place).
struct RowNoise {
  uint32_t k0, k1;      // the key (seed)
  uint32_t first_pair;  // column_offset / 2
  uint32_t round1_c2;   // offset hi ^ k1: round 1's c2 is mulhi(kMul0, pair) ^ this
  uint32_t round2_c0;   // round 2's c0 is mulhi(kMul1, c2) ^ this
  uint32_t round2_c2;   // round 2's c2 is (kMul0 * pair) ^ this
  uint32_t round2_c3;   // round 2's c3

  // (hi, lo) words of the 64-bit product a * b: ptxas fuses the two into one wide multiply
  // (written as a uint64_t product, as in philox4x32_10, it added a register copy after most).
  __device__ static __forceinline__ void mul_wide(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
    hi = __umulhi(a, b);
    lo = a * b;
  }

  __device__ RowNoise(uint32_t row, uint64_t offset, uint64_t seed, uint64_t column_offset)
      : k0(static_cast<uint32_t>(seed)), k1(static_cast<uint32_t>(seed >> 32)),
        first_pair(static_cast<uint32_t>(column_offset >> 1)) {
    using namespace philox_detail;
    const uint32_t offset_lo = static_cast<uint32_t>(offset), offset_hi = static_cast<uint32_t>(offset >> 32);
    // Round 1 (key k0, k1): c0 = mulhi(kMul1, offset lo) ^ row ^ k0, c1 = kMul1 * offset lo.
    uint32_t c0, c1, hi, lo;
    mul_wide(kMul1, offset_lo, c0, c1);
    c0 ^= row ^ k0;
    round1_c2 = offset_hi ^ k1;
    // Round 2 (key + Weyl): c0 = mulhi(kMul1, c2) ^ c1 ^ k0', c2 = mulhi(kMul0, c0) ^ c3 ^ k1',
    // c3 = kMul0 * c0, with round 1's c0, c1 fixed.
    round2_c0 = c1 ^ (k0 + kWeyl0);
    mul_wide(kMul0, c0, hi, lo);
    round2_c2 = hi ^ (k1 + kWeyl1);
    round2_c3 = lo;
  }

  // Outputs 0, 1 are the words of column 2 pair, outputs 2, 3 those of column 2 pair + 1.
  __device__ __forceinline__ Philox4x32 pair(uint32_t pair_index) const {
    using namespace philox_detail;
    // Round 1: c0, c1 are row constants (folded into round2_*); c2 = mulhi ^ .., c3 = kMul0 * pair.
    uint32_t hi0, lo0, hi1, lo1;
    mul_wide(kMul0, pair_index + first_pair, hi0, lo0);
    const uint32_t r1_c2 = hi0 ^ round1_c2;
    // Round 2
    mul_wide(kMul1, r1_c2, hi1, lo1);
    uint32_t c0 = hi1 ^ round2_c0, c1 = lo1, c2 = lo0 ^ round2_c2, c3 = round2_c3;
    uint32_t key0 = k0 + kWeyl0, key1 = k1 + kWeyl1;
#pragma unroll
    for (int round = 2; round < 10; ++round) {
      key0 += kWeyl0;
      key1 += kWeyl1;
      mul_wide(kMul0, c0, hi0, lo0);
      mul_wide(kMul1, c2, hi1, lo1);
      c0 = hi1 ^ c1 ^ key0;
      c1 = lo1;
      c2 = hi0 ^ c3 ^ key1;
      c3 = lo0;
    }
    return {{c0, c1, c2, c3}};
  }

  // The words of one column, as gumbel_words(seed, offset, row, column) gives them.
  __device__ __forceinline__ GumbelWords words(int64_t column) const {
    const Philox4x32 r = pair(static_cast<uint32_t>(column >> 1));
    return (column & 1) ? GumbelWords{r.x[2], r.x[3]} : GumbelWords{r.x[0], r.x[1]};
  }
};

}  // namespace dlmfuse::cuda::sampling
