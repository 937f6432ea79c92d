// One attention row in float64, the way dlmfuse.reference computes it: the fallback for rows that
// float32 cannot represent. When q.k overflows float32 (|score| > 3.4e38), the online softmax sees
// an infinite running max (inf - inf = NaN) or a NaN sum; in float64 the same scores are finite,
// so the row has a finite output (its lse may still overflow to +inf when stored as float32).
#include <cmath>
#include <vector>

#include "cpu/attention_tiles.h"
#include "dlmfuse/dispatch.h"
#include "dlmfuse/visibility.h"

namespace dlmfuse::cpu {
namespace {

double bias_at(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  const int64_t at = b * p.bias_strides[0] + h * p.bias_strides[1] + i * p.bias_strides[2] + j * p.bias_strides[3];
  switch (p.bias_dtype) {
    case DType::kBFloat16: return to_float(static_cast<const bf16_t*>(p.bias)[at]);
    case DType::kFloat16: return to_float(static_cast<const fp16_t*>(p.bias)[at]);
    default: return static_cast<const float*>(p.bias)[at];
  }
}

template <typename T>
void row_exact(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
  const int64_t kv_head = h / (p.q_heads / p.kv_heads);
  int64_t k_len = p.k_len;
  if (p.kv_lens != nullptr) k_len = std::max<int64_t>(0, std::min<int64_t>(p.kv_lens[b], p.k_len));
  const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + i * p.q_strides[1] + h * p.q_strides[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + kv_head * p.k_strides[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides[0] + kv_head * p.v_strides[2];

  std::vector<double> score(static_cast<size_t>(k_len), -INFINITY);
  double row_max = -INFINITY;
  for (int64_t j = 0; j < k_len; ++j) {
    if (p.has_labels && !is_visible(p.q_order.at(b, i), p.q_group.at(b, i), p.k_order.at(b, j), p.k_group.at(b, j)))
      continue;
    if (p.has_docs && p.q_doc.at(b, i) != p.k_doc.at(b, j)) continue;
    double dot = 0.0;
    for (int64_t d = 0; d < p.head_dim; ++d)
      dot += static_cast<double>(to_float(q[d])) * to_float(k[j * p.k_strides[1] + d]);
    score[j] = dot * p.scale + (p.bias != nullptr ? bias_at(p, b, h, i, j) : 0.0);
    row_max = std::fmax(row_max, score[j]);  // NaN scores do not take the max (they propagate below)
  }
  const double shift = row_max == -INFINITY ? 0.0 : row_max;
  std::vector<double> acc(static_cast<size_t>(p.head_dim), 0.0);
  double sum = 0.0;
  for (int64_t j = 0; j < k_len; ++j) {
    const double w = std::exp(score[j] - shift);
    if (w == 0.0) continue;  // hidden keys and underflow: weight exactly 0 (their V may be anything finite)
    sum += w;
    for (int64_t d = 0; d < p.head_dim; ++d) acc[d] += w * to_float(v[j * p.v_strides[1] + d]);
  }
  T* out = static_cast<T*>(p.out) + b * p.out_strides[0] + i * p.out_strides[1] + h * p.out_strides[2];
  const bool empty = !(sum > 0.0) && !std::isnan(sum);
  for (int64_t d = 0; d < p.head_dim; ++d) out[d] = from_float<T>(empty ? 0.0f : static_cast<float>(acc[d] / sum));
  p.lse[(b * p.q_heads + h) * p.q_len + i] = empty ? -INFINITY : static_cast<float>(shift + std::log(sum));
}

}  // namespace

bool row_has_finite_bias(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t k_len) {
  for (int64_t j = 0; j < k_len; ++j)
    if (std::isfinite(bias_at(p, b, h, i, j))) return true;
  return false;
}

void attention_row_exact(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
  dispatch_dtype(p.dtype, "attention", [&](auto tag) { row_exact<typename decltype(tag)::type>(p, b, h, i); });
}

}  // namespace dlmfuse::cpu
