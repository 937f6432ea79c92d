// CPU entry points of the kv_cache family. Arguments are validated by csrc/bindings.
#pragma once

#include "dlmfuse/kv_cache_params.h"

namespace dlmfuse::cpu {

// Raises ValueError (naming the row, index and value) when a position is outside [0, Lmax)
// or repeated within its row. Reads positions only.
void kv_scatter_validate(const KvScatterParams& params);
// Copies the rows; rows whose position is outside [0, Lmax) are skipped (never written), and with
// params.resolve_duplicates a row whose position repeats later in its row is skipped too.
void kv_scatter(const KvScatterParams& params);

}  // namespace dlmfuse::cpu
