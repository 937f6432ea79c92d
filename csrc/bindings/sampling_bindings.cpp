// nanobind entry point of the sampling family (CPU). Python flattens logits to [rows, V],
// allocates tokens / confidence and validates the scalar options; this file re-checks what
// memory safety depends on.
#include <nanobind/stl/optional.h>

#include <cmath>
#include <optional>

#include "bindings/tensor_checks.h"
#include "cpu/sampling.h"
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

void sample_tokens(Array logits, float temperature, int64_t top_k, double top_p,
                   std::optional<Array> suppressed, uint64_t seed, uint64_t offset,
                   int confidence_kind, bool tempered_confidence, Array tokens, Array confidence) {
  SamplingParams p;
  expect_cpu(kOp, "logits", logits);
  expect_ndim(kOp, "logits", logits, 2, "[rows, V]");
  expect_last_dim_contiguous(kOp, "logits", logits);
  p.dtype = logits_dtype(logits);
  p.rows = logits.shape(0);
  p.vocab = logits.shape(1);
  p.row_stride = logits.stride(0);
  if (p.vocab < 1) throw_value_error(kOp, ": logits must have at least one column, got shape ", shape_string(logits));
  if (!(temperature >= 0.0f) || !std::isfinite(temperature))
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
  p.confidence = static_cast<ConfidenceKind>(confidence_kind);
  p.tempered_confidence = tempered_confidence;
  p.logits = logits.data();

  if (suppressed.has_value()) {
    expect_cpu(kOp, "suppressed", *suppressed);
    expect_dtype(kOp, "suppressed", *suppressed, nb::dlpack::dtype_code::UInt, 8, "uint8");
    expect_shape(kOp, "suppressed", *suppressed, {p.vocab});
    if (p.vocab > 1 && suppressed->stride(0) != 1) throw_value_error(kOp, ": suppressed must be contiguous");
    p.suppressed = static_cast<const uint8_t*>(suppressed->data());
  }
  expect_cpu(kOp, "tokens", tokens);
  expect_dtype(kOp, "tokens", tokens, nb::dlpack::dtype_code::Int, 64, "int64");
  expect_shape(kOp, "tokens", tokens, {p.rows});
  expect_cpu(kOp, "confidence", confidence);
  expect_dtype(kOp, "confidence", confidence, nb::dlpack::dtype_code::Float, 32, "float32");
  expect_shape(kOp, "confidence", confidence, {p.rows});
  if (p.rows > 1 && (tokens.stride(0) != 1 || confidence.stride(0) != 1))
    throw_value_error(kOp, ": tokens and confidence must be contiguous");
  p.tokens = static_cast<int64_t*>(tokens.data());
  p.confidence_out = static_cast<float*>(confidence.data());

  nb::gil_scoped_release release;
  cpu::sample_tokens(p);
}

}  // namespace

void register_sampling(nb::module_& m) {
  m.def("sample_tokens", &sample_tokens, nb::arg("logits"), nb::arg("temperature"),
        nb::arg("top_k"), nb::arg("top_p"), nb::arg("suppressed").none(), nb::arg("seed"),
        nb::arg("offset"), nb::arg("confidence_kind"), nb::arg("tempered_confidence"),
        nb::arg("tokens").noconvert(), nb::arg("confidence").noconvert(),
        "Fills tokens [rows] and confidence [rows] (CPU). Use dlmfuse.sample_tokens.");
  m.attr("CONFIDENCE_KINDS") = nb::make_tuple("prob", "margin", "neg_entropy", "logit");
}

}  // namespace dlmfuse::bindings
