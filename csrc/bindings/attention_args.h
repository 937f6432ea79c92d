// Checks the arguments of attention / merge_attention and fills their params structs (shared by
// the CPU and CUDA modules). All arrays must live on `device_type`.
#pragma once

#include <nanobind/stl/optional.h>

#include <optional>

#include "bindings/tensor_checks.h"
#include "dlmfuse/attention_params.h"

namespace dlmfuse::bindings {

AttentionParams attention_params(const Array& q, const Array& k, const Array& v,
                                 const std::optional<Array>& q_order, const std::optional<Array>& q_group,
                                 const std::optional<Array>& k_order, const std::optional<Array>& k_group,
                                 const std::optional<Array>& bias, const std::optional<Array>& kv_lens,
                                 const Array& out, const Array& lse, float scale, int32_t device_type,
                                 const std::optional<Array>& q_doc = std::nullopt,
                                 const std::optional<Array>& k_doc = std::nullopt);

// The forward's arguments (out: the forward's output, lse: its lse) plus grad_out [B, Lq, Hq, D]
// in q's dtype and float32 contiguous delta [B, Hq, Lq], grad_q [B, Hq, Lq, D], grad_k / grad_v
// [B, Lk, Hkv, D] and grad_bias [B, Hq, Lq, Lk] (optional).
AttentionBackwardParams attention_backward_params(const AttentionParams& forward, const Array& grad_out,
                                                  const Array& delta, const Array& grad_q, const Array& grad_k,
                                                  const Array& grad_v, const std::optional<Array>& grad_bias,
                                                  int32_t device_type);

// attention_num_splits, attention_packs_gqa and ATTENTION_MAX_SPLITS (attention_plan_bindings.cpp).
void register_attention_plan(nb::module_& m);
void register_attention_planner(nb::module_& m);  // _C only

MergeParams merge_params(const Array& out_a, const Array& lse_a, const Array& out_b, const Array& lse_b,
                         const Array& out, const Array& lse, int32_t device_type);

}  // namespace dlmfuse::bindings
