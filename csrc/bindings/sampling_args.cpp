#include "bindings/sampling_args.h"

#include <cmath>

#include "dlmfuse/errors.h"

namespace dlmfuse::bindings {
namespace {

constexpr const char* kOp = "sample_tokens";

DType logits_dtype(const Array& a) {
  const auto dt = a.dtype();
  if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && dt.bits == 64 && dt.lanes == 1)
    return DType::kFloat64;
  return float_dtype(kOp, "logits", a);
}

}  // namespace

SamplingParams sampling_params(const Array& logits, double temperature, int64_t top_k, double top_p,
                               const std::optional<Array>& suppressed, uint64_t seed, uint64_t offset,
                               uint64_t column_offset, int confidence_kind, bool tempered_confidence,
                               const Array& tokens, const Array& confidence, const std::optional<Array>& stats,
                               int32_t device_type) {
  SamplingParams p;
  expect_device(kOp, "logits", logits, device_type);
  expect_ndim(kOp, "logits", logits, 2, "[rows, V]");
  expect_last_dim_contiguous(kOp, "logits", logits);
  p.dtype = logits_dtype(logits);
  p.rows = logits.shape(0);
  p.vocab = logits.shape(1);
  p.row_stride = logits.stride(0);
  if (p.vocab < 1) throw_value_error(kOp, ": logits must have at least one column, got shape ", shape_string(logits));
  if (!(temperature >= 0.0) || !std::isfinite(temperature))
    throw_value_error(kOp, ": temperature must be finite and >= 0, got ", temperature);
  if (top_k < 0) throw_value_error(kOp, ": top_k must be >= 0 (0 = off), got ", top_k);
  if (!(top_p > 0.0)) throw_value_error(kOp, ": top_p must be in (0, 1], got ", top_p);
  if (confidence_kind < 0 || confidence_kind > static_cast<int>(ConfidenceKind::kLogit))
    throw_value_error(kOp, ": confidence kind code ", confidence_kind, " unknown");
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.seed = seed;
  p.offset = offset;
  // Philox pairs columns (j / 2): an even offset keeps the shard's pairs those of the whole row, and
  // j / 2 must fit the counter's 32-bit word.
  constexpr uint64_t kColumns = uint64_t{1} << 33;
  if (column_offset % 2 != 0 || column_offset > kColumns || column_offset + static_cast<uint64_t>(p.vocab) > kColumns)
    throw_value_error(kOp, ": column_offset must be even with column_offset + V <= 2^33, got ", column_offset,
                      " (V = ", p.vocab, ")");
  p.column_offset = column_offset;
  p.confidence = static_cast<ConfidenceKind>(confidence_kind);
  p.tempered_confidence = tempered_confidence;
  p.logits = logits.data();

  if (suppressed.has_value()) {
    expect_device(kOp, "suppressed", *suppressed, device_type);
    expect_dtype(kOp, "suppressed", *suppressed, nb::dlpack::dtype_code::UInt, 8, "uint8");
    expect_shape(kOp, "suppressed", *suppressed, {p.vocab});
    if (p.vocab > 1 && suppressed->stride(0) != 1) throw_value_error(kOp, ": suppressed must be contiguous");
    p.suppressed = static_cast<const uint8_t*>(suppressed->data());
  }
  expect_device(kOp, "tokens", tokens, device_type);
  expect_dtype(kOp, "tokens", tokens, nb::dlpack::dtype_code::Int, 64, "int64");
  expect_shape(kOp, "tokens", tokens, {p.rows});
  expect_device(kOp, "confidence", confidence, device_type);
  expect_dtype(kOp, "confidence", confidence, nb::dlpack::dtype_code::Float, 32, "float32");
  expect_shape(kOp, "confidence", confidence, {p.rows});
  if (p.rows > 1 && (tokens.stride(0) != 1 || confidence.stride(0) != 1))
    throw_value_error(kOp, ": tokens and confidence must be contiguous");
  p.tokens = static_cast<int64_t*>(tokens.data());
  p.confidence_out = static_cast<float*>(confidence.data());
  if (stats.has_value()) {
    expect_device(kOp, "stats", *stats, device_type);
    expect_dtype(kOp, "stats", *stats, nb::dlpack::dtype_code::Float, 64, "float64");
    expect_shape(kOp, "stats", *stats, {p.rows, kSamplingStats});
    if (p.rows > 0 && (stats->stride(1) != 1 || (p.rows > 1 && stats->stride(0) != kSamplingStats)))
      throw_value_error(kOp, ": stats must be contiguous");
    p.stats = static_cast<double*>(stats->data());
  }

  return p;
}

}  // namespace dlmfuse::bindings
