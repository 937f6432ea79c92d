#include "bindings/tensor_checks.h"

#include <vector>

#include "dlmfuse/errors.h"

namespace dlmfuse::bindings {

std::string shape_string(const Array& a) {
  std::string out = "[";
  for (size_t i = 0; i < a.ndim(); ++i) out += (i ? ", " : "") + std::to_string(a.shape(i));
  return out + "]";
}

std::string dtype_string(const Array& a) {
  const auto dt = a.dtype();
  const char* kind = "dtype";
  switch (static_cast<nb::dlpack::dtype_code>(dt.code)) {
    case nb::dlpack::dtype_code::Int: kind = "int"; break;
    case nb::dlpack::dtype_code::UInt: kind = "uint"; break;
    case nb::dlpack::dtype_code::Float: kind = "float"; break;
    case nb::dlpack::dtype_code::Bfloat: kind = "bfloat"; break;
    case nb::dlpack::dtype_code::Bool: return "bool";
    default: break;
  }
  return kind + std::to_string(dt.bits);
}

DType float_dtype(const char* op, const char* name, const Array& a) {
  const auto dt = a.dtype();
  const auto code = static_cast<nb::dlpack::dtype_code>(dt.code);
  if (dt.lanes == 1 && code == nb::dlpack::dtype_code::Float && dt.bits == 32) return DType::kFloat32;
  if (dt.lanes == 1 && code == nb::dlpack::dtype_code::Float && dt.bits == 16) return DType::kFloat16;
  if (dt.lanes == 1 && code == nb::dlpack::dtype_code::Bfloat && dt.bits == 16) return DType::kBFloat16;
  throw_type_error(op, ": ", name, " must be float32, bfloat16 or float16, got ", dtype_string(a));
}

void expect_dtype(const char* op, const char* name, const Array& a, nb::dlpack::dtype_code code,
                  int bits, const char* expected) {
  const auto dt = a.dtype();
  if (dt.code != static_cast<uint8_t>(code) || dt.bits != bits || dt.lanes != 1)
    throw_type_error(op, ": ", name, " must be ", expected, ", got ", dtype_string(a));
}

namespace {
const char* device_name(int32_t device_type) {
  switch (device_type) {
    case nb::device::cpu::value: return "cpu";
    case nb::device::cuda::value: return "cuda";
    default: return "another device";
  }
}
}  // namespace

void expect_device(const char* op, const char* name, const Array& a, int32_t device_type) {
  if (a.device_type() != device_type)
    throw_type_error(op, ": ", name, " must be a ", device_name(device_type),
                     " tensor for this entry point, got a ", device_name(a.device_type()),
                     " tensor (DLPack device type ", a.device_type(), ")");
}

void expect_bhd_layout(const char* op, const char* name, const Array& a, int32_t device_type) {
  expect_device(op, name, a, device_type);
  expect_ndim(op, name, a, 4, "[B, L, H, D]");
  expect_last_dim_contiguous(op, name, a);
}

void register_error_translator() {
  nb::register_exception_translator([](const std::exception_ptr& ptr, void*) {
    try {
      std::rethrow_exception(ptr);
    } catch (const Error& e) {
      PyObject* type = e.kind() == ErrorKind::kType    ? PyExc_TypeError
                       : e.kind() == ErrorKind::kValue ? PyExc_ValueError
                                                       : PyExc_RuntimeError;
      PyErr_SetString(type, e.what());
    }
  });
}

void expect_ndim(const char* op, const char* name, const Array& a, size_t ndim, const char* layout) {
  if (a.ndim() != ndim)
    throw_value_error(op, ": ", name, " must have ", ndim, " dims ", layout, ", got shape ",
                      shape_string(a));
}

void expect_shape(const char* op, const char* name, const Array& a,
                  std::initializer_list<int64_t> expected) {
  const std::vector<int64_t> want(expected);
  bool ok = a.ndim() == want.size();
  for (size_t i = 0; ok && i < want.size(); ++i) ok = static_cast<int64_t>(a.shape(i)) == want[i];
  if (!ok) {
    std::string want_str = "[";
    for (size_t i = 0; i < want.size(); ++i) want_str += (i ? ", " : "") + std::to_string(want[i]);
    throw_value_error(op, ": ", name, " must have shape ", want_str, "], got ", shape_string(a));
  }
}

void expect_last_dim_contiguous(const char* op, const char* name, const Array& a) {
  const size_t last = a.ndim() - 1;
  if (a.shape(last) > 1 && a.stride(last) != 1)
    throw_value_error(op, ": ", name, " must have a contiguous last dimension (stride 1), got stride ",
                      a.stride(last), " for shape ", shape_string(a), "; call .contiguous() first");
}

void expect_contiguous(const char* op, const char* name, const Array& a) {
  for (size_t d = 0; d < a.ndim(); ++d)
    if (a.shape(d) == 0) return;
  int64_t expected = 1;
  for (size_t d = a.ndim(); d-- > 0;) {
    if (a.shape(d) > 1 && a.stride(d) != expected)
      throw_value_error(op, ": ", name, " must be contiguous, got stride ", a.stride(d), " in dim ", d, " of shape ",
                        shape_string(a));
    expected *= static_cast<int64_t>(a.shape(d));
  }
}

}  // namespace dlmfuse::bindings
