// bf16 / fp16 <-> fp32 conversion by bit manipulation, identical on host and device.
// Rounding to 16 bits is round-to-nearest-even, as in PyTorch; NaN stays NaN, overflow gives inf.
#pragma once

#include <string.h>

#include "dlmfuse/config.h"

namespace dlmfuse {

// Storage types: a 16-bit payload with a distinct C++ type per format, so templates can dispatch.
struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

DLMFUSE_HOST_DEVICE DLMFUSE_INLINE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

DLMFUSE_HOST_DEVICE DLMFUSE_INLINE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

DLMFUSE_HOST_DEVICE DLMFUSE_INLINE float to_float(bf16_t x) {
  return bits_float(static_cast<uint32_t>(x.bits) << 16);
}

DLMFUSE_HOST_DEVICE DLMFUSE_INLINE bf16_t to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>((u + rounding) >> 16)};
}

DLMFUSE_HOST_DEVICE DLMFUSE_INLINE float to_float(fp16_t x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu;
  const uint32_t mantissa = x.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  if (exponent != 0) return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24 is exact in fp32.
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}

DLMFUSE_HOST_DEVICE DLMFUSE_INLINE fp16_t to_fp16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs_bits = u & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (abs_bits >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (abs_bits < 0x38800000u) {
    // Result is subnormal (or zero) in fp16: round abs * 2^24 to the nearest even integer.
    // Adding 0.5 (as 2^-1 in units of 2^-24) via the classic magic-number trick keeps RNE exact.
    const float magnitude = bits_float(abs_bits) + 0.5f;  // 0.5 = 2^-1: lsb of result is 2^-24
    return {static_cast<uint16_t>(sign | (float_bits(magnitude) - 0x3f000000u))};
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to even.
  const uint32_t rounding = 0xfffu + ((abs_bits >> 13) & 1u);
  return {static_cast<uint16_t>(sign | ((abs_bits - 0x38000000u + rounding) >> 13))};
}

DLMFUSE_HOST_DEVICE DLMFUSE_INLINE float to_float(float x) { return x; }
DLMFUSE_HOST_DEVICE DLMFUSE_INLINE double to_double(double x) { return x; }
DLMFUSE_HOST_DEVICE DLMFUSE_INLINE double to_double(float x) { return x; }
DLMFUSE_HOST_DEVICE DLMFUSE_INLINE double to_double(bf16_t x) { return to_float(x); }
DLMFUSE_HOST_DEVICE DLMFUSE_INLINE double to_double(fp16_t x) { return to_float(x); }

// Convert an fp32 value to the storage type T (float, bf16_t or fp16_t).
template <typename T>
DLMFUSE_HOST_DEVICE DLMFUSE_INLINE T from_float(float f);
template <>
DLMFUSE_HOST_DEVICE DLMFUSE_INLINE float from_float<float>(float f) { return f; }
template <>
DLMFUSE_HOST_DEVICE DLMFUSE_INLINE bf16_t from_float<bf16_t>(float f) { return to_bf16(f); }
template <>
DLMFUSE_HOST_DEVICE DLMFUSE_INLINE fp16_t from_float<fp16_t>(float f) { return to_fp16(f); }

}  // namespace dlmfuse
