// Runtime values -> template parameters, once per op, with a loud fallback (never a silent default).
//
//   dispatch_dtype(DType::kBFloat16, "attention", [&](auto tag) { using T = typename decltype(tag)::type; ... });
#pragma once

#include "dlmfuse/dtype.h"
#include "dlmfuse/errors.h"
#include "dlmfuse/half_convert.h"

namespace dlmfuse {

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
decltype(auto) dispatch_dtype(DType dtype, const char* op, F&& body) {
  switch (dtype) {
    case DType::kFloat32: return body(TypeTag<float>{});
    case DType::kBFloat16: return body(TypeTag<bf16_t>{});
    case DType::kFloat16: return body(TypeTag<fp16_t>{});
    case DType::kFloat64: break;  // only ops that list it take float64 (they dispatch themselves)
  }
  throw_type_error(op, ": dtype ", dtype_name(dtype),
                   " unsupported (supported: float32, bfloat16, float16)");
}

}  // namespace dlmfuse
