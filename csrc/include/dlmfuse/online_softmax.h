// Online softmax in base 2 and the exact merge of partial attentions, shared by every kernel.
//
// Scores are kept in log2 units (natural score * log2 e) so that exp2 can be used everywhere.
// A row that has seen no visible key has running max -inf and running sum 0; the helpers below
// never form (-inf) - (-inf), so such rows finish as output 0 and lse -inf, never NaN.
#pragma once

#include <math.h>

#include "dlmfuse/config.h"

namespace dlmfuse {

// Offset subtracted from scores before exp2: the running max, or 0 while the row is still empty
// (then every score is -inf too and exp2(-inf - 0) = 0).
DLMFUSE_HOST_DEVICE DLMFUSE_INLINE float softmax_offset(float running_max) {
  return running_max == -INFINITY ? 0.0f : running_max;
}

// Factor that rescales the accumulators when the running max moves from m_old to m_new.
// An empty row has nothing accumulated, so its factor is irrelevant; 1 avoids exp2(NaN).
DLMFUSE_HOST_DEVICE DLMFUSE_INLINE float softmax_rescale(float m_old, float m_new) {
  return m_old == -INFINITY ? 1.0f : exp2f(m_old - m_new);
}

// Final normaliser: 1 / l, or 0 for an empty row (output 0).
DLMFUSE_HOST_DEVICE DLMFUSE_INLINE float softmax_inv_sum(float sum) {
  return sum > 0.0f ? 1.0f / sum : 0.0f;
}

// A row's state that went wrong: an infinite or NaN running max, or a NaN sum (its scores
// overflowed float32, or met a NaN). The kernels redo such rows in float64
// (cpu/attention_exact.cpp, cuda/attention/exact_row.cuh).
DLMFUSE_HOST_DEVICE DLMFUSE_INLINE bool softmax_broke(float running_max, float sum) {
  return !(running_max < INFINITY) || sum != sum;
}

// Natural-log log-sum-exp of a row from its base-2 running max and sum; -inf for an empty row.
DLMFUSE_HOST_DEVICE DLMFUSE_INLINE float softmax_lse(float running_max_log2, float sum) {
  return sum > 0.0f ? (running_max_log2 + log2f(sum)) * kLn2 : -INFINITY;
}

// Weights of the exact merge of two partial attentions over disjoint key sets:
//   lse = log(exp(lse_a) + exp(lse_b)),  out = w_a * out_a + w_b * out_b,
//   w_a = exp(lse_a - lse), w_b = exp(lse_b - lse).
// Both empty: lse -inf and both weights 0 (output 0). A NaN lse: NaN weights (a NaN row). An lse
// of +inf (scores beyond float32, see cpu/attention_exact.cpp): that side outweighs any finite one
// (weight 1, lse +inf); two such sides weigh 1/2 each, as their true lse cannot be told apart.
struct MergeWeights {
  float weight_a;
  float weight_b;
  float lse;
};

DLMFUSE_HOST_DEVICE DLMFUSE_INLINE MergeWeights merge_weights(float lse_a, float lse_b) {
  if (lse_a != lse_a || lse_b != lse_b) return {NAN, NAN, NAN};
  const float m = lse_a > lse_b ? lse_a : lse_b;
  if (m == -INFINITY) return {0.0f, 0.0f, -INFINITY};
  if (m == INFINITY) {
    const float a = lse_a == INFINITY ? 1.0f : 0.0f, b = lse_b == INFINITY ? 1.0f : 0.0f;
    return {a / (a + b), b / (a + b), INFINITY};
  }
  const float ea = expf(lse_a - m);
  const float eb = expf(lse_b - m);
  const float sum = ea + eb;
  return {ea / sum, eb / sum, m + logf(sum)};
}

}  // namespace dlmfuse
