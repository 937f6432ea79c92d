// The CPU extension module dlmfuse._C: build facts, exception translation, op registration.
#include <nanobind/nanobind.h>

#include <atomic>
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
  // For tests of the pool's error path: parallel_for over n_tasks where task `failing` throws a
  // ValueError; returns how many tasks ran (all of them when none fails).
  m.def(
      "_parallel_for_check",
      [](int64_t n_tasks, int64_t failing) {
        std::atomic<int64_t> ran{0};
        {
          nb::gil_scoped_release release;
          cpu::parallel_for(n_tasks, [&](int64_t task, int) {
            if (task == failing) throw_value_error("_parallel_for_check: task ", task, " failed on purpose");
            ran.fetch_add(1);
          });
        }
        return ran.load();
      },
      nb::arg("n_tasks"), nb::arg("failing") = -1);
  m.def("set_num_threads", &cpu::set_num_threads, nb::arg("n"),
        "Set the threads used by the CPU kernels, clamped to max_threads(); returns the count in effect "
        "(dlmfuse.set_num_threads validates and warns).");

  bindings::register_attention(m);
  bindings::register_attention_plan(m);
  bindings::register_attention_planner(m);
  bindings::register_kv_cache(m);
  bindings::register_sampling(m);
}
