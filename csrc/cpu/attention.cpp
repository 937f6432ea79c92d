// CPU attention dispatcher: label tile summaries, kernel selection, threading.
#include "cpu/attention.h"

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

AttentionTaskFn kernel_for(CpuIsa isa, DType dtype, int64_t head_dim) {
  switch (isa) {
#if defined(DLMFUSE_HAVE_ISA_AVX512)
    case CpuIsa::kAvx512: return avx512::attention_task_fn(dtype, head_dim);
#endif
#if defined(DLMFUSE_HAVE_ISA_AVX2)
    case CpuIsa::kAvx2: return avx2::attention_task_fn(dtype, head_dim);
#endif
    default: return baseline::attention_task_fn(dtype, head_dim);
  }
}

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};

}  // namespace

void attention_forward(const AttentionParams& p) {
  // Loud errors for values without a compiled kernel (the bindings check them first too).
  dispatch_dtype(p.dtype, "attention", [](auto) {});
  if (p.head_dim < 1 || p.head_dim > kAttentionMaxHeadDim)
    throw_value_error("attention: head_dim=", p.head_dim, " unsupported (supported: 1 to ",
                      kAttentionMaxHeadDim, ")");
  const AttentionTaskFn kernel = kernel_for(active_cpu_isa(), p.dtype, p.head_dim);

  AttentionPlan plan;
  plan.n_q_tiles = (p.q_len + kAttnTileM - 1) / kAttnTileM;
  plan.n_k_tiles = (p.k_len + kAttnTileN - 1) / kAttnTileN;
  plan.group_size = p.q_heads / p.kv_heads;
  std::vector<LabelRange> q_ranges, k_ranges;
  if (p.has_labels) {
    q_ranges = tile_ranges(p.q_order, p.q_group, p.batch, p.q_len, kAttnTileM);
    k_ranges = tile_ranges(p.k_order, p.k_group, p.batch, p.k_len, kAttnTileN);
    plan.q_ranges = q_ranges.data();
    plan.k_ranges = k_ranges.data();
  }
  std::vector<IdRange> q_doc_ranges, k_doc_ranges;
  if (p.has_docs) {
    q_doc_ranges = tile_id_ranges(p.q_doc, p.batch, p.q_len, kAttnTileM);
    k_doc_ranges = tile_id_ranges(p.k_doc, p.batch, p.k_len, kAttnTileN);
    plan.q_doc_ranges = q_doc_ranges.data();
    plan.k_doc_ranges = k_doc_ranges.data();
  }

  const int64_t n_tasks = attention_task_count(p, plan);
  if (n_tasks == 0) return;
  // One scratch slice per worker, each a multiple of 64 bytes so every slice stays aligned.
  const size_t slice = (attention_scratch_floats(p.head_dim) + 15) / 16 * 16;
  const int workers = num_threads();
  std::unique_ptr<float, AlignedFree> scratch(
      static_cast<float*>(std::aligned_alloc(64, slice * workers * sizeof(float))));
  if (!scratch) throw_runtime_error("attention: could not allocate ", slice * workers * 4, " bytes of scratch");
  float* base = scratch.get();
  parallel_for(n_tasks, workers, [&](int64_t task, int worker) { kernel(p, plan, task, base + worker * slice); });
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
