// CPU attention tile kernel. Compiled once per instruction set (CMakeLists.txt sets
// DLMFUSE_CPU_ISA and the -m flags); everything here lives in that ISA's namespace.
//
// One task = 64 query rows of one (batch, head). It walks the key tiles of its row range,
// classifies each from the label min/max (skip / full / partial, dlmfuse/visibility.h), and runs
// a flash-attention style online softmax in base 2 with fp32 accumulation:
//   S = (Q * scale * log2e) K^T + bias * log2e;  masked -> -inf;  P = exp2(S - m);  O += P V.
// FULL tiles run as they are. The keys of PARTIAL tiles are classified one by one (classify_key)
// and gathered: keys every row sees fill FULL tiles (no per-element test), keys some row sees
// fill PARTIAL tiles, the others are dropped. A mask-only step (clean keys scattered, masked
// queries that see the clean keys and themselves) thus computes about the visible keys only.
#include "cpu/attention_tiles.h"

#include <algorithm>

#include "cpu/attention_tile_math.h"
#include "dlmfuse/half_convert.h"
#include "dlmfuse/online_softmax.h"

namespace dlmfuse::cpu::DLMFUSE_CPU_ISA {
namespace {

// The fp32 working set of one task, carved from the caller's scratch buffer.
template <int D>
struct TileScratch {
  float* q;          // [M, D] queries pre-multiplied by scale * log2 e
  float* o;          // [M, D] unnormalised output accumulator
  float* kt;         // [D, N] key tile, transposed so the QK^T micro-kernel reads rows
  float* v;          // [N, D] value tile
  float* s;          // [M, N] scores, then probabilities
  float* bias_row;   // [N]
  float* row_max;    // [M] running max (log2 units)
  float* row_sum;    // [M] running sum of exp2
  int32_t* k_order;  // [N] labels of the keys gathered for a PARTIAL tile
  int32_t* k_group;  // [N]
  int32_t* k_doc;    // [N] their documents (packed sequences)
  int32_t* tile_order;  // [N] labels of a PARTIAL tile run as it is
  int32_t* tile_group;  // [N]
  int32_t* tile_doc;    // [N]
  int32_t* q_groups;     // [M] the query rows' groups, ascending (classify_key)
  int32_t* overflow;     // [M] 1 where a raw score of the row overflowed float32 (+-inf or NaN)
  int64_t* full_keys;    // [N] keys gathered for a FULL tile
  int64_t* partial_keys; // [N] keys gathered for a PARTIAL tile

  explicit TileScratch(float* base) {
    q = base;
    o = q + M * D;
    kt = o + M * D;
    v = kt + D * N;
    s = v + N * D;
    bias_row = s + M * N;
    row_max = bias_row + N;
    row_sum = row_max + M;
    k_order = reinterpret_cast<int32_t*>(row_sum + M);
    k_group = k_order + N;
    k_doc = k_group + N;
    tile_order = k_doc + N;
    tile_group = tile_order + N;
    tile_doc = tile_group + N;
    q_groups = tile_doc + N;
    overflow = q_groups + M;
    // 8-byte alignment: the float offset so far is even (M, N, D are multiples of 8).
    full_keys = reinterpret_cast<int64_t*>(overflow + M);
    partial_keys = full_keys + N;
  }
};


// Whether every score of a row is finite (x - x is 0 exactly for finite x, NaN otherwise).
inline bool all_finite(const float* s_row) {
  vfloat acc = {};
  for (int j = 0; j < N; j += W) {
    const vfloat x = vec::load(s_row + j);
    acc += x - x;
  }
  return vec::reduce_sum(acc) == 0.0f;
}

// Online-softmax update of one row: scores -> probabilities in place; returns the rescale factor
// for the row's output accumulator.
float softmax_update_row(float* s_row, float& row_max, float& row_sum) {
  vfloat vmax = vec::splat(-INFINITY);
  for (int j = 0; j < N; j += W) {
    const vfloat x = vec::load(s_row + j);
    vmax = x > vmax ? x : vmax;
  }
  const float tile_max = vec::reduce_max(vmax);
  const float m_new = tile_max > row_max ? tile_max : row_max;
  const vfloat offset = vec::splat(softmax_offset(m_new));
  vfloat vsum = {};
  for (int j = 0; j < N; j += W) {
    const vfloat e = vec::exp2(vec::load(s_row + j) - offset);
    vec::store(s_row + j, e);
    vsum += e;
  }
  const float alpha = softmax_rescale(row_max, m_new);
  row_sum = row_sum * alpha + vec::reduce_sum(vsum);
  row_max = m_new;
  return alpha;
}

// One task's fixed inputs (a query tile of one (batch, head)).
template <typename T>
struct TaskView {
  const AttentionParams& p;
  int64_t b, h, q0;
  int rows, rows_padded, head;  // query rows, rounded up to the register block; head_dim
  const T* k_base;
  const T* v_base;
};

// S, masking, online softmax and O += P V for one tile of keys: keys k0 .. k0 + cols - 1
// (kGathered false) or keys[0 .. cols) (true). kind FULL, or PARTIAL with the keys' labels.
// A template, not a lambda: the contiguous instance compiles to the loops of the kernel before
// gathering (5% faster on dense tiles than the lambda was).
template <typename T, int D, bool kGathered>
void run_tile(const TaskView<T>& t, TileScratch<D>& ws, const int64_t* keys, int64_t k0, int cols,
              TileKind kind, KeyLabels labels = {}) {
  const AttentionParams& p = t.p;
  for (int j = 0; j < cols; ++j) {
    const T* k_row = t.k_base + (kGathered ? keys[j] : k0 + j) * p.k_strides[1];
    for (int d = 0; d < t.head; ++d) ws.kt[d * N + j] = to_float(k_row[d]);
  }
  for (int d = 0; d < t.head && cols < N; ++d) vec::fill(ws.kt + d * N + cols, ws.kt + d * N + N, 0.0f);
  qk_tile<D>(ws.q, ws.kt, ws.s, t.rows_padded);

  for (int i = 0; i < t.rows; ++i) {
    float* s_row = ws.s + i * N;
    ws.overflow[i] |= !all_finite(s_row);  // before the bias and the mask add their own infinities
    if (p.bias != nullptr)
      add_bias_row(p, t.b, t.h, t.q0 + i, KeySet{kGathered ? keys : nullptr, k0, cols}, ws.bias_row, s_row);
    if (kind == TileKind::kPartial)
      mask_row_by_labels(s_row, labels, p.q_order.at(t.b, t.q0 + i), p.q_group.at(t.b, t.q0 + i),
                         p.has_docs ? p.q_doc.at(t.b, t.q0 + i) : 0);
    vec::fill(s_row + cols, s_row + N, -INFINITY);  // keys past the end (kv_lens, Lk, gathered count)
    const float alpha = softmax_update_row(s_row, ws.row_max[i], ws.row_sum[i]);
    if (alpha != 1.0f) {
      const vfloat va = vec::splat(alpha);
      for (int d = 0; d < D; d += W) vec::store(ws.o + i * D + d, vec::load(ws.o + i * D + d) * va);
    }
  }
  vec::fill(ws.s + t.rows * N, ws.s + t.rows_padded * N, 0.0f);  // padding rows contribute nothing

  for (int j = 0; j < cols; ++j)
    load_scaled_row(ws.v + j * D, t.v_base + (kGathered ? keys[j] : k0 + j) * p.v_strides[1], t.head, 1.0f);
  pv_tile<D>(ws.s, ws.v, ws.o, t.rows_padded, cols);
}

template <typename T, int D>
void attention_task_impl(const AttentionParams& p, const AttentionPlan& plan, int64_t task,
                         float* scratch) {
  TileScratch<D> ws(scratch);

  // task -> (b, kv head, query tile, head within the GQA group); consecutive tasks share K/V.
  const int64_t group = plan.group_size;
  const int64_t head_in_group = task % group;
  int64_t rest = task / group;
  const int64_t q_tile = rest % plan.n_q_tiles;
  rest /= plan.n_q_tiles;
  const int64_t kv_head = rest % p.kv_heads;
  const int64_t b = rest / p.kv_heads;
  const int64_t h = kv_head * group + head_in_group;

  const int64_t q0 = q_tile * M;
  const int rows = static_cast<int>(vec::min_i64(M, p.q_len - q0));
  const int rows_padded = (rows + kRows - 1) / kRows * kRows;

  int64_t k_len = p.k_len;
  if (p.kv_lens != nullptr) k_len = vec::max_i64(0, vec::min_i64(p.kv_lens[b], p.k_len));
  const int64_t n_k_tiles = (k_len + N - 1) / N;

  const T* q_base = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[2];
  // The tile width D may exceed head_dim: the padding columns of Q, K^T and V stay zero, so
  // they add nothing to Q K^T and their outputs are never stored.
  const int head = static_cast<int>(p.head_dim);
  const TaskView<T> t{p, b, h, q0, rows, rows_padded, head,
                      static_cast<const T*>(p.k) + b * p.k_strides[0] + kv_head * p.k_strides[2],
                      static_cast<const T*>(p.v) + b * p.v_strides[0] + kv_head * p.v_strides[2]};

  const float q_factor = p.scale * kLog2e;
  vec::fill(ws.q, ws.q + rows_padded * D, 0.0f);
  for (int i = 0; i < rows; ++i)
    load_scaled_row(ws.q + i * D, q_base + (q0 + i) * p.q_strides[1], head, q_factor);
  if (head < D) {
    vec::fill(ws.kt + head * N, ws.kt + D * N, 0.0f);
    vec::fill(ws.v, ws.v + N * D, 0.0f);
  }
  vec::fill(ws.o, ws.o + rows_padded * D, 0.0f);
  vec::fill(ws.row_max, ws.row_max + M, -INFINITY);
  vec::fill(ws.row_sum, ws.row_sum + M, 0.0f);
  vec::fill(ws.overflow, ws.overflow + M, 0);

  const LabelRange* q_range = plan.q_ranges ? plan.q_ranges + b * plan.n_q_tiles + q_tile : nullptr;
  const IdRange* q_docs = plan.q_doc_ranges ? plan.q_doc_ranges + b * plan.n_q_tiles + q_tile : nullptr;
  int32_t* const gathered_doc = q_docs != nullptr ? ws.k_doc : nullptr;  // documents stored only when read
  if (q_range != nullptr) {  // the rows' groups, ascending, for classify_key
    for (int i = 0; i < rows; ++i) ws.q_groups[i] = p.q_group.at(b, q0 + i);
    std::sort(ws.q_groups, ws.q_groups + rows);
  }

  // Keys of PARTIAL tiles gathered by kind; a gathered tile runs as soon as it holds N keys.
  int n_full = 0, n_partial = 0;
  auto run_full = [&] {
    run_tile<T, D, true>(t, ws, ws.full_keys, 0, n_full, TileKind::kFull);
    n_full = 0;
  };
  auto run_partial = [&] {
    vec::fill(ws.k_order + n_partial, ws.k_order + N, 0);  // (read by the vector test, then hidden)
    vec::fill(ws.k_group + n_partial, ws.k_group + N, 0);
    vec::fill(ws.k_doc + n_partial, ws.k_doc + N, 0);
    run_tile<T, D, true>(t, ws, ws.partial_keys, 0, n_partial, TileKind::kPartial,
                         KeyLabels{ws.k_order, ws.k_group, gathered_doc});
    n_partial = 0;
  };

  // Gathering pays where keys are hidden from every row; where the first 4 tiles' worth of
  // classified keys hid fewer than 1 in 16 (Eso-LM, causal diagonals), the task's other PARTIAL
  // tiles run as they are (the classification had cost 3-4% on such masks).
  bool gathering = true;
  int64_t classified = 0, hidden = 0;
  for (int64_t k_tile = 0; k_tile < n_k_tiles; ++k_tile) {
    const int64_t k0 = k_tile * N;
    const int cols = static_cast<int>(vec::min_i64(N, k_len - k0));
    TileKind kind = TileKind::kFull;
    if (q_range != nullptr)
      kind = classify_tile(*q_range, plan.k_ranges[b * plan.n_k_tiles + k_tile]);
    if (q_docs != nullptr) kind = within_documents(kind, *q_docs, plan.k_doc_ranges[b * plan.n_k_tiles + k_tile]);
    if (kind == TileKind::kSkip) continue;
    if (kind == TileKind::kFull) {
      run_tile<T, D, false>(t, ws, nullptr, k0, cols, TileKind::kFull);
      continue;
    }
    if (!gathering) {
      for (int j = 0; j < cols; ++j) {
        ws.tile_order[j] = p.k_order.at(b, k0 + j);
        ws.tile_group[j] = p.k_group.at(b, k0 + j);
        ws.tile_doc[j] = q_docs != nullptr ? p.k_doc.at(b, k0 + j) : 0;
      }
      vec::fill(ws.tile_order + cols, ws.tile_order + N, 0);
      vec::fill(ws.tile_group + cols, ws.tile_group + N, 0);
      vec::fill(ws.tile_doc + cols, ws.tile_doc + N, 0);
      run_tile<T, D, false>(t, ws, nullptr, k0, cols, TileKind::kPartial,
                            KeyLabels{ws.tile_order, ws.tile_group, q_docs != nullptr ? ws.tile_doc : nullptr});
      continue;
    }
    // Appends without branches on the kind (each list has room for one more key until it runs).
    for (int j = 0; j < cols; ++j) {
      const int32_t order = p.k_order.at(b, k0 + j), group = p.k_group.at(b, k0 + j);
      TileKind key_kind = classify_key(*q_range, ws.q_groups, rows, order, group);
      int32_t doc = 0;
      if (q_docs != nullptr) {
        doc = p.k_doc.at(b, k0 + j);
        key_kind = key_within_documents(key_kind, *q_docs, doc);
      }
      ws.full_keys[n_full] = k0 + j;
      n_full += key_kind == TileKind::kFull;
      ws.partial_keys[n_partial] = k0 + j;
      ws.k_order[n_partial] = order;
      ws.k_group[n_partial] = group;
      ws.k_doc[n_partial] = doc;
      n_partial += key_kind == TileKind::kPartial;
      hidden += key_kind == TileKind::kSkip;
      if (n_full == N) run_full();
      if (n_partial == N) run_partial();
    }
    classified += cols;
    if (classified >= 4 * N && hidden * 16 < classified) gathering = false;
  }
  // The remainders: one PARTIAL tile when both fit in it (a FULL key passes the test anyway),
  // so that ragged ends cost one tile, not two.
  if (n_full > 0 && n_partial > 0 && n_full + n_partial <= N) {
    for (int j = 0; j < n_full; ++j) {
      const int64_t key = ws.full_keys[j];
      ws.partial_keys[n_partial] = key;
      ws.k_order[n_partial] = p.k_order.at(b, key);
      ws.k_group[n_partial] = p.k_group.at(b, key);
      ws.k_doc[n_partial++] = q_docs != nullptr ? p.k_doc.at(b, key) : 0;
    }
    n_full = 0;
  }
  if (n_full > 0) run_full();
  if (n_partial > 0) run_partial();

  T* out_base = static_cast<T*>(p.out) + b * p.out_strides[0] + h * p.out_strides[2];
  float* lse_row = p.lse + (b * p.q_heads + h) * p.q_len + q0;
  for (int i = 0; i < rows; ++i) {
    // Scores beyond float32 (q.k overflowed to +-inf, or inf - inf, or a finite bias did: a row that
    // ends without a finite score although its bias row holds one): redo the row in float64.
    const bool empty_despite_bias =
        p.bias != nullptr && ws.row_sum[i] == 0.0f && row_has_finite_bias(p, b, h, q0 + i, k_len);
    if (ws.overflow[i] || softmax_broke(ws.row_max[i], ws.row_sum[i]) || empty_despite_bias) {
      attention_row_exact(p, b, h, q0 + i);
      continue;
    }
    const float inv_sum = softmax_inv_sum(ws.row_sum[i]);
    T* out_row = out_base + (q0 + i) * p.out_strides[1];
    for (int d = 0; d < head; ++d) out_row[d] = from_float<T>(ws.o[i * D + d] * inv_sum);
    lse_row[i] = softmax_lse(ws.row_max[i], ws.row_sum[i]);
  }
}

// The kernel of the narrowest tile width that holds head_dim (widths listed in increasing order).
template <typename T, int... Widths>
AttentionTaskFn pick_tile_width(int64_t head_dim) {
  AttentionTaskFn fn = nullptr;
  ((fn == nullptr && head_dim <= Widths ? (fn = &attention_task_impl<T, Widths>, 0) : 0), ...);
  return fn;
}

}  // namespace

AttentionTaskFn attention_task_fn(DType dtype, int64_t head_dim) {
  switch (dtype) {
    case DType::kFloat32: return pick_tile_width<float, DLMFUSE_ATTENTION_TILE_DIMS>(head_dim);
    case DType::kBFloat16: return pick_tile_width<bf16_t, DLMFUSE_ATTENTION_TILE_DIMS>(head_dim);
    case DType::kFloat16: return pick_tile_width<fp16_t, DLMFUSE_ATTENTION_TILE_DIMS>(head_dim);
  }
  return nullptr;
}

}  // namespace dlmfuse::cpu::DLMFUSE_CPU_ISA
