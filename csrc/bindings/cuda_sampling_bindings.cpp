// nanobind entry point of sample_tokens on CUDA: one launch on the caller's stream, no sync.
// seed / offset may come from one-element int64 device tensors (CUDA-graph replay with new noise).
#include "bindings/cuda_common.h"
#include "bindings/sampling_args.h"
#include "cuda/sampling.h"

namespace dlmfuse::bindings {
namespace {

const int64_t* device_scalar(const std::optional<Array>& a, const char* name, int device_id) {
  if (!a.has_value()) return nullptr;
  expect_device("sample_tokens", name, *a, nb::device::cuda::value);
  expect_dtype("sample_tokens", name, *a, nb::dlpack::dtype_code::Int, 64, "int64");
  if (a->size() != 1 || a->device_id() != device_id)
    throw_value_error("sample_tokens: ", name, " tensor must hold one int64 on cuda:", device_id,
                      ", got shape ", shape_string(*a), " on cuda:", a->device_id());
  return static_cast<const int64_t*>(a->data());
}

void sample_tokens(Array logits, double temperature, int64_t top_k, double top_p,
                   std::optional<Array> suppressed, uint64_t seed, uint64_t offset,
                   std::optional<Array> seed_tensor, std::optional<Array> offset_tensor,
                   uint64_t column_offset, int confidence_kind, bool tempered_confidence, Array tokens,
                   Array confidence, std::optional<Array> stats, uint64_t stream) {
  const SamplingParams p =
      sampling_params(logits, temperature, top_k, top_p, suppressed, seed, offset, column_offset,
                      confidence_kind, tempered_confidence, tokens, confidence, stats, nb::device::cuda::value);
  const int device = logits.device_id();
  const int64_t* seed_ptr = device_scalar(seed_tensor, "seed", device);
  const int64_t* offset_ptr = device_scalar(offset_tensor, "offset", device);
  CudaDeviceGuard guard(device);
  check_launch(cuda::sample_tokens(p, seed_ptr, offset_ptr, as_stream(stream)), "sample_tokens",
               "sample_tokens_kernel");
}

}  // namespace

void register_cuda_sampling(nb::module_& m) {
  m.def("sample_tokens", &sample_tokens, nb::arg("logits"), nb::arg("temperature"),
        nb::arg("top_k"), nb::arg("top_p"), nb::arg("suppressed").none(), nb::arg("seed"),
        nb::arg("offset"), nb::arg("seed_tensor").none(), nb::arg("offset_tensor").none(),
        nb::arg("column_offset"), nb::arg("confidence_kind"), nb::arg("tempered_confidence"),
        nb::arg("tokens").noconvert(), nb::arg("confidence").noconvert(), nb::arg("stats").noconvert().none(),
        nb::arg("stream"),
        "Fills tokens [rows], confidence [rows] and, when given, stats [rows, 4] on CUDA. Use dlmfuse.sample_tokens.");
}

}  // namespace dlmfuse::bindings
