// nanobind entry points of the attention family on CUDA: one launch on the caller's stream (two
// with split-KV: the kernel, then the merge), no allocation, no host sync.
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>

#include <mutex>

#include "bindings/attention_args.h"
#include "bindings/cuda_common.h"
#include "cuda/attention/attention.h"

namespace dlmfuse::bindings {
namespace {

// Split-KV workspace (Python allocates it when num_splits > 1): float32, contiguous, on CUDA.
void set_split_workspace(AttentionParams& p, int num_splits, const std::optional<Array>& partial_out,
                         const std::optional<Array>& partial_lse) {
  constexpr const char* op = "attention";
  if (num_splits < 1 || num_splits > kAttentionMaxSplits)
    throw_value_error(op, ": num_splits must lie in [1, ", kAttentionMaxSplits, "], got ", num_splits);
  p.num_splits = num_splits;
  if (num_splits == 1) return;
  if (!partial_out.has_value() || !partial_lse.has_value())
    throw_value_error(op, ": num_splits=", num_splits, " needs the partial_out and partial_lse workspaces");
  const int64_t S = num_splits;
  const std::pair<const char*, const Array*> workspaces[] = {{"partial_out", &*partial_out},
                                                             {"partial_lse", &*partial_lse}};
  for (const auto& [name, a] : workspaces) {
    expect_device(op, name, *a, nb::device::cuda::value);
    expect_dtype(op, name, *a, nb::dlpack::dtype_code::Float, 32, "float32");
  }
  expect_shape(op, "partial_out", *partial_out, {S, p.batch, p.q_heads, p.q_len, p.head_dim});
  expect_shape(op, "partial_lse", *partial_lse, {S, p.batch, p.q_heads, p.q_len});
  for (const auto& [name, a] : workspaces) expect_contiguous(op, name, *a);
  p.partial_out = static_cast<float*>(partial_out->data());
  p.partial_lse = static_cast<float*>(partial_lse->data());
}

void attention_forward(Array q, Array k, Array v, std::optional<Array> q_order,
                       std::optional<Array> q_group, std::optional<Array> k_order,
                       std::optional<Array> k_group, std::optional<Array> bias,
                       std::optional<Array> kv_lens, Array out, Array lse, float scale,
                       bool tensor_cores, uint64_t stream, int num_splits,
                       std::optional<Array> partial_out, std::optional<Array> partial_lse, int kv_stages,
                       bool next_paths, int rows_per_warp, bool pack_gqa, bool wgmma, bool gather_keys) {
  AttentionParams p = attention_params(q, k, v, q_order, q_group, k_order, k_group, bias, kv_lens,
                                       out, lse, scale, nb::device::cuda::value);
  set_split_workspace(p, num_splits, partial_out, partial_lse);
  if (kv_stages != 1 && kv_stages != 2) throw_value_error("attention", ": kv_stages must be 1 or 2, got ", kv_stages);
  p.kv_stages = kv_stages;
  if (next_paths && kv_stages != 2) throw_value_error("attention", ": next_paths needs kv_stages = 2, got ", kv_stages);
  p.next_paths = next_paths;
  if (rows_per_warp != 16 && !(rows_per_warp == 32 && next_paths))
    throw_value_error("attention", ": rows_per_warp must be 16, or 32 with next_paths, got ", rows_per_warp);
  p.wide_rows = rows_per_warp == 32;
  if (pack_gqa && (!next_paths || rows_per_warp != 16))
    throw_value_error("attention", ": pack_gqa needs next_paths and rows_per_warp = 16");
  if (wgmma && (!next_paths || rows_per_warp != 16))
    throw_value_error("attention", ": wgmma needs next_paths and rows_per_warp = 16");
  p.wgmma = wgmma;
  if (gather_keys && (!next_paths || rows_per_warp != 16))
    throw_value_error("attention", ": gather_keys needs next_paths and rows_per_warp = 16");
  // Gathering needs labels to classify keys by, and reads no bias (its columns would be gathered too).
  p.gather_keys = gather_keys && p.has_labels && p.bias == nullptr;
  // Packed only where it saves CTAs; a bias is read per query head, which packed rows mix.
  p.pack_gqa = pack_gqa && p.bias == nullptr &&
               attention_packs_gqa(p.q_heads, p.kv_heads, p.q_len, 4 * rows_per_warp);
  CudaDeviceGuard guard(q.device_id());
  if (tensor_cores && cuda::attention_sm80_supports(p))
    check_launch(cuda::attention_forward_sm80(p, as_stream(stream)), "attention",
                 p.num_splits > 1 ? "attention_sm80_kernel (split-KV) / merge_splits_kernel" : "attention_sm80_kernel");
  else  // the CUDA-core kernel ignores the split workspace
    check_launch(cuda::attention_forward_simple(p, as_stream(stream)), "attention", "attention_simple_kernel");
}

// What the planner needs of GPU `device`, read once per device.
AttentionDevice attention_device(int device) {
  constexpr int kMaxDevices = 64;
  static std::mutex mutex;
  static AttentionDevice known[kMaxDevices];
  static bool read[kMaxDevices] = {};
  const std::lock_guard<std::mutex> lock(mutex);
  if (device >= 0 && device < kMaxDevices && read[device]) return known[device];
  AttentionDevice d;
  if (cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&d.max_shared_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    throw_runtime_error("attention: cannot read the properties of CUDA device ", device);
  d.sm90a_code = archs_have_sm90a(DLMFUSE_CUDA_ARCHS);
  if (device >= 0 && device < kMaxDevices) {
    known[device] = d;
    read[device] = true;
  }
  return d;
}

// DLMFUSE_CUDA_ATTENTION parsed once per value (calls repeat the same text).
AttentionOverride parsed_override(const std::string& text) {
  static std::mutex mutex;
  static AttentionOverride last;
  static bool parsed = false;
  const std::lock_guard<std::mutex> lock(mutex);
  if (!parsed || last.text != text) {
    last = parse_attention_override(text);
    parsed = true;
  }
  return last;
}

// The planned family: plans the call (plan_attention under `forced`), asks `workspace(splits)` for
// the split-KV partials when the plan splits, launches, and returns the plan that ran (describe()).
std::string attention_forward_planned(Array q, Array k, Array v, std::optional<Array> q_order,
                                        std::optional<Array> q_group, std::optional<Array> k_order,
                                        std::optional<Array> k_group, std::optional<Array> q_doc,
                                        std::optional<Array> k_doc, std::optional<Array> bias,
                                        std::optional<Array> kv_lens, Array out, Array lse, float scale,
                                        uint64_t stream, const std::string& forced, nb::callable workspace) {
  AttentionParams p = attention_params(q, k, v, q_order, q_group, k_order, k_group, bias, kv_lens, out, lse, scale,
                                       nb::device::cuda::value, q_doc, k_doc);
  CudaDeviceGuard guard(q.device_id());
  const AttentionPlan plan = plan_attention(p, attention_device(q.device_id()), parsed_override(forced));
  std::optional<Array> partial_out, partial_lse;
  if (plan.splits > 1) {
    auto parts = nb::cast<std::pair<Array, Array>>(workspace(plan.splits));
    partial_out = parts.first;
    partial_lse = parts.second;
  }
  set_split_workspace(p, plan.splits, partial_out, partial_lse);
  p.pack_gqa = plan.pack_gqa;
  check_launch(cuda::attention_forward_family(p, plan, as_stream(stream)), "attention",
               concat("attention_fwd_kernel (", plan.describe(), ")").c_str());
  return plan.describe();
}

// The fused backward (attention_bwd.cu): the same arguments as the CPU module's attention_backward,
// plus the stream.
void attention_backward(Array q, Array k, Array v, std::optional<Array> q_order, std::optional<Array> q_group,
                        std::optional<Array> k_order, std::optional<Array> k_group, std::optional<Array> bias,
                        std::optional<Array> kv_lens, Array out, Array lse, float scale, std::optional<Array> q_doc,
                        std::optional<Array> k_doc, Array grad_out, Array delta, Array grad_q, Array grad_k,
                        Array grad_v, std::optional<Array> grad_bias, uint64_t stream) {
  const AttentionParams forward = attention_params(q, k, v, q_order, q_group, k_order, k_group, bias, kv_lens, out,
                                                   lse, scale, nb::device::cuda::value, q_doc, k_doc);
  const AttentionBackwardParams p = attention_backward_params(forward, grad_out, delta, grad_q, grad_k, grad_v,
                                                              grad_bias, nb::device::cuda::value);
  if (!cuda::attention_backward_supports(p))
    throw_value_error("attention backward: the CUDA kernel takes bf16 / fp16 inputs at head_dim 64 or 128 whose rows "
                      "(q, k, v, grad_out) start on 16-byte boundaries");
  CudaDeviceGuard guard(q.device_id());
  check_launch(cuda::attention_backward(p, as_stream(stream)), "attention backward",
               "query_grads_kernel / key_grads_kernel");
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
        nb::arg("tensor_cores"), nb::arg("stream"), nb::arg("num_splits") = 1,
        nb::arg("partial_out").none() = nb::none(), nb::arg("partial_lse").none() = nb::none(),
        nb::arg("kv_stages") = 2, nb::arg("next_paths") = false,
        nb::arg("rows_per_warp") = 16, nb::arg("pack_gqa") = false, nb::arg("wgmma") = false,
        nb::arg("gather_keys") = false,
        "Fills out [B, Lq, Hq, D] and lse [B, Hq, Lq] on CUDA (tensor cores for bf16 / fp16 when "
        "tensor_cores and the layout allows; else the CUDA-core kernel). num_splits > 1 splits the "
        "key range on tensor cores (float32 workspaces partial_out [S, B, Hq, Lq, D] and "
        "partial_lse [S, B, Hq, Lq], S = num_splits); kv_stages = 2 (default) double-buffers K and V "
        "on tensor cores, 1 keeps one buffer of each; next_paths = True runs the tensor-core kernel's "
        "kNext paths (two buffers only), with rows_per_warp = 32 also 128 query rows "
        "per CTA, with pack_gqa = True (next_paths only) also the query heads of a KV head packed into "
        "one CTA's rows where that needs fewer CTAs and there is no bias, with wgmma = True (next_paths, "
        "16 rows per warp) also warpgroup MMAs on sm_90 GPUs, with gather_keys = True (next_paths, 16 rows per "
        "warp) the keys of PARTIAL tiles gathered per key for calls with labels and no bias. Use dlmfuse.attention.");
  register_attention_plan(m);
  m.def("attention_forward_planned", &attention_forward_planned, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("q_order").none(), nb::arg("q_group").none(), nb::arg("k_order").none(), nb::arg("k_group").none(),
        nb::arg("q_doc").none(), nb::arg("k_doc").none(), nb::arg("bias").none(), nb::arg("kv_lens").none(),
        nb::arg("out").noconvert(), nb::arg("lse").noconvert(), nb::arg("scale"), nb::arg("stream"),
        nb::arg("forced"), nb::arg("workspace"),
        "The planned attention family (not yet verified on a GPU): fills out [B, Lq, Hq, D] and lse "
        "[B, Hq, Lq] with the plan plan_attention makes for this call under `forced` (DLMFUSE_CUDA_ATTENTION's "
        "text), honouring document labels; workspace(splits) must return the float32 "
        "partial_out [S, B, Hq, Lq, D] and partial_lse [S, B, Hq, Lq] when the plan splits. Returns the plan "
        "that ran. Use dlmfuse.attention.");
  m.def("attention_backward", &attention_backward, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("q_order").none(),
        nb::arg("q_group").none(), nb::arg("k_order").none(), nb::arg("k_group").none(), nb::arg("bias").none(),
        nb::arg("kv_lens").none(), nb::arg("out"), nb::arg("lse"), nb::arg("scale"), nb::arg("q_doc").none(),
        nb::arg("k_doc").none(), nb::arg("grad_out"), nb::arg("delta"), nb::arg("grad_q").noconvert(),
        nb::arg("grad_k").noconvert(), nb::arg("grad_v").noconvert(), nb::arg("grad_bias").none(), nb::arg("stream"),
        "The fused attention backward on CUDA (not yet verified on a GPU): fills the float32 grad_q [B, Hq, Lq, D], "
        "grad_k and grad_v [B, Lk, Hkv, D] and, where given, the zeroed grad_bias [B, Hq, Lq, Lk]; delta "
        "[B, Hq, Lq] is rowsum(grad_out * out) - grad_lse. Use dlmfuse.attention with autograd.");
  m.def("merge_attention", &merge_attention, nb::arg("out_a"), nb::arg("lse_a"), nb::arg("out_b"),
        nb::arg("lse_b"), nb::arg("out").noconvert(), nb::arg("lse").noconvert(), nb::arg("stream"),
        "Fills out and lse with the exact merge of two partial attentions on CUDA.");
}

}  // namespace dlmfuse::bindings
