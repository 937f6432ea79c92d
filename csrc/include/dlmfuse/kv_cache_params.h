// Arguments of kv_scatter_: write n new K/V rows per sequence at given cache positions, in place.
#pragma once

#include "dlmfuse/config.h"

namespace dlmfuse {

struct KvScatterParams {
  void* k_cache = nullptr;        // [B, Lmax, H, D], written in place
  void* v_cache = nullptr;        // [B, Lmax, H, D]
  const void* k_new = nullptr;    // [B, n, H, D]
  const void* v_new = nullptr;    // [B, n, H, D]
  const void* positions = nullptr;  // [B, n] int32 or int64
  bool positions_int64 = false;
  // Element strides of the batch, row and head dims (the head_dim stride is 1).
  int64_t k_cache_strides[3] = {0, 0, 0};
  int64_t v_cache_strides[3] = {0, 0, 0};
  int64_t k_new_strides[3] = {0, 0, 0};
  int64_t v_new_strides[3] = {0, 0, 0};
  int64_t position_strides[2] = {0, 0};
  int64_t batch = 0, max_len = 0, n_new = 0, heads = 0, head_dim = 0;
  int64_t element_size = 0;  // bytes; the op copies bits, so any dtype works
  // Positions may repeat within a row (validate=False): a repeated position gets only the last of
  // its new rows, whole. False when positions were checked unique (nothing to resolve).
  bool resolve_duplicates = false;

  DLMFUSE_HOST_DEVICE DLMFUSE_INLINE int64_t position(int64_t b, int64_t i) const {
    const int64_t at = b * position_strides[0] + i * position_strides[1];
    return positions_int64 ? static_cast<const int64_t*>(positions)[at]
                           : static_cast<const int32_t*>(positions)[at];
  }
};

}  // namespace dlmfuse
