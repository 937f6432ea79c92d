// Checks the arguments of sample_tokens and fills SamplingParams (shared by the CPU and CUDA
// modules). All arrays must live on `device_type`.
#pragma once

#include <nanobind/stl/optional.h>

#include <optional>

#include "bindings/tensor_checks.h"
#include "dlmfuse/sampling_params.h"

namespace dlmfuse::bindings {

SamplingParams sampling_params(const Array& logits, double temperature, int64_t top_k, double top_p,
                               const std::optional<Array>& suppressed, uint64_t seed, uint64_t offset,
                               uint64_t column_offset, int confidence_kind, bool tempered_confidence,
                               const Array& tokens, const Array& confidence, const std::optional<Array>& stats,
                               int32_t device_type);

}  // namespace dlmfuse::bindings
