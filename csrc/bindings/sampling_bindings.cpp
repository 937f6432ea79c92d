// nanobind entry point of the sampling family (CPU). Python flattens logits to [rows, V],
// allocates tokens / confidence and validates the options; sampling_args.cpp re-checks what
// memory safety depends on.
#include "bindings/sampling_args.h"
#include "cpu/sampling.h"

namespace dlmfuse::bindings {
namespace {

void sample_tokens(Array logits, double temperature, int64_t top_k, double top_p,
                   std::optional<Array> suppressed, uint64_t seed, uint64_t offset,
                   uint64_t column_offset, int confidence_kind, bool tempered_confidence, Array tokens,
                   Array confidence, std::optional<Array> stats) {
  const SamplingParams p =
      sampling_params(logits, temperature, top_k, top_p, suppressed, seed, offset, column_offset,
                      confidence_kind, tempered_confidence, tokens, confidence, stats, nb::device::cpu::value);
  nb::gil_scoped_release release;
  cpu::sample_tokens(p);
}

}  // namespace
void register_sampling(nb::module_& m) {
  m.def("sample_tokens", &sample_tokens, nb::arg("logits"), nb::arg("temperature"),
        nb::arg("top_k"), nb::arg("top_p"), nb::arg("suppressed").none(), nb::arg("seed"),
        nb::arg("offset"), nb::arg("column_offset"), nb::arg("confidence_kind"),
        nb::arg("tempered_confidence"),
        nb::arg("tokens").noconvert(), nb::arg("confidence").noconvert(), nb::arg("stats").noconvert().none(),
        "Fills tokens [rows], confidence [rows] and, when given, stats [rows, 4] (CPU). Use dlmfuse.sample_tokens.");
  m.attr("CONFIDENCE_KINDS") = nb::make_tuple("prob", "margin", "neg_entropy", "logit");
}

}  // namespace dlmfuse::bindings
