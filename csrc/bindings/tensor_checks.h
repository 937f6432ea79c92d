// Argument checks at the binding boundary (the only code that sees nanobind).
// Every failure names the op, the argument, what was expected and what was received.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <initializer_list>
#include <string>

#include "dlmfuse/dtype.h"

namespace dlmfuse::bindings {

namespace nb = nanobind;
using Array = nb::ndarray<>;

std::string shape_string(const Array& a);
std::string dtype_string(const Array& a);

// TypeError unless `a` is a float32 / bfloat16 / float16 array; returns its DType.
DType float_dtype(const char* op, const char* name, const Array& a);
// TypeError unless `a` has DLPack dtype (code, bits), e.g. int32 = (Int, 32).
void expect_dtype(const char* op, const char* name, const Array& a, nb::dlpack::dtype_code code,
                  int bits, const char* expected);
// TypeError unless `a` lives on the device type (nb::device::cpu::value / cuda::value).
void expect_device(const char* op, const char* name, const Array& a, int32_t device_type);
inline void expect_cpu(const char* op, const char* name, const Array& a) {
  expect_device(op, name, a, nb::device::cpu::value);
}
// ValueError unless a.ndim() == ndim.
void expect_ndim(const char* op, const char* name, const Array& a, size_t ndim, const char* layout);
// ValueError unless the shape equals `expected` exactly.
void expect_shape(const char* op, const char* name, const Array& a,
                  std::initializer_list<int64_t> expected);
// ValueError unless the last dimension has stride 1 (or size <= 1).
void expect_last_dim_contiguous(const char* op, const char* name, const Array& a);
// ValueError unless `a` is contiguous as torch means it: row-major, dims of extent 1 with any
// stride, and an array without elements with any strides.
void expect_contiguous(const char* op, const char* name, const Array& a);

// A [B, L, H, D] tensor on `device_type` with a contiguous head_dim (device, rank, stride checks).
void expect_bhd_layout(const char* op, const char* name, const Array& a, int32_t device_type);

// Copies the first N element strides of `a` (e.g. batch, row, head of a [B, L, H, D] tensor).
template <size_t N>
void copy_strides(int64_t (&dst)[N], const Array& a) {
  for (size_t i = 0; i < N; ++i) dst[i] = a.stride(i);
}

// Turns dlmfuse::Error into TypeError / ValueError / RuntimeError (call once per module).
void register_error_translator();

}  // namespace dlmfuse::bindings
