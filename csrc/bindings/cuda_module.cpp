// The CUDA extension module dlmfuse._C_cuda. Built only when nvcc is found; linked with the
// static CUDA runtime so it imports on machines without a GPU or driver.
// Kernels land here as they are verified on a device (issues: CUDA attention, KV cache, sampling).
#include <nanobind/nanobind.h>

#include "bindings/tensor_checks.h"
#include "dlmfuse/attention_params.h"
#include "cuda/device_info.h"

namespace nb = nanobind;

namespace dlmfuse::bindings {
void register_cuda_attention(nb::module_& m);
void register_cuda_kv_cache(nb::module_& m);
void register_cuda_sampling(nb::module_& m);
}  // namespace dlmfuse::bindings

NB_MODULE(_C_cuda, m) {
  dlmfuse::bindings::register_error_translator();
  m.attr("CUDA_ARCHS") = DLMFUSE_CUDA_ARCHS;
  m.attr("ATTENTION_HEAD_DIMS") = nb::make_tuple(DLMFUSE_CUDA_ATTENTION_HEAD_DIMS);
  m.def("runtime_version", &dlmfuse::cuda::runtime_version,
        "CUDA runtime version compiled in, e.g. 13000.");
  m.def("device_count", &dlmfuse::cuda::device_count,
        "Visible CUDA devices (0 without a driver or GPU).");
  dlmfuse::bindings::register_cuda_attention(m);
  dlmfuse::bindings::register_cuda_kv_cache(m);
  dlmfuse::bindings::register_cuda_sampling(m);
}
