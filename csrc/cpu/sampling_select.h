// top-k / top-p cuts by selection (never a full sort of V), shared by the fp32 fast path and the
// float64 exact path of the CPU sampler. Only included by baseline-compiled files.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

namespace dlmfuse::cpu {

// A token that may be kept: its score w = l / T' and, for top-p, exp(w - max w).
template <typename Value>
struct ScoredToken {
  Value w;
  double weight;
};

// Largest value t such that the tokens with w >= t carry at least top_p of softmax(w):
// a quickselect on probability mass (average O(V); the tokens are reordered in place).
template <typename Value>
Value top_p_cut(std::vector<ScoredToken<Value>>& tokens, double top_p) {
  Value w_max = -INFINITY;
  for (const auto& t : tokens) w_max = std::max(w_max, t.w);
  double total = 0.0;
  for (auto& t : tokens) total += t.weight = std::exp(static_cast<double>(t.w) - static_cast<double>(w_max));
  const double target = top_p * total;
  double above = 0.0;  // mass of the tokens already known to be above the current range
  auto first = tokens.begin(), last = tokens.end();
  while (first != last) {
    const Value pivot = (first + (last - first) / 2)->w;
    // Three-way partition of [first, last): > pivot | == pivot | < pivot.
    auto greater_end = std::partition(first, last, [pivot](const auto& t) { return t.w > pivot; });
    auto equal_end = std::partition(greater_end, last, [pivot](const auto& t) { return t.w == pivot; });
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

// The cut of top_p (< 1: on) and top_k (> 0: on): tokens with w >= cut are kept; -inf keeps all.
template <typename Value>
Value kept_cut(std::vector<ScoredToken<Value>>& tokens, int64_t top_k, double top_p) {
  if (tokens.empty()) return -INFINITY;
  Value cut = -INFINITY;
  if (top_p < 1.0) cut = top_p_cut(tokens, top_p);
  if (top_k > 0 && top_k < static_cast<int64_t>(tokens.size())) {
    auto kth = tokens.begin() + (top_k - 1);
    std::nth_element(tokens.begin(), kth, tokens.end(), [](const auto& a, const auto& b) { return a.w > b.w; });
    cut = std::max(cut, kth->w);
  }
  return cut;
}

}  // namespace dlmfuse::cpu
