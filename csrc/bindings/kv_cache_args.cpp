#include "bindings/kv_cache_args.h"

#include "dlmfuse/errors.h"

namespace dlmfuse::bindings {
namespace {
constexpr const char* kOp = "kv_scatter_";
}  // namespace

KvScatterParams kv_scatter_params(const Array& k_cache, const Array& v_cache, const Array& k_new,
                                  const Array& v_new, const Array& positions, int32_t device_type) {
  KvScatterParams p;
  const std::pair<const char*, const Array*> tensors[] = {
      {"k_cache", &k_cache}, {"v_cache", &v_cache}, {"k_new", &k_new}, {"v_new", &v_new}};
  for (const auto& [name, a] : tensors) {
    expect_bhd_layout(kOp, name, *a, device_type);
    if (a->dtype() != k_cache.dtype())
      throw_type_error(kOp, ": ", name, " must have the dtype of k_cache (", dtype_string(k_cache),
                       "), got ", dtype_string(*a));
  }
  p.batch = k_cache.shape(0);
  p.max_len = k_cache.shape(1);
  p.heads = k_cache.shape(2);
  p.head_dim = k_cache.shape(3);
  p.n_new = k_new.shape(1);
  expect_shape(kOp, "v_cache", v_cache, {p.batch, p.max_len, p.heads, p.head_dim});
  expect_shape(kOp, "k_new", k_new, {p.batch, p.n_new, p.heads, p.head_dim});
  expect_shape(kOp, "v_new", v_new, {p.batch, p.n_new, p.heads, p.head_dim});
  expect_device(kOp, "positions", positions, device_type);
  const auto pdt = positions.dtype();
  if (pdt.code != static_cast<uint8_t>(nb::dlpack::dtype_code::Int) || (pdt.bits != 32 && pdt.bits != 64))
    throw_type_error(kOp, ": positions must be int32 or int64, got ", dtype_string(positions));
  expect_shape(kOp, "positions", positions, {p.batch, p.n_new});

  p.k_cache = k_cache.data();
  p.v_cache = v_cache.data();
  p.k_new = k_new.data();
  p.v_new = v_new.data();
  p.positions = positions.data();
  p.positions_int64 = pdt.bits == 64;
  p.element_size = k_cache.dtype().bits / 8;
  copy_strides(p.k_cache_strides, k_cache);
  copy_strides(p.v_cache_strides, v_cache);
  copy_strides(p.k_new_strides, k_new);
  copy_strides(p.v_new_strides, v_new);
  p.position_strides[0] = positions.stride(0);
  p.position_strides[1] = positions.stride(1);

  return p;
}

}  // namespace dlmfuse::bindings
