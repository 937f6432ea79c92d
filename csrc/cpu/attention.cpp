// CPU attention dispatcher: label tile summaries, kernel selection, threading.
#include "cpu/attention.h"

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <vector>

#include "cpu/attention_tiles.h"
#include "cpu/cpu_features.h"
#include "cpu/thread_pool.h"
#include "dlmfuse/dispatch.h"
#include "dlmfuse/online_softmax.h"

namespace dlmfuse::cpu {
namespace {

// Min/max of the labels of every tile of `tile` rows, for each batch: out[b * n_tiles + t].
std::vector<LabelRange> tile_ranges(const LabelView& order, const LabelView& group, int64_t batch,
                                    int64_t len, int64_t tile) {
  const int64_t n_tiles = (len + tile - 1) / tile;
  std::vector<LabelRange> ranges(static_cast<size_t>(batch * n_tiles), LabelRange::empty());
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < len; ++i)
      ranges[b * n_tiles + i / tile].add(order.at(b, i), group.at(b, i));
  return ranges;
}

// Min/max of the document ids of every tile of `tile` rows, for each batch.
std::vector<IdRange> tile_id_ranges(const LabelView& ids, int64_t batch, int64_t len, int64_t tile) {
  const int64_t n_tiles = (len + tile - 1) / tile;
  std::vector<IdRange> ranges(static_cast<size_t>(batch * n_tiles), IdRange::empty());
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < len; ++i) ranges[b * n_tiles + i / tile].add(ids.at(b, i));
  return ranges;
}

// The kernels of the active instruction set for (dtype, head_dim).
AttentionTaskFn forward_kernel(const AttentionParams& p) {
  switch (active_cpu_isa()) {
#if defined(DLMFUSE_HAVE_ISA_AVX512)
    case CpuIsa::kAvx512: return avx512::attention_task_fn(p.dtype, p.head_dim);
#endif
#if defined(DLMFUSE_HAVE_ISA_AVX2)
    case CpuIsa::kAvx2: return avx2::attention_task_fn(p.dtype, p.head_dim);
#endif
    default: return baseline::attention_task_fn(p.dtype, p.head_dim);
  }
}

AttentionBackwardTaskFn backward_kernel(const AttentionParams& p) {
  switch (active_cpu_isa()) {
#if defined(DLMFUSE_HAVE_ISA_AVX512)
    case CpuIsa::kAvx512: return avx512::attention_backward_task_fn(p.dtype, p.head_dim);
#endif
#if defined(DLMFUSE_HAVE_ISA_AVX2)
    case CpuIsa::kAvx2: return avx2::attention_backward_task_fn(p.dtype, p.head_dim);
#endif
    default: return baseline::attention_backward_task_fn(p.dtype, p.head_dim);
  }
}

// The tile summaries of one call, and the plan that points into them.
struct TilePlan {
  AttentionPlan plan;
  std::vector<LabelRange> q_ranges, k_ranges;
  std::vector<IdRange> q_doc_ranges, k_doc_ranges;

  explicit TilePlan(const AttentionParams& p) {
    plan.n_q_tiles = (p.q_len + kAttnTileM - 1) / kAttnTileM;
    plan.n_k_tiles = (p.k_len + kAttnTileN - 1) / kAttnTileN;
    plan.group_size = p.q_heads / p.kv_heads;
    if (p.has_labels) {
      q_ranges = tile_ranges(p.q_order, p.q_group, p.batch, p.q_len, kAttnTileM);
      k_ranges = tile_ranges(p.k_order, p.k_group, p.batch, p.k_len, kAttnTileN);
      plan.q_ranges = q_ranges.data();
      plan.k_ranges = k_ranges.data();
    }
    if (p.has_docs) {
      q_doc_ranges = tile_id_ranges(p.q_doc, p.batch, p.q_len, kAttnTileM);
      k_doc_ranges = tile_id_ranges(p.k_doc, p.batch, p.k_len, kAttnTileN);
      plan.q_doc_ranges = q_doc_ranges.data();
      plan.k_doc_ranges = k_doc_ranges.data();
    }
  }
};

// Loud errors for values without a compiled kernel (the bindings check them first too).
void check_kernel_args(const AttentionParams& p) {
  dispatch_dtype(p.dtype, "attention", [](auto) {});
  if (p.head_dim < 1 || p.head_dim > kAttentionMaxHeadDim)
    throw_value_error("attention: head_dim=", p.head_dim, " unsupported (supported: 1 to ",
                      kAttentionMaxHeadDim, ")");
}

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};

constexpr int64_t kZeroChunk = 1 << 20;  // floats zeroed per task

// Float buffer of `floats` floats, 64-byte aligned (slices of multiples of 16 floats stay aligned).
std::unique_ptr<float, AlignedFree> aligned_floats(size_t floats, const char* what) {
  std::unique_ptr<float, AlignedFree> buffer(static_cast<float*>(std::aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64)));
  if (!buffer) throw_runtime_error("attention: could not allocate ", floats * sizeof(float), " bytes of ", what);
  return buffer;
}

size_t padded_to_16(size_t floats) { return (floats + 15) / 16 * 16; }

}  // namespace

void attention_forward(const AttentionParams& p) {
  check_kernel_args(p);
  const AttentionTaskFn kernel = forward_kernel(p);
  const TilePlan tiles(p);
  const int64_t n_tasks = attention_task_count(p, tiles.plan);
  if (n_tasks == 0) return;
  const size_t slice = padded_to_16(attention_scratch_floats(p.head_dim));  // one per worker
  const int workers = num_threads();
  const auto scratch = aligned_floats(slice * workers, "scratch");
  float* base = scratch.get();
  parallel_for(n_tasks, workers, [&](int64_t task, int worker) { kernel(p, tiles.plan, task, base + worker * slice); });
}

void attention_backward(const AttentionBackwardParams& bp) {
  const AttentionParams& p = bp.fwd;
  check_kernel_args(p);
  const AttentionBackwardTaskFn kernel = backward_kernel(p);
  const TilePlan tiles(p);
  const int workers = num_threads();
  const int64_t kv_units = p.batch * p.kv_heads;
  if (kv_units == 0 || p.q_len == 0 || p.k_len == 0) return;

  // Tasks own (batch, KV head, key range): split the key range when there are too few (batch, KV
  // head) pairs to keep two tasks per hardware thread, each split adding a dQ slice (at most ~256 MiB
  // of them). From the hardware's count, not the threads in use, so that the splits (and the order
  // of the dQ sums) and hence the bits of the result do not depend on set_num_threads.
  BackwardPlan plan;
  plan.tiles = tiles.plan;
  plan.tile_width = attention_tile_width(p.head_dim);
  plan.q_rows_padded = (p.q_len + kAttnTileRowBlock - 1) / kAttnTileRowBlock * kAttnTileRowBlock;
  const int64_t slice_floats = p.batch * p.q_heads * plan.q_rows_padded * plan.tile_width;
  const int64_t wanted = (2 * int64_t{max_threads()} + kv_units - 1) / kv_units;
  const int64_t affordable = std::max<int64_t>(1, (int64_t{64} << 20) / std::max<int64_t>(1, slice_floats));
  plan.splits = std::max<int64_t>(1, std::min({wanted, tiles.plan.n_k_tiles, affordable}));
  const auto grad_q_slices = aligned_floats(static_cast<size_t>(plan.splits * slice_floats), "dQ slices");
  plan.grad_q_slices = grad_q_slices.get();
  parallel_for(plan.splits * slice_floats / kZeroChunk + 1, [&](int64_t task, int) {
    const int64_t first = task * kZeroChunk, last = std::min(plan.splits * slice_floats, first + kZeroChunk);
    if (first < last) std::fill(plan.grad_q_slices + first, plan.grad_q_slices + last, 0.0f);
  });

  const size_t slice = padded_to_16(attention_backward_scratch_floats(p.head_dim));
  const auto scratch = aligned_floats(slice * workers, "scratch");
  float* base = scratch.get();
  parallel_for(kv_units * plan.splits, workers,
               [&](int64_t task, int worker) { kernel(bp, plan, task, base + worker * slice); });

  // dQ = scale x (the sum of the slices), into [B, Hq, Lq, D].
  const int64_t rows = p.batch * p.q_heads * p.q_len;
  parallel_for((rows + 255) / 256, [&](int64_t task, int) {
    for (int64_t row = task * 256; row < std::min(rows, (task + 1) * 256); ++row) {
      const int64_t bh = row / p.q_len, i = row % p.q_len;
      float* dst = bp.grad_q + row * p.head_dim;
      for (int64_t d = 0; d < p.head_dim; ++d) {
        float sum = 0.0f;
        for (int64_t s = 0; s < plan.splits; ++s)
          sum += plan.grad_q_slices[s * slice_floats + (bh * plan.q_rows_padded + i) * plan.tile_width + d];
        dst[d] = sum * p.scale;
      }
    }
  });
}

void merge_attention(const MergeParams& p) {
  dispatch_dtype(p.dtype, "merge_attention", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t rows = p.batch * p.seq_len * p.heads;
    const int64_t per_task = 256;
    const int64_t n_tasks = (rows + per_task - 1) / per_task;
    parallel_for(n_tasks, [&](int64_t task, int) {
      const int64_t end = std::min(rows, (task + 1) * per_task);
      for (int64_t row = task * per_task; row < end; ++row) {
        const int64_t h = row % p.heads, l = (row / p.heads) % p.seq_len, b = row / (p.heads * p.seq_len);
        const float lse_a = p.lse_a[b * p.lse_a_strides[0] + h * p.lse_a_strides[1] + l * p.lse_a_strides[2]];
        const float lse_b = p.lse_b[b * p.lse_b_strides[0] + h * p.lse_b_strides[1] + l * p.lse_b_strides[2]];
        const MergeWeights w = merge_weights(lse_a, lse_b);
        p.lse[b * p.lse_strides[0] + h * p.lse_strides[1] + l * p.lse_strides[2]] = w.lse;
        const T* a = static_cast<const T*>(p.out_a) + b * p.out_a_strides[0] + l * p.out_a_strides[1] + h * p.out_a_strides[2];
        const T* c = static_cast<const T*>(p.out_b) + b * p.out_b_strides[0] + l * p.out_b_strides[1] + h * p.out_b_strides[2];
        T* o = static_cast<T*>(p.out) + b * p.out_strides[0] + l * p.out_strides[1] + h * p.out_strides[2];
        for (int64_t d = 0; d < p.head_dim; ++d) {
          // A zero weight must not turn an inf/NaN-free but unused partial into NaN (0 * inf).
          const float from_a = w.weight_a == 0.0f ? 0.0f : w.weight_a * to_float(a[d]);
          const float from_b = w.weight_b == 0.0f ? 0.0f : w.weight_b * to_float(c[d]);
          o[d] = from_float<T>(from_a + from_b);
        }
      }
    });
  });
}

}  // namespace dlmfuse::cpu
