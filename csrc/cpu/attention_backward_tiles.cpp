// CPU attention backward tile kernel, compiled once per instruction set like the forward.
//
// One task = one key range of one (batch, KV head): for each key tile it walks the query tiles of
// every query head of the GQA group that see it (the forward's tile classification: SKIP tiles
// cost nothing, FULL tiles no per-element test), recomputes P from the saved lse and accumulates,
// in fp32 (FlashAttention-2's backward; units: q pre-scaled by scale * log2 e, P = exp2(S - lse2)):
//   dV_j += P^T dO        dP = dO V_j^T        dS = P * (dP - delta)
//   dK_j += dS^T q        dQ_i += dS K_j       dbias = dS
// The task owns dK / dV of its key tiles and a dQ slice of its key range (the dispatcher adds the
// slices), so no two tasks write the same float.
#include "cpu/attention_tile_math.h"

namespace dlmfuse::cpu::DLMFUSE_CPU_ISA {
namespace {

// The fp32 working set of one task, carved from the caller's scratch buffer.
template <int D>
struct BackwardScratch {
  float* k_rows;   // [N, D] key tile (dQ += dS K)
  float* kt;       // [D, N] key tile transposed (S = q K^T)
  float* vt;       // [D, N] value tile transposed (dP = dO V^T)
  float* dk;       // [N, D] dK accumulator of the key tile
  float* dv;       // [N, D] dV accumulator
  float* q;        // [M, D] queries x scale x log2 e
  float* dout;     // [M, D] output gradient
  float* s;        // [M, N] scores, then P, then dS
  float* dp;       // [M, N]
  float* lse2;     // [M] lse x log2 e (+inf for empty rows: P = 0)
  float* delta;    // [M]
  float* bias_row; // [N]
  int32_t* k_order;  // [N] the key tile's labels
  int32_t* k_group;  // [N]
  int32_t* k_doc;    // [N]

  explicit BackwardScratch(float* base) {
    k_rows = base;
    kt = k_rows + N * D;
    vt = kt + D * N;
    dk = vt + D * N;
    dv = dk + N * D;
    q = dv + N * D;
    dout = q + M * D;
    s = dout + M * D;
    dp = s + M * N;
    lse2 = dp + M * N;
    delta = lse2 + M;
    bias_row = delta + M;
    k_order = reinterpret_cast<int32_t*>(bias_row + N);
    k_group = k_order + N;
    k_doc = k_group + N;
  }
};

static_assert(M == N, "P and P^T share one row stride in pv_tile<D, true>");

template <typename T, int D>
void backward_task_impl(const AttentionBackwardParams& bp, const BackwardPlan& plan, int64_t task, float* scratch) {
  const AttentionParams& p = bp.fwd;
  const AttentionPlan& tiles = plan.tiles;
  BackwardScratch<D> ws(scratch);

  // task -> (batch, KV head, key range); consecutive tasks share the batch and KV head.
  const int64_t split = task % plan.splits;
  const int64_t kv_head = (task / plan.splits) % p.kv_heads;
  const int64_t b = task / (plan.splits * p.kv_heads);
  const int64_t group = tiles.group_size;

  int64_t k_len = p.k_len;
  if (p.kv_lens != nullptr) k_len = vec::max_i64(0, vec::min_i64(p.kv_lens[b], p.k_len));
  const int64_t n_k_tiles = (k_len + N - 1) / N;
  const int64_t per_split = (n_k_tiles + plan.splits - 1) / plan.splits;
  const int64_t first_tile = split * per_split, last_tile = vec::min_i64(n_k_tiles, first_tile + per_split);

  const int head = static_cast<int>(p.head_dim);
  const float q_factor = p.scale * kLog2e;
  const T* k_base = static_cast<const T*>(p.k) + b * p.k_strides[0] + kv_head * p.k_strides[2];
  const T* v_base = static_cast<const T*>(p.v) + b * p.v_strides[0] + kv_head * p.v_strides[2];
  float* grad_q = plan.grad_q_slices + split * p.batch * p.q_heads * plan.q_rows_padded * D;

  // The padding columns (d >= head_dim) of every tile stay zero.
  vec::fill(ws.k_rows, ws.k_rows + N * D, 0.0f);
  vec::fill(ws.kt, ws.kt + D * N, 0.0f);
  vec::fill(ws.vt, ws.vt + D * N, 0.0f);
  vec::fill(ws.q, ws.q + M * D, 0.0f);
  vec::fill(ws.dout, ws.dout + M * D, 0.0f);

  for (int64_t k_tile = first_tile; k_tile < last_tile; ++k_tile) {
    const int64_t k0 = k_tile * N;
    const int cols = static_cast<int>(vec::min_i64(N, k_len - k0));
    for (int j = 0; j < N; ++j) {  // keys past the end load as zeros (their P is 0)
      for (int d = 0; d < head; ++d) {
        const float kv = j < cols ? to_float(k_base[(k0 + j) * p.k_strides[1] + d]) : 0.0f;
        const float vv = j < cols ? to_float(v_base[(k0 + j) * p.v_strides[1] + d]) : 0.0f;
        ws.k_rows[j * D + d] = kv;
        ws.kt[d * N + j] = kv;
        ws.vt[d * N + j] = vv;
      }
      ws.k_order[j] = j < cols && p.has_labels ? p.k_order.at(b, k0 + j) : 0;
      ws.k_group[j] = j < cols && p.has_labels ? p.k_group.at(b, k0 + j) : 0;
      ws.k_doc[j] = j < cols && p.has_docs ? p.k_doc.at(b, k0 + j) : 0;
    }
    const KeyLabels key_labels{ws.k_order, ws.k_group, p.has_docs ? ws.k_doc : nullptr};
    vec::fill(ws.dk, ws.dk + N * D, 0.0f);
    vec::fill(ws.dv, ws.dv + N * D, 0.0f);

    for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
      const T* q_base = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[2];
      const T* do_base = static_cast<const T*>(bp.grad_out) + b * bp.grad_out_strides[0] + h * bp.grad_out_strides[2];
      const float* lse = p.lse + (b * p.q_heads + h) * p.q_len;
      const float* delta = bp.delta + (b * p.q_heads + h) * p.q_len;
      float* grad_q_head = grad_q + (b * p.q_heads + h) * plan.q_rows_padded * D;
      for (int64_t q_tile = 0; q_tile < tiles.n_q_tiles; ++q_tile) {
        TileKind kind = TileKind::kFull;
        if (tiles.q_ranges != nullptr)
          kind = classify_tile(tiles.q_ranges[b * tiles.n_q_tiles + q_tile], tiles.k_ranges[b * tiles.n_k_tiles + k_tile]);
        if (tiles.q_doc_ranges != nullptr)
          kind = within_documents(kind, tiles.q_doc_ranges[b * tiles.n_q_tiles + q_tile],
                                  tiles.k_doc_ranges[b * tiles.n_k_tiles + k_tile]);
        if (kind == TileKind::kSkip) continue;

        const int64_t q0 = q_tile * M;
        const int rows = static_cast<int>(vec::min_i64(M, p.q_len - q0));
        const int rows_padded = (rows + kRows - 1) / kRows * kRows;
        for (int i = 0; i < rows; ++i) {
          load_scaled_row(ws.q + i * D, q_base + (q0 + i) * p.q_strides[1], head, q_factor);
          load_scaled_row(ws.dout + i * D, do_base + (q0 + i) * bp.grad_out_strides[1], head, 1.0f);
          ws.lse2[i] = lse[q0 + i] == -INFINITY ? INFINITY : lse[q0 + i] * kLog2e;
          ws.delta[i] = delta[q0 + i];
        }
        vec::fill(ws.q + rows * D, ws.q + rows_padded * D, 0.0f);
        vec::fill(ws.dout + rows * D, ws.dout + rows_padded * D, 0.0f);

        // P = exp2(S - lse2), 0 where hidden and past the keys.
        qk_tile<D>(ws.q, ws.kt, ws.s, rows_padded);
        for (int i = 0; i < rows; ++i) {
          float* s_row = ws.s + i * N;
          if (ws.lse2[i] == INFINITY) {  // no keys, or taken out of this backward (rows_beyond_float32):
            vec::fill(s_row, s_row + N, 0.0f);  // P = 0, even where a bias beyond float32 made S +inf
            continue;
          }
          if (p.bias != nullptr) add_bias_row(p, b, h, q0 + i, KeySet{nullptr, k0, cols}, ws.bias_row, s_row);
          if (kind == TileKind::kPartial)
            mask_row_by_labels(s_row, key_labels, p.q_order.at(b, q0 + i), p.q_group.at(b, q0 + i),
                               p.has_docs ? p.q_doc.at(b, q0 + i) : 0);
          vec::fill(s_row + cols, s_row + N, -INFINITY);
          const vfloat offset = vec::splat(ws.lse2[i]);
          for (int j = 0; j < N; j += W) vec::store(s_row + j, vec::exp2(vec::load(s_row + j) - offset));
        }
        vec::fill(ws.s + rows * N, ws.s + M * N, 0.0f);

        pv_tile<D, true>(ws.s, ws.dout, ws.dv, N, rows);  // dV += P^T dO

        qk_tile<D>(ws.dout, ws.vt, ws.dp, rows_padded);  // dS = P (dP - delta)
        for (int i = 0; i < rows; ++i) {
          const vfloat d = vec::splat(ws.delta[i]);
          float* s_row = ws.s + i * N;
          const float* dp_row = ws.dp + i * N;
          for (int j = 0; j < N; j += W) vec::store(s_row + j, vec::load(s_row + j) * (vec::load(dp_row + j) - d));
        }
        if (bp.grad_bias != nullptr) {
          for (int i = 0; i < rows; ++i) {
            float* dst = bp.grad_bias + ((b * p.q_heads + h) * p.q_len + q0 + i) * p.k_len + k0;
            for (int j = 0; j < cols; ++j) dst[j] = ws.s[i * N + j];
          }
        }

        pv_tile<D, true>(ws.s, ws.q, ws.dk, N, rows);  // dK += dS^T q (q carries scale x log2 e: undone at the store)
        pv_tile<D>(ws.s, ws.k_rows, grad_q_head + q0 * D, rows_padded, cols);  // dQ += dS K (x scale later)
      }
    }

    // This task owns the key tile: write its gradients (dK back to natural units).
    float* grad_k = bp.grad_k + (b * p.k_len + k0) * p.kv_heads * p.head_dim + kv_head * p.head_dim;
    float* grad_v = bp.grad_v + (b * p.k_len + k0) * p.kv_heads * p.head_dim + kv_head * p.head_dim;
    for (int j = 0; j < cols; ++j) {
      for (int d = 0; d < head; ++d) {
        grad_k[j * p.kv_heads * p.head_dim + d] = ws.dk[j * D + d] * kLn2;
        grad_v[j * p.kv_heads * p.head_dim + d] = ws.dv[j * D + d];
      }
    }
  }
}

template <typename T, int... Widths>
AttentionBackwardTaskFn pick_backward_width(int64_t head_dim) {
  AttentionBackwardTaskFn fn = nullptr;
  ((fn == nullptr && head_dim <= Widths ? (fn = &backward_task_impl<T, Widths>, 0) : 0), ...);
  return fn;
}

}  // namespace

AttentionBackwardTaskFn attention_backward_task_fn(DType dtype, int64_t head_dim) {
  switch (dtype) {
    case DType::kFloat32: return pick_backward_width<float, DLMFUSE_ATTENTION_TILE_DIMS>(head_dim);
    case DType::kBFloat16: return pick_backward_width<bf16_t, DLMFUSE_ATTENTION_TILE_DIMS>(head_dim);
    case DType::kFloat16: return pick_backward_width<fp16_t, DLMFUSE_ATTENTION_TILE_DIMS>(head_dim);
  }
  return nullptr;
}

}  // namespace dlmfuse::cpu::DLMFUSE_CPU_ISA
