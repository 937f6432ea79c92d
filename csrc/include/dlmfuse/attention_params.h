// Arguments of one attention forward call, as plain pointers and element strides.
// Filled by csrc/bindings after validation; read by the CPU and CUDA kernels alike.
#pragma once

#include "dlmfuse/config.h"
#include "dlmfuse/dtype.h"

// CPU: any head_dim in [1, kAttentionMaxHeadDim], computed in the smallest of these tile widths
// (one template instantiation each; rows are zero-padded). Exported to Python.
#define DLMFUSE_ATTENTION_TILE_DIMS 32, 64, 128, 256
// CUDA kernels: exactly these head dims (others use the reference on CUDA). Exported to Python.
#define DLMFUSE_CUDA_ATTENTION_HEAD_DIMS 64, 128

namespace dlmfuse {

constexpr int64_t kAttentionMaxHeadDim = 256;

// Strided [B, L] int32 label tensor; batch_stride = 0 broadcasts a batch-1 label set.
struct LabelView {
  const int32_t* data = nullptr;  // [B or 1, L]
  int64_t batch_stride = 0;
  int64_t row_stride = 1;

  DLMFUSE_HOST_DEVICE DLMFUSE_INLINE int32_t at(int64_t b, int64_t i) const {
    return data[b * batch_stride + i * row_stride];
  }
};

struct AttentionParams {
  // Tensors in [B, L, H, D] layout with the head_dim stride equal to 1; strides in elements.
  const void* q = nullptr;  // [B, Lq, Hq, D]
  const void* k = nullptr;  // [B, Lk, Hkv, D]
  const void* v = nullptr;  // [B, Lk, Hkv, D]
  void* out = nullptr;      // [B, Lq, Hq, D], same dtype as q
  float* lse = nullptr;     // [B, Hq, Lq], contiguous, natural log
  int64_t q_strides[3] = {0, 0, 0};  // batch, row, head
  int64_t k_strides[3] = {0, 0, 0};
  int64_t v_strides[3] = {0, 0, 0};
  int64_t out_strides[3] = {0, 0, 0};
  DType dtype = DType::kFloat32;  // of q, k, v and out

  // Visibility labels (DESIGN.md section 4). has_labels = false: every key is visible.
  bool has_labels = false;
  LabelView q_order, q_group;  // [B or 1, Lq]
  LabelView k_order, k_group;  // [B or 1, Lk]

  // Additive bias in natural-log units, broadcast to [B, Hq, Lq, Lk] through strides (0 = broadcast).
  const void* bias = nullptr;
  int64_t bias_strides[4] = {0, 0, 0, 0};
  DType bias_dtype = DType::kFloat32;

  const int32_t* kv_lens = nullptr;  // [B] or null: keys at index >= kv_lens[b] are hidden

  int64_t batch = 0, q_len = 0, k_len = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  float scale = 1.0f;  // multiplies q.k before the bias is added

  // Split-KV workspace (CUDA tensor-core kernel only; the CPU and CUDA-core kernels ignore it).
  // num_splits > 1: split s attends to its own chunk of each row's key range and writes its
  // normalised partial (out_s, lse_s) here (an empty chunk: 0 and -inf); a merge kernel then
  // writes out and lse. Allocated by Python (float32, contiguous).
  int32_t num_splits = 1;
  // K/V buffers of the tensor-core kernel: 2 (default: the next tile's K and V load during
  // the whole of the current tile; more shared memory) or 1. Other kernels ignore it.
  int32_t kv_stages = 2;
  // The tensor-core kernel's second generation of paths (two buffers only; listed at kNext in
  // cuda/attention/attention_sm80_kernel.cuh; verified on an H200, 2026-11-27). Other kernels ignore it.
  bool next_paths = false;
  // 32 query rows per warp (128 per CTA) in the tensor-core kernel instead of 16 (next paths and
  // two buffers only). A bool beside next_paths: it fits the padding, so the first kernels'
  // parameter offsets (and machine code) stay as they were.
  bool wide_rows = false;
  // GQA packing (next paths only, no bias): a CTA's query rows are the
  // (query, head) pairs of the q_heads / kv_heads query heads that share one KV head, so each K/V
  // tile serves all of them. Set by the binding where it cuts the CTA count (attention_packs_gqa).
  bool pack_gqa = false;
  // The next paths with warpgroup MMAs (wgmma) on sm_90 GPUs (elsewhere the next paths run).
  bool wgmma = false;
  float* partial_out = nullptr;  // [S, B, Hq, Lq, D], S = num_splits
  float* partial_lse = nullptr;  // [S, B, Hq, Lq], natural log
  // The next paths (16 rows per warp, labels, no bias) with the keys of
  // PARTIAL tiles gathered per key (dlmfuse/visibility.h classify_key): keys every row of the CTA
  // sees into FULL tiles, keys some row sees into PARTIAL tiles, the others never loaded. Set by
  // the binding only for calls with labels and without a bias. Last, so that no earlier field moves.
  bool gather_keys = false;

  // Packed sequences (needs labels): key j is visible to query i only if q_doc[i] == k_doc[j].
  // The CPU kernel reads them; the CUDA kernels are not given calls that have them.
  bool has_docs = false;
  LabelView q_doc;  // [B or 1, Lq]
  LabelView k_doc;  // [B or 1, Lk]
};

// Arguments of one attention backward call (CPU): the forward's (its `out` unused, `lse` read),
// the output gradient, and zeroed float32 gradient buffers that the kernel fills.
struct AttentionBackwardParams {
  AttentionParams fwd;
  const void* grad_out = nullptr;  // [B, Lq, Hq, D], dtype of q
  int64_t grad_out_strides[3] = {0, 0, 0};
  const float* delta = nullptr;  // [B, Hq, Lq] contiguous: rowsum(grad_out * out) - grad_lse
  float* grad_q = nullptr;       // [B, Hq, Lq, D] contiguous (heads before rows)
  float* grad_k = nullptr;       // [B, Lk, Hkv, D] contiguous
  float* grad_v = nullptr;       // [B, Lk, Hkv, D] contiguous
  float* grad_bias = nullptr;    // [B, Hq, Lq, Lk] contiguous, or null: no bias gradient
};

// Arguments of merge_attention: (out_a, lse_a) and (out_b, lse_b) -> (out, lse).
struct MergeParams {
  const void* out_a = nullptr;  // [B, L, H, D]
  const void* out_b = nullptr;  // [B, L, H, D]
  const float* lse_a = nullptr;  // [B, H, L]
  const float* lse_b = nullptr;  // [B, H, L]
  void* out = nullptr;           // [B, L, H, D]
  float* lse = nullptr;          // [B, H, L]
  int64_t out_a_strides[4] = {0, 0, 0, 1};
  int64_t out_b_strides[4] = {0, 0, 0, 1};
  int64_t out_strides[4] = {0, 0, 0, 1};
  int64_t lse_a_strides[3] = {0, 0, 0};
  int64_t lse_b_strides[3] = {0, 0, 0};
  int64_t lse_strides[3] = {0, 0, 0};
  DType dtype = DType::kFloat32;  // of out_a, out_b and out
  int64_t batch = 0, seq_len = 0, heads = 0, head_dim = 0;
};

}  // namespace dlmfuse
