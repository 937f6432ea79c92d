// The float64 path of the CPU sampler: one row computed entirely in float64, exactly as the
// contract (and python/dlmfuse/reference/sampling.py) defines it. Used for rows the fp32 pass
// cannot represent (finite logits whose l, l / T or confidence score overflow fp32).
#include <cmath>
#include <vector>

#include "cpu/sampling_exact.h"
#include "cpu/sampling_row.h"
#include "cpu/sampling_select.h"

namespace dlmfuse::cpu {

void sample_row_exact(const SamplingParams& p, int64_t row, int64_t* token, float* confidence) {
  const double divisor = tempered_divisor(p);  // T'
  const RowReader reader{p, row};
  auto eligible = [&](int64_t j, double l) {
    return l > -INFINITY && !(p.suppressed != nullptr && p.suppressed[j]);  // NaN fails
  };

  // Where the largest kept l / T overflows float64 (either sign) (T tiny, or |l| near the float64 limit), scores
  // and confidences use l - l_max instead of l: the same ranks and probabilities, with no inf - inf.
  double l_max = -INFINITY;
  reader.for_each([&](int64_t j, double l) {
    if (eligible(j, l) && l > l_max) l_max = l;
  });
  const bool finite_max = std::isfinite(l_max);
  // A kept +inf logit wins over every finite one, even one whose l / T overflows to +inf too.
  const bool infinite_row = l_max == INFINITY;
  const double score_shift = finite_max && p.temperature > 0.0 && std::isinf(l_max / p.temperature) ? l_max : 0.0;
  const double confidence_shift = finite_max && p.tempered_confidence && std::isinf(l_max / divisor) ? l_max : 0.0;

  double cut = -INFINITY;
  if (p.top_k > 0 || p.top_p < 1.0) {
    std::vector<ScoredToken<double>> tokens;
    reader.for_each([&](int64_t j, double l) {
      if (eligible(j, l)) tokens.push_back({l / divisor, 0.0});
    });
    cut = kept_cut(tokens, p.top_k, p.top_p);
  }

  // Confidence statistics over the kept tokens, and the winner.
  double c_max = -INFINITY, c_second = -INFINITY, best = -INFINITY;
  int64_t best_index = -1;
  reader.for_each([&](int64_t j, double l) {
    if (!eligible(j, l) || !(l / divisor >= cut)) return;
    const double c = confidence_score(p, l - confidence_shift);
    if (c > c_max) c_second = c_max, c_max = c;
    else if (c > c_second) c_second = c;
    if (infinite_row && l != INFINITY) return;
    const double score = exact_score(p, row, j, l - score_shift);
    if (best_index < 0 || score > best) best = score, best_index = j;
  });
  *token = best_index;
  if (best_index < 0) {
    *confidence = -INFINITY;
    if (p.stats != nullptr) write_stats(p, row, -INFINITY, 0.0, 0.0, -INFINITY);
    return;
  }
  double z = 0.0, s = 0.0, chosen_c = 0.0, chosen_l = 0.0;
  reader.for_each([&](int64_t j, double l) {
    if (!eligible(j, l) || !(l / divisor >= cut)) return;
    const double c = confidence_score(p, l - confidence_shift);
    const double d = c - c_max, e = std::exp(d);
    z += e;
    if (e > 0.0) s += e * d;  // p log p -> 0 as p -> 0 (d may be -inf)
    if (j == best_index) chosen_c = c, chosen_l = l;
  });
  if (p.stats != nullptr) write_stats(p, row, c_max, z, s, c_second);
  switch (p.confidence) {
    case ConfidenceKind::kProb: *confidence = static_cast<float>(std::exp(chosen_c - c_max) / z); break;
    case ConfidenceKind::kMargin: *confidence = static_cast<float>((1.0 - std::exp(c_second - c_max)) / z); break;
    case ConfidenceKind::kNegEntropy: *confidence = static_cast<float>(s / z - std::log(z)); break;
    case ConfidenceKind::kLogit: *confidence = static_cast<float>(chosen_l); break;
  }
}

}  // namespace dlmfuse::cpu
