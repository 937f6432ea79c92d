// CPU sample_tokens: the per-row pass, compiled once per instruction set (sampling_rows.cpp),
// and what it hands back to the dispatcher (sampling.cpp).
#pragma once

#include <math.h>

#include "dlmfuse/sampling_params.h"

namespace dlmfuse::cpu {

constexpr int kSampleBlock = 128;        // columns per inner block (even: Philox pairs)
constexpr int kSampleCandidates = 64;    // capacity of the near-best candidate buffer

// Result of one pass over a row's kept tokens (not suppressed, finite or +inf logit, and
// w = l / T' >= cut where T' = T, or 1 when greedy).
struct RowPass {
  // Softmax statistics of the confidence scores c (c = w if tempered_confidence else l):
  double c_max = -INFINITY;  // max c
  double z = 0.0;            // sum exp(c - c_max)
  double s = 0.0;            // sum exp(c - c_max) * (c - c_max)
  double c_second = -INFINITY;  // second-largest c (margin confidence)
  int64_t kept = 0;
  // Tokens whose approximate fp32 score is within the error margin of the approximate best;
  // the exact (float64) winner is always among them unless `overflow`.
  int64_t candidates[kSampleCandidates];
  float candidate_scores[kSampleCandidates];
  int32_t n_candidates = 0;
  bool overflow = false;
  // Some finite logit left fp32's range (as l, l / T or the confidence score): the dispatcher
  // redoes the row in float64.
  bool needs_exact = false;
};

// Scores of the approximate pass: score = w + G (Gumbel) or w (greedy), fp32.
// Margin that covers twice the worst fp32 error of a score of magnitude |score|.
inline float sampling_score_margin(float best) {
  return 5e-5f + 1e-6f * (best < 0 ? -best : best);
}

using SampleRowFn = void (*)(const SamplingParams& p, int64_t row, float cut, float* scratch,
                             RowPass* out);

// fp32 scratch the pass needs (64-byte aligned).
constexpr int kSampleScratchFloats = 8 * kSampleBlock;

#define DLMFUSE_DECLARE_SAMPLING_ISA(isa) \
  namespace isa {                         \
  SampleRowFn sample_row_fn(DType dtype); \
  }
DLMFUSE_DECLARE_SAMPLING_ISA(baseline)
DLMFUSE_DECLARE_SAMPLING_ISA(avx2)
DLMFUSE_DECLARE_SAMPLING_ISA(avx512)
#undef DLMFUSE_DECLARE_SAMPLING_ISA

}  // namespace dlmfuse::cpu
