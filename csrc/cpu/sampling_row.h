// Reading one row of logits in the CPU sampler's baseline-compiled code (sampling.cpp,
// sampling_exact.cpp): the dtype switch once, and the float64 formulas of the contract.
#pragma once

#include <cmath>

#include "dlmfuse/half_convert.h"
#include "dlmfuse/sampling_params.h"

namespace dlmfuse::cpu {

// T' of the float64 formulas: T, or 1 when greedy.
inline double tempered_divisor(const SamplingParams& p) { return p.temperature > 0.0 ? p.temperature : 1.0; }

// The confidence score c of a logit l in float64: l / T' when tempered_confidence, else l.
inline double confidence_score(const SamplingParams& p, double l) {
  return p.tempered_confidence ? l / tempered_divisor(p) : l;
}

// The score the float64 reference ranks tokens by: l / T + Gumbel noise of (row, column) when
// sampling, l itself when greedy (column: of the logits row; the noise is the vocabulary's).
inline double exact_score(const SamplingParams& p, int64_t row, int64_t column, double l) {
  if (p.temperature <= 0.0) return l;
  const int64_t vocabulary_column = column + static_cast<int64_t>(p.column_offset);
  const double u = gumbel_uniform(gumbel_words(p.seed, p.offset, row, vocabulary_column));
  return l / p.temperature - std::log(-std::log(u));
}

// The row's softmax statistics into p.stats (when set), in SamplingStat order.
inline void write_stats(const SamplingParams& p, int64_t row, double c_max, double z, double s, double c_second) {
  double* out = p.stats + row * kSamplingStats;
  out[kStatMax] = c_max;
  out[kStatSumExp] = z;
  out[kStatSumExpTimesD] = s;
  out[kStatSecond] = c_second;
}

// One row of logits, read as float (what the fp32 pass sees) or as double (exact scoring).
struct RowReader {
  const SamplingParams& p;
  int64_t row;

  // Calls f with a typed pointer to the row.
  template <typename F>
  decltype(auto) with_type(F&& f) const {
    const char* base = static_cast<const char*>(p.logits);
    switch (p.dtype) {
      case DType::kFloat32: return f(reinterpret_cast<const float*>(base) + row * p.row_stride);
      case DType::kBFloat16: return f(reinterpret_cast<const bf16_t*>(base) + row * p.row_stride);
      case DType::kFloat16: return f(reinterpret_cast<const fp16_t*>(base) + row * p.row_stride);
      case DType::kFloat64: break;
    }
    return f(reinterpret_cast<const double*>(base) + row * p.row_stride);
  }
  // Calls f(j, l) with every logit of the row as double.
  template <typename F>
  void for_each(F&& f) const {
    with_type([&](auto ptr) {
      for (int64_t j = 0; j < p.vocab; ++j) f(j, to_double(ptr[j]));
    });
  }
  float as_float(int64_t j) const {
    return with_type([j](auto ptr) { return static_cast<float>(to_double(ptr[j])); });
  }
  double as_double(int64_t j) const {
    return with_type([j](auto ptr) { return to_double(ptr[j]); });
  }
};

}  // namespace dlmfuse::cpu
