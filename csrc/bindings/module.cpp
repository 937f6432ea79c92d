// The CPU extension module dlmfuse._C: build facts, exception translation, op registration.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "bindings/attention_args.h"
#include "bindings/tensor_checks.h"
#include "cpu/cpu_features.h"
#include "cpu/thread_pool.h"
#include "dlmfuse/attention_params.h"
#include "dlmfuse/config.h"
#include "dlmfuse/errors.h"

namespace nb = nanobind;

namespace dlmfuse::bindings {
void register_attention(nb::module_& m);
void register_kv_cache(nb::module_& m);
void register_sampling(nb::module_& m);
}  // namespace dlmfuse::bindings

NB_MODULE(_C, m) {
  using namespace dlmfuse;
  bindings::register_error_translator();

  m.attr("__version__") = DLMFUSE_VERSION;
  m.attr("ORDER_INFINITY") = kOrderInfinity;
  m.attr("ATTENTION_TILE_DIMS") = nb::make_tuple(DLMFUSE_ATTENTION_TILE_DIMS);
  m.attr("ATTENTION_MAX_HEAD_DIM") = kAttentionMaxHeadDim;
  m.attr("COMPILED_CPU_ISAS") = cpu::compiled_cpu_isas();

  m.def("cpu_isa", [] { return std::string(cpu::cpu_isa_name(cpu::active_cpu_isa())); },
        "The instruction-set variant of the CPU kernels in use (baseline, avx2, avx512).");
  m.def("set_cpu_isa", &cpu::set_cpu_isa, nb::arg("name"),
        "Force a compiled CPU kernel variant (for tests and benchmarks).");
  m.def("num_threads", &cpu::num_threads, "Threads used by the CPU kernels.");
  m.def("max_threads", &cpu::max_threads, "The bound on the CPU threads: the hardware thread count.");
  m.def(
      "set_num_threads",
      [](int n) {
        const int in_effect = cpu::set_num_threads(n);
        if (in_effect < n &&
            PyErr_WarnFormat(PyExc_RuntimeWarning, 1,
                             "dlmfuse: set_num_threads(%d) clamped to %d, the hardware thread count", n, in_effect) != 0)
          throw nb::python_error();  // warnings turned into errors
        return in_effect;
      },
      nb::arg("n"),
      "Set the threads used by the CPU kernels; clamped (with a RuntimeWarning) to max_threads(). "
      "Returns the count in effect.");

  bindings::register_attention(m);
  bindings::register_attention_plan(m);
  bindings::register_kv_cache(m);
  bindings::register_sampling(m);
}
