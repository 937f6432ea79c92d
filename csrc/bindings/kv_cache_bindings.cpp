// nanobind entry points of the kv_cache family (CPU): kv_scatter_ writes in place into the
// caller's cache views (never converted or copied: .noconvert()).
#include "bindings/kv_cache_args.h"
#include "cpu/kv_cache.h"
#include "dlmfuse/errors.h"

namespace dlmfuse::bindings {
namespace {

void kv_scatter(Array k_cache, Array v_cache, Array k_new, Array v_new, Array positions,
                bool validate) {
  KvScatterParams p = kv_scatter_params(k_cache, v_cache, k_new, v_new, positions, nb::device::cpu::value);
  p.resolve_duplicates = !validate;
  nb::gil_scoped_release release;
  if (validate) cpu::kv_scatter_validate(p);  // before any write
  cpu::kv_scatter(p);
}

// Host-side check of positions that live on the GPU (copied to the host by the caller).
void kv_scatter_validate(Array positions, int64_t max_len) {
  expect_cpu("kv_scatter_", "positions", positions);
  expect_ndim("kv_scatter_", "positions", positions, 2, "[B, n]");
  const auto dt = positions.dtype();
  if (dt.code != static_cast<uint8_t>(nb::dlpack::dtype_code::Int) || (dt.bits != 32 && dt.bits != 64))
    throw_type_error("kv_scatter_: positions must be int32 or int64, got ", dtype_string(positions));
  KvScatterParams p;
  p.positions = positions.data();
  p.positions_int64 = dt.bits == 64;
  p.position_strides[0] = positions.stride(0);
  p.position_strides[1] = positions.stride(1);
  p.batch = positions.shape(0);
  p.n_new = positions.shape(1);
  p.max_len = max_len;
  cpu::kv_scatter_validate(p);
}

}  // namespace

void register_kv_cache(nb::module_& m) {
  m.def("kv_scatter", &kv_scatter, nb::arg("k_cache").noconvert(), nb::arg("v_cache").noconvert(),
        nb::arg("k_new"), nb::arg("v_new"), nb::arg("positions"), nb::arg("validate"),
        "In-place k_cache[b, positions[b, i]] = k_new[b, i] (same for v), CPU. Use dlmfuse.kv_scatter_.");
  m.def("kv_scatter_validate", &kv_scatter_validate, nb::arg("positions"), nb::arg("max_len"),
        "ValueError unless every position is in [0, max_len) and unique within its row.");
}

}  // namespace dlmfuse::bindings
