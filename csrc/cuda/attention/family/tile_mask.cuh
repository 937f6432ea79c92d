// Masking of one S tile in the attention family: scale into log2 units and hide what the labels,
// documents, row count and key count hide. The fragment layout is the m16n8 C layout of
// attention_sm80_tile.cuh (element e of s[nt] is fragment row e / 2, key nt * 8 + 2 * (lane % 4) + e % 2).
#pragma once

#include "cuda/attention/attention_sm80_tile.cuh"

namespace dlmfuse::cuda::family {

// Labels of the thread's two fragment rows (documents: 0 when the call has none).
struct RowLabels {
  int32_t order[2], group[2], doc[2];
};

// Key labels of a PARTIAL tile in shared memory: orders, groups, documents of its keys.
struct KeyLabels {
  const int32_t* order;
  const int32_t* group;
  const int32_t* doc;
};

__device__ __forceinline__ bool visible_in_documents(const RowLabels& rows, int r, int32_t k_order, int32_t k_group,
                                                     int32_t k_doc, bool has_docs) {
  return is_visible(rows.order[r], rows.group[r], k_order, k_group) && (!has_docs || rows.doc[r] == k_doc);
}

// FULL tiles (all one document when the call has documents: within_documents) test nothing;
// PARTIAL tiles test the rule and the documents per element; edge tiles also test the bounds.
// kN: keys per tile (64; 128 in the warp-specialized kernel).
template <int kN = sm80::kBlockN>
__device__ __forceinline__ void mask_tile(float (&s)[kN / 8][4], float score_scale, TileKind kind,
                                          const KeyLabels& keys, bool has_docs, const RowLabels& rows,
                                          const int (&row_in_tile)[2], int q_rows, bool rows_full, int cols,
                                          int lane) {
  const bool interior = cols == kN && rows_full;
  if (kind == TileKind::kFull && interior) {
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt)
      for (int e = 0; e < 4; ++e) s[nt][e] *= score_scale;
    return;
  }
  if (interior) {
    // PARTIAL, no bounds: each thread's two adjacent keys' labels in one 8-byte shared load each
    // (the label rows are 16-byte aligned, the key offset is even).
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) {
      const int col = nt * 8 + 2 * (lane % 4);
      const int2 order = *reinterpret_cast<const int2*>(keys.order + col);
      const int2 group = *reinterpret_cast<const int2*>(keys.group + col);
      const int2 doc = has_docs ? *reinterpret_cast<const int2*>(keys.doc + col) : make_int2(0, 0);
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        const bool visible = e % 2 ? visible_in_documents(rows, r, order.y, group.y, doc.y, has_docs)
                                   : visible_in_documents(rows, r, order.x, group.x, doc.x, has_docs);
        s[nt][e] = visible ? s[nt][e] * score_scale : -INFINITY;
      }
    }
    return;
  }
#pragma unroll
  for (int nt = 0; nt < kN / 8; ++nt)
    for (int e = 0; e < 4; ++e) {
      const int r = e / 2, col = nt * 8 + 2 * (lane % 4) + e % 2;
      bool visible = col < cols && row_in_tile[r] < q_rows;
      if (visible && kind == TileKind::kPartial)
        visible = visible_in_documents(rows, r, keys.order[col], keys.group[col], has_docs ? keys.doc[col] : 0,
                                       has_docs);
      s[nt][e] = visible ? s[nt][e] * score_scale : -INFINITY;
    }
}

}  // namespace dlmfuse::cuda::family
