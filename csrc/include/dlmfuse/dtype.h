// Element types the kernels accept, independent of any framework's dtype enum.
#pragma once

#include "dlmfuse/config.h"

namespace dlmfuse {

// kFloat64 is accepted only where an op says so (sampling logits); attention rejects it.
enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

DLMFUSE_INLINE const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

}  // namespace dlmfuse
