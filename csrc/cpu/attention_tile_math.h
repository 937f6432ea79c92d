// The fp32 tile products shared by the CPU attention kernels (forward and backward), compiled
// once per instruction set: include only from files listed in DLMFUSE_CPU_KERNEL_SOURCES.
//
//   qk_tile: S[rows, N] = Q[rows, D] x Kt[D, N]       (scores; also dP = dO V^T)
//   pv_tile: O[rows, D] += P[rows, :cols] x V[:cols, D]  (outputs, dQ; with P^T: dV, dK)
// and the per-row steps between them: the bias row, the visibility rule on a PARTIAL tile.
#pragma once

#include <math.h>

#include "cpu/attention_tiles.h"
#include "cpu/vec.h"
#include "dlmfuse/half_convert.h"
#include "dlmfuse/online_softmax.h"

namespace dlmfuse::cpu::DLMFUSE_CPU_ISA {
namespace {

using vec::vfloat;
using vec::vint;
constexpr int W = vec::kWidth;
constexpr int M = kAttnTileM;
constexpr int N = kAttnTileN;
// Register block of the micro-kernels: kRows rows x kCols vectors of accumulators
// (AVX-512: 4 x 4 zmm = 16 of 32 registers; AVX2/SSE: 4 x 2 = 8 of 16).
constexpr int kRows = kAttnTileRowBlock;
constexpr int kCols = W == 16 ? 4 : 2;
static_assert(N % (kCols * W) == 0 && M % kRows == 0, "tile sizes must fit the register block");

template <typename T>
inline void load_scaled_row(float* dst, const T* src, int n, float factor) {
  for (int d = 0; d < n; ++d) dst[d] = to_float(src[d]) * factor;
}

// S[rows, N] = Q[rows, D] x Kt[D, N]
template <int D>
void qk_tile(const float* q, const float* kt, float* s, int rows) {
  for (int i0 = 0; i0 < rows; i0 += kRows) {
    for (int j0 = 0; j0 < N; j0 += kCols * W) {
      vfloat acc[kRows][kCols] = {};
      for (int d = 0; d < D; ++d) {
        vfloat kv[kCols];
        for (int c = 0; c < kCols; ++c) kv[c] = vec::load(kt + d * N + j0 + c * W);
        for (int r = 0; r < kRows; ++r) {
          const vfloat qb = vec::splat(q[(i0 + r) * D + d]);
          for (int c = 0; c < kCols; ++c) acc[r][c] += qb * kv[c];
        }
      }
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < kCols; ++c) vec::store(s + (i0 + r) * N + j0 + c * W, acc[r][c]);
    }
  }
}

// O[rows, D] += P[rows, :cols] x V[:cols, D]; with kTransposedP, P^T[rows, :cols] x V[:cols, D]
// for P stored [cols, N] (the backward's dV = P^T dO and dK = dS^T q, without a transposed copy).
template <int D, bool kTransposedP = false>
void pv_tile(const float* p, const float* v, float* o, int rows, int cols) {
  constexpr int kPvCols = D / W < kCols ? D / W : kCols;  // narrow tiles (D = 32 on AVX-512)
  static_assert(D % (kPvCols * W) == 0, "tile width must fit the register block");
  for (int i0 = 0; i0 < rows; i0 += kRows) {
    for (int d0 = 0; d0 < D; d0 += kPvCols * W) {
      vfloat acc[kRows][kPvCols];
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < kPvCols; ++c) acc[r][c] = vec::load(o + (i0 + r) * D + d0 + c * W);
      for (int j = 0; j < cols; ++j) {
        vfloat vv[kPvCols];
        for (int c = 0; c < kPvCols; ++c) vv[c] = vec::load(v + j * D + d0 + c * W);
        for (int r = 0; r < kRows; ++r) {
          const vfloat pb = vec::splat(kTransposedP ? p[j * N + i0 + r] : p[(i0 + r) * N + j]);
          for (int c = 0; c < kPvCols; ++c) acc[r][c] += pb * vv[c];
        }
      }
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < kPvCols; ++c) vec::store(o + (i0 + r) * D + d0 + c * W, acc[r][c]);
    }
  }
}

// The keys of one tile: k0 .. k0 + cols - 1, or gathered ones (keys[j]).
struct KeySet {
  const int64_t* keys;  // null: contiguous from k0
  int64_t k0;
  int cols;
  int64_t at(int j) const { return keys != nullptr ? keys[j] : k0 + j; }
};

// bias_row[j] = bias[b, h, i, keys.at(j)] * log2 e for j < cols (any stride, 0 included); rest 0.
template <typename B>
void load_bias_row(float* dst, const B* src, int64_t col_stride, KeySet keys) {
  for (int j = 0; j < keys.cols; ++j) dst[j] = to_float(src[keys.at(j) * col_stride]) * kLog2e;
  for (int j = keys.cols; j < N; ++j) dst[j] = 0.0f;
}

void add_bias_row(const AttentionParams& p, int64_t b, int64_t h, int64_t row, KeySet keys,
                  float* bias_row, float* s_row) {
  const int64_t offset = b * p.bias_strides[0] + h * p.bias_strides[1] + row * p.bias_strides[2];
  const int64_t col_stride = p.bias_strides[3];
  switch (p.bias_dtype) {
    case DType::kFloat32:
      load_bias_row(bias_row, static_cast<const float*>(p.bias) + offset, col_stride, keys);
      break;
    case DType::kBFloat16:
      load_bias_row(bias_row, static_cast<const bf16_t*>(p.bias) + offset, col_stride, keys);
      break;
    case DType::kFloat16:
      load_bias_row(bias_row, static_cast<const fp16_t*>(p.bias) + offset, col_stride, keys);
      break;
  }
  for (int j = 0; j < N; j += W) vec::store(s_row + j, vec::load(s_row + j) + vec::load(bias_row + j));
}

// The keys' labels of a PARTIAL tile ([N] each; k_doc null without documents).
struct KeyLabels {
  const int32_t* order;
  const int32_t* group;
  const int32_t* doc;
};

// Per-element visibility rule on one score row of a PARTIAL tile.
void mask_row_by_labels(float* s_row, KeyLabels keys, int32_t q_order, int32_t q_group, int32_t q_doc) {
  const vint qo = vec::splat_int(q_order), qg = vec::splat_int(q_group), qd = vec::splat_int(q_doc);
  const vfloat neg_inf = vec::splat(-INFINITY);
  for (int j = 0; j < N; j += W) {
    vint visible = (vec::load(keys.order + j) < qo) | (vec::load(keys.group + j) == qg);
    if (keys.doc != nullptr) visible = visible & (vec::load(keys.doc + j) == qd);
    vec::store(s_row + j, visible ? vec::load(s_row + j) : neg_inf);
  }
}

}  // namespace
}  // namespace dlmfuse::cpu::DLMFUSE_CPU_ISA
