#include "cpu/kv_cache.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
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

namespace {

// Rows per task: enough bytes per task that the pool's hand-off is noise (a row is K and V of
// all heads, e.g. 8 KiB for 8 heads x 128 x fp32).
constexpr int64_t kScatterBytesPerTask = 64 * 1024;

// superseded[b * n + i]: positions[b, i] appears again later in row b (only the last one is
// written, so that two tasks never copy into one slot at once).
std::vector<uint8_t> superseded_rows(const KvScatterParams& p) {
  std::vector<uint8_t> superseded(static_cast<size_t>(p.batch * p.n_new), 0);
  std::vector<std::pair<int64_t, int64_t>> row(static_cast<size_t>(p.n_new));  // (position, i)
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t i = 0; i < p.n_new; ++i) row[i] = {p.position(b, i), i};
    std::sort(row.begin(), row.end());
    for (int64_t i = 0; i + 1 < p.n_new; ++i)
      if (row[i].first == row[i + 1].first) superseded[b * p.n_new + row[i].second] = 1;
  }
  return superseded;
}

// K and V of new row i of sequence b, all heads; skipped when its position is out of range.
void copy_row(const KvScatterParams& p, size_t row_bytes, int64_t b, int64_t i) {
  const int64_t pos = p.position(b, i);
  if (pos < 0 || pos >= p.max_len) return;
  char* k_cache = static_cast<char*>(p.k_cache);
  char* v_cache = static_cast<char*>(p.v_cache);
  const char* k_new = static_cast<const char*>(p.k_new);
  const char* v_new = static_cast<const char*>(p.v_new);
  for (int64_t h = 0; h < p.heads; ++h) {
    const int64_t src_k = b * p.k_new_strides[0] + i * p.k_new_strides[1] + h * p.k_new_strides[2];
    const int64_t src_v = b * p.v_new_strides[0] + i * p.v_new_strides[1] + h * p.v_new_strides[2];
    const int64_t dst_k = b * p.k_cache_strides[0] + pos * p.k_cache_strides[1] + h * p.k_cache_strides[2];
    const int64_t dst_v = b * p.v_cache_strides[0] + pos * p.v_cache_strides[1] + h * p.v_cache_strides[2];
    std::memcpy(k_cache + dst_k * p.element_size, k_new + src_k * p.element_size, row_bytes);
    std::memcpy(v_cache + dst_v * p.element_size, v_new + src_v * p.element_size, row_bytes);
  }
}

}  // namespace

void kv_scatter(const KvScatterParams& p) {
  const size_t row_bytes = static_cast<size_t>(p.head_dim * p.element_size);
  const int64_t rows = p.batch * p.n_new;
  const int64_t bytes_per_row = std::max<int64_t>(1, 2 * p.heads * static_cast<int64_t>(row_bytes));
  const int64_t rows_per_task = std::max<int64_t>(1, kScatterBytesPerTask / bytes_per_row);
  const std::vector<uint8_t> superseded = p.resolve_duplicates ? superseded_rows(p) : std::vector<uint8_t>();
  // Each task copies rows_per_task consecutive (batch, new row) pairs.
  parallel_for((rows + rows_per_task - 1) / rows_per_task, [&](int64_t task, int) {
    const int64_t end = std::min(rows, (task + 1) * rows_per_task);
    for (int64_t row = task * rows_per_task; row < end; ++row)
      if (superseded.empty() || !superseded[row]) copy_row(p, row_bytes, row / p.n_new, row % p.n_new);
  });
}

}  // namespace dlmfuse::cpu
