#include "cpu/cpu_features.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

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

#if defined(__x86_64__)
// CPUID and XGETBV read directly: __builtin_cpu_supports depends on the runtime library having
// initialised its CPU model, which a clang/zig-linked shared library (the wheels) does not do.
struct X86Features {
  bool avx2 = false, avx512 = false;
};

X86Features read_x86_features() {
  X86Features f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!osxsave || !avx) return f;
  uint32_t xcr0_lo = 0, xcr0_hi = 0;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool os_ymm = (xcr0_lo & 0x6u) == 0x6u;     // SSE and AVX state saved by the OS
  const bool os_zmm = (xcr0_lo & 0xE6u) == 0xE6u;   // and opmask, ZMM_Hi256, Hi16_ZMM
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512dq = b & (1u << 17);
  const bool avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  f.avx2 = os_ymm && avx2 && fma && f16c;
  f.avx512 = f.avx2 && os_zmm && avx512f && avx512dq && avx512bw && avx512vl;
  return f;
}
#endif

bool supported_by_cpu(CpuIsa isa) {
#if defined(__x86_64__)
  static const X86Features features = read_x86_features();
  switch (isa) {
    case CpuIsa::kBaseline: return true;
    case CpuIsa::kAvx2: return features.avx2;
    case CpuIsa::kAvx512: return features.avx512;
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
