// nanobind entry point of kv_scatter_ on CUDA: in place, one launch on the caller's stream,
// no host sync (validation of positions, when asked, happens in Python before the call).
#include "bindings/cuda_common.h"
#include "bindings/kv_cache_args.h"
#include "cuda/kv_cache.h"

namespace dlmfuse::bindings {
namespace {

void kv_scatter(Array k_cache, Array v_cache, Array k_new, Array v_new, Array positions,
                bool unique_positions, uint64_t stream) {
  KvScatterParams p = kv_scatter_params(k_cache, v_cache, k_new, v_new, positions, nb::device::cuda::value);
  p.resolve_duplicates = !unique_positions;
  for (const Array* a : {&v_cache, &k_new, &v_new, &positions})
    if (a->device_id() != k_cache.device_id())
      throw_type_error("kv_scatter_: all tensors must be on cuda:", k_cache.device_id(),
                       ", got one on cuda:", a->device_id());
  CudaDeviceGuard guard(k_cache.device_id());
  check_launch(cuda::kv_scatter(p, as_stream(stream)), "kv_scatter_", "kv_scatter_kernel");
}

}  // namespace

void register_cuda_kv_cache(nb::module_& m) {
  m.def("kv_scatter", &kv_scatter, nb::arg("k_cache").noconvert(), nb::arg("v_cache").noconvert(),
        nb::arg("k_new"), nb::arg("v_new"), nb::arg("positions"), nb::arg("unique_positions"), nb::arg("stream"),
        "In-place k_cache[b, positions[b, i]] = k_new[b, i] (same for v) on CUDA; skips "
        "out-of-range rows, and unless unique_positions, rows whose position repeats later in "
        "their row. Use dlmfuse.kv_scatter_.");
}

}  // namespace dlmfuse::bindings
