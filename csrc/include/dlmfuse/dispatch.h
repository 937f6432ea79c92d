// Runtime values -> template parameters, once per op, with a loud fallback (never a silent default).
//
//   dispatch_dtype(DType::kBFloat16, "attention", [&](auto tag) { using T = typename decltype(tag)::type; ... });
//   dispatch_head_dim<64, 128>(d, "attention", [&](auto dim) { constexpr int D = decltype(dim)::value; ... });
#pragma once

#include <type_traits>

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

namespace detail {
template <int... Values>
std::string list_ints() {
  std::string out;
  ((out += (out.empty() ? "" : ", ") + std::to_string(Values)), ...);
  return out;
}
}  // namespace detail

// Calls body(std::integral_constant<int, D>{}) for the D in Supported equal to head_dim.
template <int... Supported, typename F>
void dispatch_head_dim(int64_t head_dim, const char* op, F&& body) {
  const bool matched =
      ((head_dim == Supported ? (body(std::integral_constant<int, Supported>{}), true) : false) ||
       ...);
  if (!matched)
    throw_value_error(op, ": head_dim=", head_dim, " unsupported (supported: ",
                      detail::list_ints<Supported...>(), ")");
}

}  // namespace dlmfuse
