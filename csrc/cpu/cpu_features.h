// Which compiled instruction-set variant of the CPU kernels runs (see CMakeLists.txt).
#pragma once

#include <string>

namespace dlmfuse::cpu {

enum class CpuIsa { kBaseline, kAvx2, kAvx512 };

// The best variant that is both compiled in and supported by this CPU, unless overridden by
// set_cpu_isa() or the environment variable DLMFUSE_CPU_ISA (baseline | avx2 | avx512).
CpuIsa active_cpu_isa();
const char* cpu_isa_name(CpuIsa isa);
// Raises ValueError for an unknown name, or one not compiled in / not supported by this CPU.
void set_cpu_isa(const std::string& name);
// Comma-separated variants compiled into this build.
const char* compiled_cpu_isas();

}  // namespace dlmfuse::cpu
