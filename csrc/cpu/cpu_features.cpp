#include "cpu/cpu_features.h"

#include <atomic>
#include <cstdlib>

#include "dlmfuse/errors.h"

namespace dlmfuse::cpu {
namespace {

bool compiled(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kBaseline: return true;
#if defined(DLMFUSE_HAVE_ISA_AVX2)
    case CpuIsa::kAvx2: return true;
#endif
#if defined(DLMFUSE_HAVE_ISA_AVX512)
    case CpuIsa::kAvx512: return true;
#endif
    default: return false;
  }
}

bool supported_by_cpu(CpuIsa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  switch (isa) {
    case CpuIsa::kBaseline: return true;
    case CpuIsa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case CpuIsa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return isa == CpuIsa::kBaseline;
#endif
}

bool usable(CpuIsa isa) { return compiled(isa) && supported_by_cpu(isa); }

CpuIsa parse(const std::string& name) {
  if (name == "baseline") return CpuIsa::kBaseline;
  if (name == "avx2") return CpuIsa::kAvx2;
  if (name == "avx512") return CpuIsa::kAvx512;
  throw_value_error("cpu isa: unknown name '", name, "' (expected baseline, avx2 or avx512)");
}

CpuIsa best_usable() {
  if (const char* env = std::getenv("DLMFUSE_CPU_ISA")) {
    const CpuIsa requested = parse(env);
    if (usable(requested)) return requested;
  }
  if (usable(CpuIsa::kAvx512)) return CpuIsa::kAvx512;
  if (usable(CpuIsa::kAvx2)) return CpuIsa::kAvx2;
  return CpuIsa::kBaseline;
}

std::atomic<int> g_isa{-1};  // -1 = not chosen yet

}  // namespace

CpuIsa active_cpu_isa() {
  int isa = g_isa.load();
  if (isa < 0) {
    isa = static_cast<int>(best_usable());
    g_isa.store(isa);
  }
  return static_cast<CpuIsa>(isa);
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kBaseline: return "baseline";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
  }
  return "unknown";
}

void set_cpu_isa(const std::string& name) {
  const CpuIsa isa = parse(name);
  if (!compiled(isa)) throw_value_error("cpu isa: '", name, "' is not compiled into this build (compiled: ", compiled_cpu_isas(), ")");
  if (!supported_by_cpu(isa)) throw_value_error("cpu isa: '", name, "' is not supported by this CPU");
  g_isa.store(static_cast<int>(isa));
}

const char* compiled_cpu_isas() { return DLMFUSE_CPU_ISA_LIST; }

}  // namespace dlmfuse::cpu
