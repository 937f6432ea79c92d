// nanobind entry points of the attention family on CUDA: one launch on the caller's stream,
// no allocation, no host sync.
#include "bindings/attention_args.h"
#include "bindings/cuda_common.h"
#include "cuda/attention/attention.h"

namespace dlmfuse::bindings {
namespace {

void attention_forward(Array q, Array k, Array v, std::optional<Array> q_order,
                       std::optional<Array> q_group, std::optional<Array> k_order,
                       std::optional<Array> k_group, std::optional<Array> bias,
                       std::optional<Array> kv_lens, Array out, Array lse, float scale,
                       bool tensor_cores, uint64_t stream) {
  const AttentionParams p = attention_params(q, k, v, q_order, q_group, k_order, k_group, bias,
                                             kv_lens, out, lse, scale, nb::device::cuda::value);
  CudaDeviceGuard guard(q.device_id());
  if (tensor_cores && cuda::attention_sm80_supports(p))
    check_launch(cuda::attention_forward_sm80(p, as_stream(stream)), "attention", "attention_sm80_kernel");
  else
    check_launch(cuda::attention_forward_simple(p, as_stream(stream)), "attention", "attention_simple_kernel");
}

void merge_attention(Array out_a, Array lse_a, Array out_b, Array lse_b, Array out, Array lse,
                     uint64_t stream) {
  const MergeParams p = merge_params(out_a, lse_a, out_b, lse_b, out, lse, nb::device::cuda::value);
  CudaDeviceGuard guard(out_a.device_id());
  check_launch(cuda::merge_attention(p, as_stream(stream)), "merge_attention", "merge_kernel");
}

}  // namespace

void register_cuda_attention(nb::module_& m) {
  m.def("attention_forward", &attention_forward, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("q_order").none(), nb::arg("q_group").none(), nb::arg("k_order").none(),
        nb::arg("k_group").none(), nb::arg("bias").none(), nb::arg("kv_lens").none(),
        nb::arg("out").noconvert(), nb::arg("lse").noconvert(), nb::arg("scale"),
        nb::arg("tensor_cores"), nb::arg("stream"),
        "Fills out [B, Lq, Hq, D] and lse [B, Hq, Lq] on CUDA (tensor cores for bf16 / fp16 when "
        "tensor_cores and the layout allows; else the CUDA-core kernel). Use dlmfuse.attention.");
  m.def("merge_attention", &merge_attention, nb::arg("out_a"), nb::arg("lse_a"), nb::arg("out_b"),
        nb::arg("lse_b"), nb::arg("out").noconvert(), nb::arg("lse").noconvert(), nb::arg("stream"),
        "Fills out and lse with the exact merge of two partial attentions on CUDA.");
}

}  // namespace dlmfuse::bindings
