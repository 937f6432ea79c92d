// Checks the arguments of the attention family and fills the params structs (shared by the CPU
// and CUDA modules). Python allocates the outputs and broadcasts bias / labels to full shapes as
// stride-0 views; every invariant that memory safety depends on is re-checked here.
#include "bindings/attention_args.h"

#include "dlmfuse/errors.h"

namespace dlmfuse::bindings {
namespace {

constexpr const char* kOp = "attention";

LabelView label_view(const char* name, const Array& a, int64_t batch, int64_t len, int32_t device_type) {
  expect_device(kOp, name, a, device_type);
  expect_dtype(kOp, name, a, nb::dlpack::dtype_code::Int, 32, "int32");
  expect_ndim(kOp, name, a, 2, "[B or 1, L]");
  const int64_t b = static_cast<int64_t>(a.shape(0));
  if ((b != 1 && b != batch) || static_cast<int64_t>(a.shape(1)) != len)
    throw_value_error(kOp, ": ", name, " must have shape [", batch, " or 1, ", len, "], got ",
                      shape_string(a));
  LabelView view;
  view.data = static_cast<const int32_t*>(a.data());
  view.batch_stride = b == 1 ? 0 : a.stride(0);
  view.row_stride = a.stride(1);
  return view;
}


}  // namespace

AttentionParams attention_params(const Array& q, const Array& k, const Array& v,
                                 const std::optional<Array>& q_order, const std::optional<Array>& q_group,
                                 const std::optional<Array>& k_order, const std::optional<Array>& k_group,
                                 const std::optional<Array>& bias, const std::optional<Array>& kv_lens,
                                 const Array& out, const Array& lse, float scale, int32_t device_type,
                                 const std::optional<Array>& q_doc, const std::optional<Array>& k_doc) {
  AttentionParams p;
  for (const auto& [name, a] : {std::pair<const char*, const Array*>{"q", &q}, {"k", &k},
                                {"v", &v}, {"out", &out}}) {
    expect_bhd_layout(kOp, name, *a, device_type);
  }
  p.dtype = float_dtype(kOp, "q", q);
  for (const auto& [name, a] : {std::pair<const char*, const Array*>{"k", &k}, {"v", &v}, {"out", &out}})
    if (float_dtype(kOp, name, *a) != p.dtype)
      throw_type_error(kOp, ": ", name, " must have the dtype of q (", dtype_name(p.dtype), "), got ",
                       dtype_string(*a));

  p.batch = q.shape(0);
  p.q_len = q.shape(1);
  p.q_heads = q.shape(2);
  p.head_dim = q.shape(3);
  p.k_len = k.shape(1);
  p.kv_heads = k.shape(2);
  expect_shape(kOp, "k", k, {p.batch, p.k_len, p.kv_heads, p.head_dim});
  expect_shape(kOp, "v", v, {p.batch, p.k_len, p.kv_heads, p.head_dim});
  expect_shape(kOp, "out", out, {p.batch, p.q_len, p.q_heads, p.head_dim});
  if (p.kv_heads == 0 || p.q_heads % p.kv_heads != 0)
    throw_value_error(kOp, ": query heads (", p.q_heads, ") must be a multiple of kv heads (",
                      p.kv_heads, ")");
  expect_device(kOp, "lse", lse, device_type);
  expect_dtype(kOp, "lse", lse, nb::dlpack::dtype_code::Float, 32, "float32");
  expect_shape(kOp, "lse", lse, {p.batch, p.q_heads, p.q_len});
  expect_contiguous(kOp, "lse", lse);

  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.lse = static_cast<float*>(lse.data());
  copy_strides(p.q_strides, q);
  copy_strides(p.k_strides, k);
  copy_strides(p.v_strides, v);
  copy_strides(p.out_strides, out);
  p.scale = scale;

  const int n_labels = q_order.has_value() + q_group.has_value() + k_order.has_value() + k_group.has_value();
  if (n_labels != 0 && n_labels != 4)
    throw_value_error(kOp, ": pass all four labels (q_order, q_group, k_order, k_group) or none, got ",
                      n_labels);
  if (n_labels == 4) {
    p.has_labels = true;
    p.q_order = label_view("q_order", *q_order, p.batch, p.q_len, device_type);
    p.q_group = label_view("q_group", *q_group, p.batch, p.q_len, device_type);
    p.k_order = label_view("k_order", *k_order, p.batch, p.k_len, device_type);
    p.k_group = label_view("k_group", *k_group, p.batch, p.k_len, device_type);
  }
  if (q_doc.has_value() != k_doc.has_value())
    throw_value_error(kOp, ": pass both document labels (q_doc, k_doc) or neither, got only ",
                      q_doc.has_value() ? "q_doc" : "k_doc");
  if (q_doc.has_value()) {
    if (!p.has_labels) throw_value_error(kOp, ": document labels need the four labels too");
    p.has_docs = true;
    p.q_doc = label_view("q_doc", *q_doc, p.batch, p.q_len, device_type);
    p.k_doc = label_view("k_doc", *k_doc, p.batch, p.k_len, device_type);
  }

  if (bias.has_value()) {
    expect_device(kOp, "bias", *bias, device_type);
    p.bias_dtype = float_dtype(kOp, "bias", *bias);
    expect_shape(kOp, "bias", *bias, {p.batch, p.q_heads, p.q_len, p.k_len});
    p.bias = bias->data();
    copy_strides(p.bias_strides, *bias);
  }

  if (kv_lens.has_value()) {
    expect_device(kOp, "kv_lens", *kv_lens, device_type);
    expect_dtype(kOp, "kv_lens", *kv_lens, nb::dlpack::dtype_code::Int, 32, "int32");
    expect_shape(kOp, "kv_lens", *kv_lens, {p.batch});
    if (p.batch > 1 && kv_lens->stride(0) != 1) throw_value_error(kOp, ": kv_lens must be contiguous");
    p.kv_lens = static_cast<const int32_t*>(kv_lens->data());
  }

  return p;
}


namespace {

// A float32 buffer with exactly this shape, contiguous (the backward writes it as such).
float* contiguous_float_buffer(const char* name, const Array& a, std::initializer_list<int64_t> shape,
                               int32_t device_type) {
  expect_device(kOp, name, a, device_type);
  expect_dtype(kOp, name, a, nb::dlpack::dtype_code::Float, 32, "float32");
  expect_shape(kOp, name, a, shape);
  expect_contiguous(kOp, name, a);
  return static_cast<float*>(a.data());
}

}  // namespace

AttentionBackwardParams attention_backward_params(const AttentionParams& forward, const Array& grad_out,
                                                  const Array& delta, const Array& grad_q, const Array& grad_k,
                                                  const Array& grad_v, const std::optional<Array>& grad_bias,
                                                  int32_t device_type) {
  AttentionBackwardParams p;
  p.fwd = forward;
  const AttentionParams& f = forward;
  expect_bhd_layout(kOp, "grad_out", grad_out, device_type);
  if (float_dtype(kOp, "grad_out", grad_out) != f.dtype)
    throw_type_error(kOp, ": grad_out must have the dtype of q (", dtype_name(f.dtype), "), got ", dtype_string(grad_out));
  expect_shape(kOp, "grad_out", grad_out, {f.batch, f.q_len, f.q_heads, f.head_dim});
  p.grad_out = grad_out.data();
  copy_strides(p.grad_out_strides, grad_out);
  p.delta = contiguous_float_buffer("delta", delta, {f.batch, f.q_heads, f.q_len}, device_type);
  p.grad_q = contiguous_float_buffer("grad_q", grad_q, {f.batch, f.q_heads, f.q_len, f.head_dim}, device_type);
  p.grad_k = contiguous_float_buffer("grad_k", grad_k, {f.batch, f.k_len, f.kv_heads, f.head_dim}, device_type);
  p.grad_v = contiguous_float_buffer("grad_v", grad_v, {f.batch, f.k_len, f.kv_heads, f.head_dim}, device_type);
  if (grad_bias.has_value())
    p.grad_bias = contiguous_float_buffer("grad_bias", *grad_bias, {f.batch, f.q_heads, f.q_len, f.k_len}, device_type);
  return p;
}

MergeParams merge_params(const Array& out_a, const Array& lse_a, const Array& out_b, const Array& lse_b,
                         const Array& out, const Array& lse, int32_t device_type) {
  constexpr const char* op = "merge_attention";
  MergeParams p;
  for (const auto& [name, a] : {std::pair<const char*, const Array*>{"out_a", &out_a},
                                {"out_b", &out_b}, {"out", &out}}) {
    expect_bhd_layout(op, name, *a, device_type);
  }
  p.dtype = float_dtype(op, "out_a", out_a);
  for (const auto& [name, a] : {std::pair<const char*, const Array*>{"out_b", &out_b}, {"out", &out}})
    if (float_dtype(op, name, *a) != p.dtype)
      throw_type_error(op, ": ", name, " must have the dtype of out_a (", dtype_name(p.dtype),
                       "), got ", dtype_string(*a));
  p.batch = out_a.shape(0);
  p.seq_len = out_a.shape(1);
  p.heads = out_a.shape(2);
  p.head_dim = out_a.shape(3);
  expect_shape(op, "out_b", out_b, {p.batch, p.seq_len, p.heads, p.head_dim});
  expect_shape(op, "out", out, {p.batch, p.seq_len, p.heads, p.head_dim});
  for (const auto& [name, a] : {std::pair<const char*, const Array*>{"lse_a", &lse_a},
                                {"lse_b", &lse_b}, {"lse", &lse}}) {
    expect_device(op, name, *a, device_type);
    expect_dtype(op, name, *a, nb::dlpack::dtype_code::Float, 32, "float32");
    expect_shape(op, name, *a, {p.batch, p.heads, p.seq_len});
  }
  p.out_a = out_a.data();
  p.out_b = out_b.data();
  p.out = out.data();
  p.lse_a = static_cast<const float*>(lse_a.data());
  p.lse_b = static_cast<const float*>(lse_b.data());
  p.lse = static_cast<float*>(lse.data());
  copy_strides(p.out_a_strides, out_a);
  copy_strides(p.out_b_strides, out_b);
  copy_strides(p.out_strides, out);
  copy_strides(p.lse_a_strides, lse_a);
  copy_strides(p.lse_b_strides, lse_b);
  copy_strides(p.lse_strides, lse);
  return p;
}


}  // namespace dlmfuse::bindings
