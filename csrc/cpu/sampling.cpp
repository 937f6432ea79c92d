// CPU sample_tokens dispatcher: top-k / top-p cut (selection without sorting), the per-ISA row
// pass (sampling_rows.cpp), then exact float64 scoring of the near-best candidates and the
// confidence from the pass's softmax statistics.
#include "cpu/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/sampling_exact.h"
#include "cpu/sampling_row.h"
#include "cpu/sampling_rows.h"
#include "cpu/sampling_select.h"
#include "cpu/thread_pool.h"
#include "dlmfuse/errors.h"
#include "dlmfuse/half_convert.h"

namespace dlmfuse::cpu {
namespace {

SampleRowFn row_pass_for(CpuIsa isa, DType dtype) {
  switch (isa) {
#if defined(DLMFUSE_HAVE_ISA_AVX512)
    case CpuIsa::kAvx512: return avx512::sample_row_fn(dtype);
#endif
#if defined(DLMFUSE_HAVE_ISA_AVX2)
    case CpuIsa::kAvx2: return avx2::sample_row_fn(dtype);
#endif
    default: return baseline::sample_row_fn(dtype);
  }
}

// 1 / T' in fp32 as the row pass computes it (T' = T, or 1 when greedy).
float inverse_temperature(const SamplingParams& p) {
  return p.temperature > 0.0 ? static_cast<float>(1.0 / p.temperature) : 1.0f;
}

void eligible_tokens(const SamplingParams& p, const RowReader& reader,
                     std::vector<ScoredToken<float>>& out) {
  out.resize(static_cast<size_t>(p.vocab));
  const float inv_t = inverse_temperature(p);
  ScoredToken<float>* next = out.data();
  reader.with_type([&](auto logits) {
    for (int64_t j = 0; j < p.vocab; ++j) {
      const float l = static_cast<float>(to_double(logits[j]));
      if (!(l > -INFINITY) || (p.suppressed != nullptr && p.suppressed[j])) continue;
      *next++ = {l * inv_t, 0.0};
    }
  });
  out.resize(static_cast<size_t>(next - out.data()));
}

bool is_kept(const SamplingParams& p, const RowReader& reader, int64_t j, float cut) {
  const float l = reader.as_float(j);
  if (!(l > -INFINITY) || (p.suppressed != nullptr && p.suppressed[j])) return false;
  return l * inverse_temperature(p) >= cut;
}

int64_t pick_token(const SamplingParams& p, const RowReader& reader, int64_t row, float cut,
                   const RowPass& pass) {
  int64_t best = -1;
  double best_score = -INFINITY;
  auto consider = [&](int64_t j) {
    const double score = exact_score(p, row, j, reader.as_double(j));
    if (best < 0 || score > best_score || (score == best_score && j < best)) {
      best = j;
      best_score = score;
    }
  };
  if (pass.overflow) {  // too many near-ties for the buffer: score every kept token exactly
    for (int64_t j = 0; j < p.vocab; ++j)
      if (is_kept(p, reader, j, cut)) consider(j);
  } else {
    for (int e = 0; e < pass.n_candidates; ++e) consider(pass.candidates[e]);
  }
  return best;
}

float confidence_of(const SamplingParams& p, const RowReader& reader, int64_t token,
                    const RowPass& pass) {
  const double c = p.dtype == DType::kFloat64
                       ? confidence_score(p, reader.as_double(token))
                       : static_cast<double>(reader.as_float(token) * (p.tempered_confidence ? inverse_temperature(p) : 1.0f));
  switch (p.confidence) {
    case ConfidenceKind::kProb: return static_cast<float>(std::exp(c - pass.c_max) / pass.z);
    case ConfidenceKind::kMargin:
      return static_cast<float>((1.0 - std::exp(pass.c_second - pass.c_max)) / pass.z);
    case ConfidenceKind::kNegEntropy: return static_cast<float>(pass.s / pass.z - std::log(pass.z));
    case ConfidenceKind::kLogit: return static_cast<float>(reader.as_double(token));
  }
  return NAN;
}

// Softmax statistics of the kept tokens recomputed in float64 (float64 logits: the fp32 pass
// rounds logits of large magnitude, which would cost ~1e-4 relative in the confidence).
void exact_stats(const SamplingParams& p, const RowReader& reader, float cut, RowPass& pass) {
  double c_max = -INFINITY, c_second = -INFINITY;
  for (int64_t j = 0; j < p.vocab; ++j) {
    if (!is_kept(p, reader, j, cut)) continue;
    const double c = confidence_score(p, reader.as_double(j));
    if (c > c_max) c_second = c_max, c_max = c;
    else if (c > c_second) c_second = c;
  }
  double z = 0.0, s = 0.0;
  for (int64_t j = 0; j < p.vocab; ++j) {
    if (!is_kept(p, reader, j, cut)) continue;
    const double d = confidence_score(p, reader.as_double(j)) - c_max, e = std::exp(d);
    z += e;
    s += e * d;
  }
  pass.c_max = c_max;
  pass.c_second = c_second;
  pass.z = z;
  pass.s = s;
}

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};

}  // namespace

void sample_tokens(const SamplingParams& p) {
  const SampleRowFn row_pass = row_pass_for(active_cpu_isa(), p.dtype);
  const int workers = num_threads();
  std::unique_ptr<float, AlignedFree> scratch(
      static_cast<float*>(std::aligned_alloc(64, sizeof(float) * kSampleScratchFloats * workers)));
  if (!scratch) throw_runtime_error("sample_tokens: could not allocate scratch");
  std::vector<std::vector<ScoredToken<float>>> selection(workers);
  const bool filtered = p.top_k > 0 || p.top_p < 1.0;
  // 1 / T outside [1e-30, 1e30] makes fp32 scores underflow or lose ties: float64 path.
  const bool extreme_temperature = p.temperature > 0.0 && (p.temperature < 1e-30 || p.temperature > 1e30);

  parallel_for(p.rows, workers, [&](int64_t row, int worker) {
    if (extreme_temperature) {
      sample_row_exact(p, row, p.tokens + row, p.confidence_out + row);
      return;
    }
    const RowReader reader{p, row};
    float cut = -INFINITY;
    if (filtered) {
      eligible_tokens(p, reader, selection[worker]);
      cut = kept_cut(selection[worker], p.top_k, p.top_p);
    }
    RowPass pass;
    row_pass(p, row, cut, scratch.get() + worker * kSampleScratchFloats, &pass);
    if (pass.needs_exact) {
      sample_row_exact(p, row, p.tokens + row, p.confidence_out + row);
      return;
    }
    const int64_t token = pass.kept > 0 ? pick_token(p, reader, row, cut, pass) : -1;
    if (token >= 0 && (p.confidence != ConfidenceKind::kLogit || p.stats != nullptr) && p.dtype == DType::kFloat64)
      exact_stats(p, reader, cut, pass);
    p.tokens[row] = token;
    p.confidence_out[row] = token >= 0 ? confidence_of(p, reader, token, pass) : -INFINITY;
    if (p.stats != nullptr) write_stats(p, row, pass.c_max, pass.z, pass.s, pass.c_second);
  });
}

}  // namespace dlmfuse::cpu
