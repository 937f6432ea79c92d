// The shape-only launch decisions of the CUDA attention (dlmfuse/attention_plan.h), bound into both
// modules: CPU-only builds test them, the CUDA module's Python layer sizes workspaces with them.
#include <nanobind/nanobind.h>

#include "dlmfuse/attention_plan.h"

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
  m.attr("ATTENTION_MAX_SPLITS") = kAttentionMaxSplits;
}

}  // namespace dlmfuse::bindings
