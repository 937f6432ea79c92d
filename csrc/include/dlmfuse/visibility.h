// The visibility rule of DESIGN.md section 4, per element and per tile.
//
//   key j is visible to query i  iff  k_order[j] < q_order[i]  or  k_group[j] == q_group[i]
//
// Kernels never test every element when they can avoid it: a tile of queries x keys is classified
// from the min/max of its labels as SKIP (nothing visible: no loads at all), FULL (everything
// visible: no per-element test) or PARTIAL (test each element). The keys of a PARTIAL tile are
// then classified one by one (classify_key): mask-only steps scatter the keys a query tile sees
// (clean keys at random positions, each masked query's own key), so their tiles are all PARTIAL,
// yet per key most are visible to every query of the tile or to none. Kernels gather the keys
// visible to all into FULL tiles and those visible to some into PARTIAL tiles, and drop the rest.
#pragma once

#include "dlmfuse/config.h"

namespace dlmfuse {

DLMFUSE_HOST_DEVICE DLMFUSE_INLINE bool is_visible(int32_t q_order, int32_t q_group,
                                                   int32_t k_order, int32_t k_group) {
  return k_order < q_order || k_group == q_group;
}

// Min/max of the labels of a run of rows (a query tile or a key tile).
struct LabelRange {
  int32_t order_min;
  int32_t order_max;
  int32_t group_min;
  int32_t group_max;

  DLMFUSE_HOST_DEVICE static LabelRange empty() {
    return {INT32_MAX, INT32_MIN, INT32_MAX, INT32_MIN};
  }
  DLMFUSE_HOST_DEVICE DLMFUSE_INLINE void add(int32_t order, int32_t group) {
    order_min = order < order_min ? order : order_min;
    order_max = order > order_max ? order : order_max;
    group_min = group < group_min ? group : group_min;
    group_max = group > group_max ? group : group_max;
  }
};

enum class TileKind : int32_t { kSkip = 0, kFull = 1, kPartial = 2 };

DLMFUSE_HOST_DEVICE DLMFUSE_INLINE TileKind classify_tile(const LabelRange& q,
                                                          const LabelRange& k) {
  const bool groups_meet = k.group_min <= q.group_max && q.group_min <= k.group_max;
  if (k.order_min >= q.order_max && !groups_meet) return TileKind::kSkip;
  // Every key strictly earlier than every query: all visible.
  if (k.order_max < q.order_min) return TileKind::kFull;
  // One single group shared by all queries and all keys: all visible.
  if (q.group_min == q.group_max && k.group_min == k.group_max && q.group_min == k.group_min)
    return TileKind::kFull;
  return TileKind::kPartial;
}

// Whether x is one of sorted[0, n) (ascending): a binary search.
DLMFUSE_HOST_DEVICE DLMFUSE_INLINE bool contains_sorted(const int32_t* sorted, int n, int32_t x) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (sorted[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo < n && sorted[lo] == x;
}

// Packed sequences add document labels: key j is visible to query i only if q_doc[i] == k_doc[j]
// as well. The min/max of a tile's document ids refine its kind: tiles whose document ranges do
// not meet are SKIP, and a FULL tile stays FULL only when its queries and keys are all one document.
struct IdRange {
  int32_t min;
  int32_t max;

  DLMFUSE_HOST_DEVICE static IdRange empty() { return {INT32_MAX, INT32_MIN}; }
  DLMFUSE_HOST_DEVICE DLMFUSE_INLINE void add(int32_t id) {
    min = id < min ? id : min;
    max = id > max ? id : max;
  }
};

DLMFUSE_HOST_DEVICE DLMFUSE_INLINE TileKind within_documents(TileKind kind, const IdRange& q, const IdRange& k) {
  if (kind == TileKind::kSkip || k.max < q.min || q.max < k.min) return TileKind::kSkip;
  if (kind == TileKind::kFull && !(q.min == q.max && k.min == k.max && q.min == k.min)) return TileKind::kPartial;
  return kind;
}

// One key of document k_doc against query rows whose documents span q: SKIP outside that span,
// FULL only when every row is of the key's document; PARTIAL may still hide the key from every
// row (rows of documents on both sides of it), which the per-element test then does.
DLMFUSE_HOST_DEVICE DLMFUSE_INLINE TileKind key_within_documents(TileKind kind, const IdRange& q, int32_t k_doc) {
  return within_documents(kind, q, IdRange{k_doc, k_doc});
}

// One key against a query tile: FULL (visible to every query), SKIP (to none) or PARTIAL (to some),
// exactly. `q` is the tile's label range and q_groups its n query groups in ascending order.
// Written with bitwise operations: keys of the two kinds interleave at random in mask-only steps,
// and branches on them mispredict (the membership search runs only for keys later than every query).
DLMFUSE_HOST_DEVICE DLMFUSE_INLINE TileKind classify_key(const LabelRange& q, const int32_t* q_groups, int n,
                                                         int32_t k_order, int32_t k_group) {
  const bool full = (k_order < q.order_min) | ((q.group_min == q.group_max) & (k_group == q.group_min));
  const bool earlier = k_order < q.order_max;  // seen at least by the latest query
  const bool in_range = (k_group >= q.group_min) & (k_group <= q.group_max);
  const bool some = earlier || (in_range && contains_sorted(q_groups, n, k_group));
  return static_cast<TileKind>(full ? 1 : (some ? 2 : 0));  // kFull, kPartial, kSkip
}

}  // namespace dlmfuse
