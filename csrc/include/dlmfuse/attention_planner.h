// The planner of the CUDA attention family (cuda/attention/family): every launch decision of a
// call (MMA policy, query tile, key walk, split count, GQA packing, workspace) in one place.
// Host code with no CUDA in it, so CPU-only builds compile and test the same decisions; Python
// asks it for the plan and holds no policy of its own.
//
// A debugging override (DLMFUSE_CUDA_ATTENTION="tile_m=64,walk=gather,splits=3" with the family
// enabled) is parsed once into an AttentionOverride; a forced field the call cannot take is a
// ValueError naming the field and the reason, never a silent substitute.
#pragma once

#include <cstdint>
#include <string>

#include "dlmfuse/attention_params.h"
#include "dlmfuse/attention_plan.h"

namespace dlmfuse {

// How the scores are computed: CUDA cores in fp32 (the CUDA-core kernel, attention_simple.cu:
// every dtype at head_dim 64 / 128; the fp32 path), mma.sync (sm_80+), or warpgroup MMAs (sm_90a).
enum class AttentionMma : int32_t { kSimt = 0, kSm80 = 1, kSm90 = 2 };
// How a CTA walks its keys: whole 64-key tiles (SKIP tiles never loaded), or with the keys of
// PARTIAL tiles classified one by one and gathered into FULL and PARTIAL tiles (labels, no bias).
enum class AttentionWalk : int32_t { kTiles = 0, kGather = 1 };

const char* mma_name(AttentionMma mma);
const char* walk_name(AttentionWalk walk);

// Whether rows of a 16-bit [B, L, H, D] tensor (data, strides of batch, row, head in elements) start
// on 16-byte boundaries: what cp.async, which moves 16 bytes, needs of q, k, v and grad_out.
inline bool rows_16_byte_aligned(const void* data, const int64_t (&strides)[3]) {
  if (reinterpret_cast<uintptr_t>(data) % 16 != 0) return false;
  for (int64_t stride : strides)
    if (stride % 8 != 0) return false;  // 8 elements of 16 bits
  return true;
}

// What the planner needs to know of the GPU.
struct AttentionDevice {
  int sm_count = 0;
  int cc_major = 0;
  int cc_minor = 0;
  int max_shared_bytes = 0;  // opt-in shared memory per block (0: unknown, not checked)
  // The build holds sm_90a machine code: the wgmma plans (mma=sm90) trap without it, since a plain
  // sm_90 or compute_90 image has no wgmma, setmaxnreg or TMA instructions.
  bool sm90a_code = true;
};
// Whether a CUDA architecture list (CMAKE_CUDA_ARCHITECTURES as built, comma- or
// semicolon-separated: "80;90a-real") has sm_90a code.
bool archs_have_sm90a(const std::string& archs);

// Shared memory of one CTA of the family's tensor-core kernel (attention_fwd.cuh lays it out and
// checks these at compile time): dynamic bytes (Q, two K and two V tiles, two buffers of key
// labels, the 1024-byte alignment slack of the sm90 policy; bias tiles come on top where the
// device has room) and an upper bound of its static bytes (query labels, the key walk's state).
constexpr int kAttentionKeyLabelInts = 3 * kAttentionKeyTile;  // order, group, document of a key tile
constexpr int attention_fwd_dynamic_bytes(int tile_m, int head_dim, bool sm90) {
  return (tile_m * head_dim + 4 * kAttentionKeyTile * head_dim) * 2 + 2 * kAttentionKeyLabelInts * 4 +
         (sm90 ? 1024 : 0);
}
constexpr int attention_fwd_static_bytes(int tile_m, bool gather) {
  return 3 * tile_m * 4 + (gather ? 3072 : 512);
}

// The warp-specialized kernel (mma=sm90 with tile_m=128, attention_fwd_warp_specialized.cuh): 128
// query rows (two consumer warpgroups of 64), 128-key tiles through a ring of TMA stages (3 at
// head_dim 64, 2 at 128: what fits beside the Q tile in 227 KB), plus the 1024-byte alignment slack
// of the swizzled tiles. A bias streams through its own ring of [128 rows][128 keys] 16-bit tiles:
// as many stages as K / V at head_dim 64, one at 128 (two would pass 227 KB with the static part).
constexpr int kAttentionTmaRows = 128;
constexpr int kAttentionTmaKeyTile = 128;
constexpr int attention_tma_stages(int head_dim) { return head_dim == 64 ? 3 : 2; }
constexpr int attention_tma_bias_stages(int head_dim) { return head_dim == 64 ? 3 : 1; }
constexpr int attention_fwd_tma_bytes(int head_dim, bool bias = false) {
  return (kAttentionTmaRows + 2 * attention_tma_stages(head_dim) * kAttentionTmaKeyTile) * head_dim * 2 + 1024 +
         (bias ? attention_tma_bias_stages(head_dim) * kAttentionTmaRows * kAttentionTmaKeyTile * 2 : 0);
}
// Its static shared memory, at most: per stage a tile description, three rows of key labels and
// four mbarriers, per bias stage two full and two empty mbarriers (one pair per consumer), plus two
// more mbarriers, in 128-byte units (the dynamic tiles start after it); with the gathered walk
// also the walk's state (the query tile's ranges and groups, a round's tile kinds and key list).
constexpr int kAttentionTmaGatherWalkBytes = 3328;
constexpr int attention_fwd_tma_static_bytes(int head_dim, bool gather = false) {
  return (attention_tma_stages(head_dim) * (16 + 3 * kAttentionTmaKeyTile * 4 + 4 * 8) +
          attention_tma_bias_stages(head_dim) * 4 * 8 + 2 * 8 + 16 + 127) /
             128 * 128 +
         (gather ? kAttentionTmaGatherWalkBytes : 0);
}
// Whether a bias can stream through a TMA map into the warp-specialized kernel: of the query's dtype
// (bf16 / fp16; the kernel reads one type), keys contiguous (or a single key), the base
// and every row / head / batch stride on 16-byte boundaries (a stride-0 axis is read at
// coordinate 0, so it passes; the key axis cannot be broadcast).
// An axis of extent 1 is never stepped, so its stride does not matter.
inline bool bias_tma_loadable(const AttentionParams& p) {
  if (p.bias == nullptr || p.bias_dtype != p.dtype || (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16))
    return false;
  if ((p.bias_strides[3] != 1 && p.k_len > 1) || reinterpret_cast<uintptr_t>(p.bias) % 16 != 0) return false;
  const int64_t extents[3] = {p.batch, p.q_heads, p.q_len};
  for (int d = 0; d < 3; ++d)
    if (extents[d] > 1 && p.bias_strides[d] % 8 != 0) return false;  // 8 elements of 16 bits
  return true;
}

// What the planner needs to know of the call.
struct AttentionCall {
  int64_t batch = 0, q_len = 0, k_len = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  bool half_precision = false;  // bf16 / fp16 (tensor cores take nothing else)
  bool aligned = false;         // q / k / v rows on 16-byte boundaries, out rows on 4 (cp.async, paired stores)
  bool has_labels = false;
  bool has_bias = false;
  bool broadcast_rows = false;  // q, k or v repeats rows through a stride-0 axis (expand): no TMA map takes that
  bool bias_tma = false;        // the bias, if any, is bias_tma_loadable
};
AttentionCall attention_call(const AttentionParams& p);

// Fields the override forces; the planner decides the others (0 / kAuto: not forced).
struct AttentionOverride {
  static constexpr int kAuto = -1;
  int mma = kAuto;     // an AttentionMma
  int walk = kAuto;    // an AttentionWalk
  int tile_m = 0;      // 64 or 128
  int splits = 0;      // 1 .. kAttentionMaxSplits
  int pack_gqa = kAuto;  // 0 or 1
  std::string text;    // as parsed (for build_info and error messages)
};
// "key=value,..." with keys mma (simt / sm80 / sm90), tile_m (64 / 128), walk (tiles / gather),
// splits (1-16), pack_gqa (0 / 1); "" and "auto" force nothing. Anything else is a ValueError.
AttentionOverride parse_attention_override(const std::string& text);

struct AttentionPlan {
  AttentionMma mma = AttentionMma::kSimt;
  AttentionWalk walk = AttentionWalk::kTiles;
  int tile_m = kAttentionCtaRows;  // query rows (GQA-packed rows with pack_gqa) per CTA
  int splits = 1;                  // key-range splits; > 1 needs the partial workspace
  bool pack_gqa = false;           // the query heads of a KV head share CTAs

  // "mma=sm80,tile_m=128,walk=tiles,splits=1,pack_gqa=0": what ran, for bench rows and errors.
  std::string describe() const;
  // mma=sm90 with 128-row tiles runs the warp-specialized kernel (attention_fwd_warp_specialized.cuh).
  bool warp_specialized() const { return mma == AttentionMma::kSm90 && tile_m == kAttentionTmaRows; }
};

// The plan of `call` on `device` under `forced`. Raises ValueError when a forced field cannot run
// this call (for example walk=gather without labels, mma=sm90 on a GPU that is not sm_90).
AttentionPlan plan_attention(const AttentionCall& call, const AttentionDevice& device,
                             const AttentionOverride& forced = {});
inline AttentionPlan plan_attention(const AttentionParams& params, const AttentionDevice& device,
                                    const AttentionOverride& forced = {}) {
  return plan_attention(attention_call(params), device, forced);
}

// Whether `plan` can run `call` (the launcher's check of a plan it is handed): "" if so, else why not.
std::string plan_mismatch(const AttentionPlan& plan, const AttentionCall& call, const AttentionDevice& device);

}  // namespace dlmfuse
