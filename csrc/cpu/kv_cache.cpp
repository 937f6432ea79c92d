#include "cpu/kv_cache.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/thread_pool.h"
#include "dlmfuse/errors.h"

namespace dlmfuse::cpu {

void kv_scatter_validate(const KvScatterParams& p) {
  std::vector<int64_t> row(static_cast<size_t>(p.n_new));
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t i = 0; i < p.n_new; ++i) {
      row[i] = p.position(b, i);
      if (row[i] < 0 || row[i] >= p.max_len)
        throw_value_error("kv_scatter_: positions[", b, ", ", i, "] = ", row[i],
                          " is outside [0, Lmax=", p.max_len, ")");
    }
    std::sort(row.begin(), row.end());
    const auto dup = std::adjacent_find(row.begin(), row.end());
    if (dup != row.end())
      throw_value_error("kv_scatter_: position ", *dup, " appears more than once in row ", b,
                        " of positions (the write order would be undefined)");
  }
}

void kv_scatter(const KvScatterParams& p) {
  const size_t row_bytes = static_cast<size_t>(p.head_dim * p.element_size);
  // One task per (batch, new row): both K and V of that row, all heads.
  parallel_for(p.batch * p.n_new, [&](int64_t task, int) {
    const int64_t b = task / p.n_new, i = task % p.n_new;
    const int64_t pos = p.position(b, i);
    if (pos < 0 || pos >= p.max_len) return;
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t src_k = b * p.k_new_strides[0] + i * p.k_new_strides[1] + h * p.k_new_strides[2];
      const int64_t src_v = b * p.v_new_strides[0] + i * p.v_new_strides[1] + h * p.v_new_strides[2];
      const int64_t dst_k = b * p.k_cache_strides[0] + pos * p.k_cache_strides[1] + h * p.k_cache_strides[2];
      const int64_t dst_v = b * p.v_cache_strides[0] + pos * p.v_cache_strides[1] + h * p.v_cache_strides[2];
      std::memcpy(static_cast<char*>(p.k_cache) + dst_k * p.element_size,
                  static_cast<const char*>(p.k_new) + src_k * p.element_size, row_bytes);
      std::memcpy(static_cast<char*>(p.v_cache) + dst_v * p.element_size,
                  static_cast<const char*>(p.v_new) + src_v * p.element_size, row_bytes);
    }
  });
}

}  // namespace dlmfuse::cpu
