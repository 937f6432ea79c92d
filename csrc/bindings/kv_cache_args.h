// Checks the arguments of kv_scatter_ and fills KvScatterParams (shared by the CPU and CUDA
// modules). All arrays must live on `device_type`.
#pragma once

#include "bindings/tensor_checks.h"
#include "dlmfuse/kv_cache_params.h"

namespace dlmfuse::bindings {

KvScatterParams kv_scatter_params(const Array& k_cache, const Array& v_cache, const Array& k_new,
                                  const Array& v_new, const Array& positions, int32_t device_type);

}  // namespace dlmfuse::bindings
