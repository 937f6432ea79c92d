// nanobind entry points of the attention family (CPU).
#include "bindings/attention_args.h"
#include "cpu/attention.h"

namespace dlmfuse::bindings {
namespace {

void attention_forward(Array q, Array k, Array v, std::optional<Array> q_order,
                       std::optional<Array> q_group, std::optional<Array> k_order,
                       std::optional<Array> k_group, std::optional<Array> bias,
                       std::optional<Array> kv_lens, Array out, Array lse, float scale,
                       std::optional<Array> q_doc, std::optional<Array> k_doc) {
  const AttentionParams p = attention_params(q, k, v, q_order, q_group, k_order, k_group, bias,
                                             kv_lens, out, lse, scale, nb::device::cpu::value, q_doc, k_doc);
  nb::gil_scoped_release release;
  cpu::attention_forward(p);
}

void attention_backward(Array q, Array k, Array v, std::optional<Array> q_order, std::optional<Array> q_group,
                        std::optional<Array> k_order, std::optional<Array> k_group, std::optional<Array> bias,
                        std::optional<Array> kv_lens, Array out, Array lse, float scale, std::optional<Array> q_doc,
                        std::optional<Array> k_doc, Array grad_out, Array delta, Array grad_q, Array grad_k,
                        Array grad_v, std::optional<Array> grad_bias) {
  const AttentionParams forward = attention_params(q, k, v, q_order, q_group, k_order, k_group, bias, kv_lens, out,
                                                   lse, scale, nb::device::cpu::value, q_doc, k_doc);
  const AttentionBackwardParams p = attention_backward_params(forward, grad_out, delta, grad_q, grad_k, grad_v,
                                                              grad_bias, nb::device::cpu::value);
  nb::gil_scoped_release release;
  cpu::attention_backward(p);
}

void merge_attention(Array out_a, Array lse_a, Array out_b, Array lse_b, Array out, Array lse) {
  const MergeParams p = merge_params(out_a, lse_a, out_b, lse_b, out, lse, nb::device::cpu::value);
  nb::gil_scoped_release release;
  cpu::merge_attention(p);
}

}  // namespace

void register_attention(nb::module_& m) {
  m.def("attention_forward", &attention_forward, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("q_order").none(), nb::arg("q_group").none(), nb::arg("k_order").none(),
        nb::arg("k_group").none(), nb::arg("bias").none(), nb::arg("kv_lens").none(),
        nb::arg("out").noconvert(), nb::arg("lse").noconvert(), nb::arg("scale"),
        nb::arg("q_doc").none() = nb::none(), nb::arg("k_doc").none() = nb::none(),
        "Fills out [B, Lq, Hq, D] and lse [B, Hq, Lq] (CPU); q_doc / k_doc: document labels of packed "
        "sequences. Use dlmfuse.attention instead.");
  m.def("attention_backward", &attention_backward, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("q_order").none(), nb::arg("q_group").none(), nb::arg("k_order").none(), nb::arg("k_group").none(),
        nb::arg("bias").none(), nb::arg("kv_lens").none(), nb::arg("out"), nb::arg("lse"), nb::arg("scale"),
        nb::arg("q_doc").none(), nb::arg("k_doc").none(), nb::arg("grad_out"), nb::arg("delta"),
        nb::arg("grad_q").noconvert(), nb::arg("grad_k").noconvert(), nb::arg("grad_v").noconvert(),
        nb::arg("grad_bias").noconvert().none(),
        "Fills float32 grad_q [B, Hq, Lq, D], grad_k / grad_v [B, Lk, Hkv, D] and grad_bias [B, Hq, Lq, Lk] "
        "(zeroed by the caller) from the forward's arguments and outputs, grad_out and delta = "
        "rowsum(grad_out * out) - grad_lse (CPU). Use dlmfuse.attention's autograd instead.");
  m.def("merge_attention", &merge_attention, nb::arg("out_a"), nb::arg("lse_a"), nb::arg("out_b"),
        nb::arg("lse_b"), nb::arg("out").noconvert(), nb::arg("lse").noconvert(),
        "Fills out and lse with the exact merge of two partial attentions (CPU).");
}

}  // namespace dlmfuse::bindings
