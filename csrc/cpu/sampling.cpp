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
#include "cpu/sampling_rows.h"
#include "cpu/thread_pool.h"
#include "dlmfuse/dispatch.h"
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

// Reads a row as float (what the fp32 pass sees) and as double (what exact scoring uses).
struct RowReader {
  const SamplingParams& p;
  int64_t row;

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
  float as_float(int64_t j) const {
    return with_type([j](auto ptr) { return static_cast<float>(to_double(ptr[j])); });
  }
  double as_double(int64_t j) const {
    return with_type([j](auto ptr) { return to_double(ptr[j]); });
  }
};

float inverse_temperature(const SamplingParams& p) {
  return p.temperature > 0.0f ? 1.0f / p.temperature : 1.0f;
}

// (w, exp(w - w_max)) of a token that may be kept; w = l / T' exactly as the row pass computes it.
struct ScoredToken {
  float w;
  float weight;
};

void eligible_tokens(const SamplingParams& p, const RowReader& reader, std::vector<ScoredToken>& out) {
  out.resize(static_cast<size_t>(p.vocab));
  const float inv_t = inverse_temperature(p);
  ScoredToken* next = out.data();
  reader.with_type([&](auto logits) {
    for (int64_t j = 0; j < p.vocab; ++j) {
      const float l = static_cast<float>(to_double(logits[j]));
      if (!(l > -INFINITY) || (p.suppressed != nullptr && p.suppressed[j])) continue;
      *next++ = {l * inv_t, 0.0f};
    }
  });
  out.resize(static_cast<size_t>(next - out.data()));
}

// Largest value t such that the tokens with w >= t carry at least top_p of softmax(w):
// a quickselect on probability mass (average O(V); the tokens are reordered in place).
float top_p_cut(std::vector<ScoredToken>& tokens, double top_p) {
  float w_max = -INFINITY;
  for (const ScoredToken& t : tokens) w_max = std::max(w_max, t.w);
  double total = 0.0;
  for (ScoredToken& t : tokens) total += t.weight = std::exp(t.w - w_max);
  const double target = top_p * total;
  double above = 0.0;  // mass of the tokens already known to be above the current range
  auto first = tokens.begin(), last = tokens.end();
  while (first != last) {
    const float pivot = (first + (last - first) / 2)->w;
    // Three-way partition of [first, last): > pivot | == pivot | < pivot.
    auto greater_end = std::partition(first, last, [pivot](const ScoredToken& t) { return t.w > pivot; });
    auto equal_end = std::partition(greater_end, last, [pivot](const ScoredToken& t) { return t.w == pivot; });
    double greater_mass = 0.0, equal_mass = 0.0;
    for (auto it = first; it != greater_end; ++it) greater_mass += it->weight;
    for (auto it = greater_end; it != equal_end; ++it) equal_mass += it->weight;
    if (greater_end != first && above + greater_mass >= target) {
      last = greater_end;  // the cut lies among the larger values
    } else if (above + greater_mass + equal_mass >= target) {
      return pivot;
    } else {
      above += greater_mass + equal_mass;
      first = equal_end;
    }
  }
  return -INFINITY;  // rounding left the target unreached: keep everything
}

float kept_cut(const SamplingParams& p, const RowReader& reader, std::vector<ScoredToken>& tokens) {
  eligible_tokens(p, reader, tokens);
  if (tokens.empty()) return -INFINITY;
  float cut = -INFINITY;
  if (p.top_p < 1.0) cut = top_p_cut(tokens, p.top_p);
  if (p.top_k > 0 && p.top_k < static_cast<int64_t>(tokens.size())) {
    auto kth = tokens.begin() + (p.top_k - 1);
    std::nth_element(tokens.begin(), kth, tokens.end(),
                     [](const ScoredToken& a, const ScoredToken& b) { return a.w > b.w; });
    cut = std::max(cut, kth->w);
  }
  return cut;
}

// The exact score the float64 reference ranks by.
double exact_score(const SamplingParams& p, const RowReader& reader, int64_t row, int64_t j) {
  const double l = reader.as_double(j);
  if (p.temperature <= 0.0f) return l;
  const double u = gumbel_uniform(gumbel_words(p.seed, p.offset, row, j));
  return l / static_cast<double>(p.temperature) - std::log(-std::log(u));
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
    const double score = exact_score(p, reader, row, j);
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
  const float l = reader.as_float(token);
  const float c = p.tempered_confidence ? l * inverse_temperature(p) : l;
  switch (p.confidence) {
    case ConfidenceKind::kProb: return static_cast<float>(std::exp(c - pass.c_max) / pass.z);
    case ConfidenceKind::kMargin:
      return static_cast<float>((1.0 - std::exp(pass.c_second - pass.c_max)) / pass.z);
    case ConfidenceKind::kNegEntropy: return static_cast<float>(pass.s / pass.z - std::log(pass.z));
    case ConfidenceKind::kLogit: return static_cast<float>(reader.as_double(token));
  }
  return NAN;
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
  std::vector<std::vector<ScoredToken>> selection(workers);
  const bool filtered = p.top_k > 0 || p.top_p < 1.0;

  parallel_for(p.rows, [&](int64_t row, int worker) {
    const RowReader reader{p, row};
    const float cut = filtered ? kept_cut(p, reader, selection[worker]) : -INFINITY;
    RowPass pass;
    row_pass(p, row, cut, scratch.get() + worker * kSampleScratchFloats, &pass);
    const int64_t token = pass.kept > 0 ? pick_token(p, reader, row, cut, pass) : -1;
    p.tokens[row] = token;
    p.confidence_out[row] = token >= 0 ? confidence_of(p, reader, token, pass) : -INFINITY;
  });

  for (int64_t row = 0; row < p.rows; ++row)
    if (p.tokens[row] < 0)
      throw_value_error("sample_tokens: row ", row,
                        " has no token that can be emitted (every logit is suppressed, -inf or NaN)");
}

}  // namespace dlmfuse::cpu
