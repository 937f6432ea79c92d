// sample_tokens: arguments, and the random-number layout shared by every implementation
// (CPU, CUDA, and the PyTorch reference in python/dlmfuse/reference/sampling.py).
//
// Gumbel-max: token = argmax_j  l_j / T + G_j,  G_j = -log(-log u_j), which is LLaDA's
// argmax exp(l) / (-log u)^T. Each u_j is a 52-bit uniform in (0, 1):
//   words (w_hi, w_lo) = Philox4x32-10(key = seed, counter = (j / 2, row, offset_lo, offset_hi)),
//   taking outputs (0, 1) for even j and (2, 3) for odd j;
// j is the column in the whole vocabulary: logits column i has j = i + column_offset, so a
// vocabulary shard draws the noise the unsharded row would (column_offset is even: the shard's
// columns pair up as the whole row's do).
//   a = (w_hi << 20) | (w_lo >> 12)   (52 bits),   u = (2a + 1) / 2^53,
// so u is exact in float64, never 0 or 1, and 1 - u is exact as well.
#pragma once

#include "dlmfuse/config.h"
#include "dlmfuse/dtype.h"
#include "dlmfuse/philox.h"

namespace dlmfuse {

enum class ConfidenceKind : int32_t { kProb = 0, kMargin = 1, kNegEntropy = 2, kLogit = 3 };

// Per-row softmax statistics of the kept tokens' confidence scores c (c = l / T' when
// tempered_confidence, else l), written when SamplingParams::stats is set: enough to merge the
// confidences of vocabulary shards (dlmfuse.distributed).
enum SamplingStat : int { kStatMax = 0, kStatSumExp = 1, kStatSumExpTimesD = 2, kStatSecond = 3, kSamplingStats = 4 };

struct SamplingParams {
  const void* logits = nullptr;  // [rows, vocab], row stride below, column stride 1
  int64_t rows = 0, vocab = 0, row_stride = 0;
  DType dtype = DType::kFloat32;  // float32, bfloat16, float16 or float64
  double temperature = 0.0;       // 0: greedy (double: tiny and huge values stay exact)
  int64_t top_k = 0;              // 0: off
  double top_p = 1.0;             // >= 1: off
  const uint8_t* suppressed = nullptr;  // [vocab], 1 = never emitted; null: none
  uint64_t seed = 0, offset = 0;
  uint64_t column_offset = 0;     // even; Philox column of logits column 0 (a vocabulary shard's first id)
  ConfidenceKind confidence = ConfidenceKind::kProb;
  bool tempered_confidence = false;  // confidence from softmax(l / T) instead of softmax(l)
  int64_t* tokens = nullptr;         // [rows]; -1 where no token can be emitted
  float* confidence_out = nullptr;   // [rows]
  double* stats = nullptr;           // [rows, kSamplingStats] or null: max c, sum exp(c - max),
                                     // sum exp(c - max) (c - max), second-largest c
};

struct GumbelWords {
  uint32_t hi, lo;
};

DLMFUSE_HOST_DEVICE DLMFUSE_INLINE GumbelWords gumbel_words(uint64_t seed, uint64_t offset,
                                                            int64_t row, int64_t column) {
  const Philox4x32 r = philox4x32_10(
      static_cast<uint32_t>(column >> 1), static_cast<uint32_t>(row),
      static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return (column & 1) ? GumbelWords{r.x[2], r.x[3]} : GumbelWords{r.x[0], r.x[1]};
}

// The uniform u = (2a + 1) / 2^53 of the layout above, exact in float64.
DLMFUSE_HOST_DEVICE DLMFUSE_INLINE double gumbel_uniform(GumbelWords w) {
  const uint64_t a = (static_cast<uint64_t>(w.hi) << 20) | (w.lo >> 12);
  return static_cast<double>(2 * a + 1) * 0x1.0p-53;
}

}  // namespace dlmfuse
