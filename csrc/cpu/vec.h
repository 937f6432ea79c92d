// Fixed-width fp32 vectors (GCC/Clang vector extensions) for the CPU tile kernels.
// The width follows the instruction set the including file is compiled for, so the same source
// becomes SSE, AVX2 or AVX-512 code. Include only from files compiled once per ISA.
#pragma once

#include <cstdint>
#include <cstring>

#ifndef DLMFUSE_CPU_ISA
#error "vec.h is for files compiled once per ISA (-DDLMFUSE_CPU_ISA=...)"
#endif

// Inside the ISA namespace so that no symbol is shared between differently compiled copies.
namespace dlmfuse::cpu::DLMFUSE_CPU_ISA::vec {

#if defined(__AVX512F__)
constexpr int kWidth = 16;
#elif defined(__AVX__)
constexpr int kWidth = 8;
#else
constexpr int kWidth = 4;
#endif

typedef float vfloat __attribute__((vector_size(kWidth * 4)));
typedef int32_t vint __attribute__((vector_size(kWidth * 4)));
typedef uint32_t vuint __attribute__((vector_size(kWidth * 4)));
typedef uint64_t vulong __attribute__((vector_size(kWidth * 8)));  // kWidth lanes of 64 bits

inline __attribute__((always_inline)) vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline __attribute__((always_inline)) vint load(const int32_t* p) {
  vint v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline __attribute__((always_inline)) void store(float* p, vfloat v) {
  std::memcpy(p, &v, sizeof(v));
}
inline __attribute__((always_inline)) vfloat splat(float x) { return vfloat{} + x; }
inline __attribute__((always_inline)) vint splat_int(int32_t x) { return vint{} + x; }

// Local stand-ins for std::fill / std::min / std::max: a std template instantiated here would be
// compiled for this ISA and could be merged by the linker with another ISA's copy.
inline __attribute__((always_inline)) void fill(float* first, float* last, float value) {
  for (; first != last; ++first) *first = value;
}
inline __attribute__((always_inline)) void fill(int32_t* first, int32_t* last, int32_t value) {
  for (; first != last; ++first) *first = value;
}
inline __attribute__((always_inline)) int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
inline __attribute__((always_inline)) int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

inline __attribute__((always_inline)) float reduce_max(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kWidth; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline __attribute__((always_inline)) float reduce_sum(vfloat v) {
  float s = 0.0f;
  for (int i = 0; i < kWidth; ++i) s += v[i];
  return s;
}

// 2^x for x <= 0 with ~2 ulp relative error; exactly 0 for x < -126 and for x = -inf
// (masked scores), NaN for NaN. Range reduction x = n + f, f in [-0.5, 0.5], then a degree-7
// Taylor polynomial of 2^f (truncation error < 6e-9) and the exponent n placed in the bits.
inline __attribute__((always_inline)) vfloat exp2(vfloat x) {
  const vfloat lowest = splat(-126.0f);
  const vfloat clamped = x < lowest ? lowest : x;
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer in fp32.
  const vfloat round_magic = splat(12582912.0f);
  const vfloat n = (clamped + round_magic) - round_magic;
  const vfloat f = clamped - n;
  vfloat poly = splat(1.525273380405984e-05f);
  poly = poly * f + 1.5403530393381606e-04f;
  poly = poly * f + 1.3333558146428443e-03f;
  poly = poly * f + 9.6181291076284772e-03f;
  poly = poly * f + 5.5504108664821580e-02f;
  poly = poly * f + 2.4022650695910071e-01f;
  poly = poly * f + 6.9314718055994531e-01f;
  poly = poly * f + 1.0f;
  const vint exponent_bits = (__builtin_convertvector(n, vint) + 127) << 23;
  const vfloat result = poly * reinterpret_cast<const vfloat&>(exponent_bits);
  return x < lowest ? vfloat{} : result;
}

// Natural logarithm without divisions, ~1.3e-7 relative error, for positive normal inputs
// (not 0, inf, NaN or subnormals). x = 2^e (1 + f) with 1 + f in [sqrt(1/2), sqrt(2)), and
// log(1 + f) = f - f^2/2 + f^3 P(f) with P a degree-7 least-squares fit made for dlmfuse.
inline __attribute__((always_inline)) void log_reduce(vfloat x, vint& exponent, vfloat& f) {
  const vint bits = reinterpret_cast<const vint&>(x);
  exponent = ((bits >> 23) & 0xff) - 127;
  const vint mantissa_bits = (bits & 0x7fffff) | 0x3f800000;
  vfloat m = reinterpret_cast<const vfloat&>(mantissa_bits);  // [1, 2)
  const vint above = m > splat(1.41421356f);
  m = above ? m * 0.5f : m;
  exponent -= above;  // `above` is -1 where true
  f = m - 1.0f;
}

inline __attribute__((always_inline)) vfloat log_reduced(vint exponent, vfloat f) {
  vfloat poly = splat(-0.07619927078485489f);
  poly = poly * f + 0.12745225429534912f;
  poly = poly * f - 0.13158299028873444f;
  poly = poly * f + 0.1420431286096573f;
  poly = poly * f - 0.1662384420633316f;
  poly = poly * f + 0.20001105964183807f;
  poly = poly * f - 0.2500080168247223f;
  poly = poly * f + 0.3333333432674408f;
  const vfloat f2 = f * f;
  return __builtin_convertvector(exponent, vfloat) * 0.6931471805599453f + (f - 0.5f * f2 + f2 * f * poly);
}

inline __attribute__((always_inline)) vfloat log(vfloat x) {
  vint exponent;
  vfloat f;
  log_reduce(x, exponent, f);
  return log_reduced(exponent, f);
}

}  // namespace dlmfuse::cpu::DLMFUSE_CPU_ISA::vec
