// The launch decisions of the CUDA attention (dlmfuse/attention_plan.h, dlmfuse/attention_planner.h):
// CPU-only builds test them, the CUDA module plans its calls with them.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "dlmfuse/attention_plan.h"
#include "dlmfuse/attention_planner.h"

namespace nb = nanobind;

namespace dlmfuse::bindings {

void register_attention_plan(nb::module_& m) {
  m.def("attention_num_splits", &attention_num_splits, nb::arg("batch"), nb::arg("q_heads"), nb::arg("q_len"),
        nb::arg("k_len"), nb::arg("head_dim"), nb::arg("sm_count"), nb::arg("rows_per_cta") = kAttentionCtaRows,
        nb::arg("kv_heads") = 0,
        "Split-KV count the CUDA tensor-core attention wants for these shapes on a GPU with sm_count SMs "
        "(1: no split, no workspace); kv_heads > 0: counting the CTAs of GQA packing where it applies.");
  m.def("attention_packs_gqa", &attention_packs_gqa, nb::arg("q_heads"), nb::arg("kv_heads"), nb::arg("q_len"),
        nb::arg("rows_per_cta"),
        "Whether the CUDA attention packs these shapes (when it also has no bias): packing the query heads "
        "of each KV head into shared CTAs needs fewer CTAs than one run per head.");
  m.def("attention_fwd_tma_bytes", &attention_fwd_tma_bytes, nb::arg("head_dim"), nb::arg("bias") = false,
        "Dynamic shared memory of the warp-specialized kernel (mma=sm90, tile_m=128) at this head_dim, "
        "with or without the ring of bias tiles.");
  m.attr("ATTENTION_MAX_SPLITS") = kAttentionMaxSplits;
  m.attr("ATTENTION_MAX_GRID_DIM") = kAttentionMaxGridDim;  // CUDA's cap on a grid's y and z extents
}

// The planner's types and entry points for Python (tests, the override's validation), in _C only:
// _C_cuda plans its calls in C++ and takes the override as text, so it registers no type twice.
void register_attention_planner(nb::module_& m) {
  nb::class_<AttentionOverride>(m, "AttentionOverride",
                                "A parsed DLMFUSE_CUDA_ATTENTION override of the attention planner.")
      .def_ro("text", &AttentionOverride::text)
      .def("__repr__", [](const AttentionOverride& o) { return "AttentionOverride(\"" + o.text + "\")"; });
  m.def("parse_attention_override", &parse_attention_override, nb::arg("text"),
        "Parses \"key=value,...\" (mma simt/sm80/sm90, tile_m 64/128, walk tiles/gather, splits 1-16, "
        "pack_gqa 0/1; \"\" or \"auto\": nothing forced); ValueError naming the bad item otherwise.");

  nb::class_<AttentionPlan>(m, "AttentionPlan", "Launch decisions of one CUDA attention call.")
      .def_prop_ro("mma", [](const AttentionPlan& p) { return std::string(mma_name(p.mma)); })
      .def_prop_ro("walk", [](const AttentionPlan& p) { return std::string(walk_name(p.walk)); })
      .def_ro("tile_m", &AttentionPlan::tile_m)
      .def_ro("splits", &AttentionPlan::splits)
      .def_ro("pack_gqa", &AttentionPlan::pack_gqa)
      .def("__str__", &AttentionPlan::describe)
      .def("__repr__", [](const AttentionPlan& p) { return "AttentionPlan(" + p.describe() + ")"; });
  m.def(
      "plan_attention",
      [](int64_t batch, int64_t q_len, int64_t k_len, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
         bool half_precision, bool aligned, bool has_labels, bool has_bias, int sm_count, int cc_major, int cc_minor,
         const AttentionOverride* forced, int max_shared_bytes, bool broadcast_rows, bool sm90a_code, bool bias_tma) {
        const AttentionCall call{batch,   q_len,      k_len,    q_heads,        kv_heads, head_dim, half_precision,
                                 aligned, has_labels, has_bias, broadcast_rows, bias_tma};
        return plan_attention(call, AttentionDevice{sm_count, cc_major, cc_minor, max_shared_bytes, sm90a_code},
                              forced != nullptr ? *forced : AttentionOverride{});
      },
      nb::arg("batch"), nb::arg("q_len"), nb::arg("k_len"), nb::arg("q_heads"), nb::arg("kv_heads"),
      nb::arg("head_dim"), nb::arg("half_precision"), nb::arg("aligned"), nb::arg("has_labels"), nb::arg("has_bias"),
      nb::arg("sm_count"), nb::arg("cc_major"), nb::arg("cc_minor"), nb::arg("forced").none() = nb::none(),
      nb::arg("max_shared_bytes") = 0, nb::arg("broadcast_rows") = false, nb::arg("sm90a_code") = true,
      nb::arg("bias_tma") = true,
      "The planner's decisions for a call of these shapes on a GPU of sm_count SMs, compute capability "
      "cc_major.cc_minor and max_shared_bytes of opt-in shared memory per block (0: not checked); "
      "broadcast_rows: q, k or v has a stride-0 axis of extent > 1; sm90a_code: the build has sm_90a machine "
      "code (the wgmma plans need it); bias_tma: a bias (with has_bias) that a TMA map can load (16-bit, "
      "contiguous keys, 16-byte aligned rows). The CUDA module plans real calls from their tensors the same way.");
  m.def("archs_have_sm90a", &archs_have_sm90a, nb::arg("archs"),
        "Whether a CUDA architecture list as built (\"80;90a-real\", comma- or semicolon-separated) has "
        "sm_90a code.");
}

}  // namespace dlmfuse::bindings
