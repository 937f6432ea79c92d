// The planner of the CUDA attention family (dlmfuse/attention_planner.h).
//
// The automatic choices restate the same-run H200 measurements of the kernels the family replaces
// (bench/results/h200-2026-11-27.md):
// - bias: a 16-bit bias streams in as shared tiles; on sm_90 with warpgroup MMAs (A3: 434 us
//   against 472 us with mma.sync, 1213 us loading the bias element by element).
// - labels and at most half as many queries as keys (mask-only steps, every tile PARTIAL): the
//   gathered walk reads only the visible keys (A4 n=32: 110 us against 141 us); with wgmma on sm_90
//   above 32 rows (n=128 / 512: 180 / 652 us against 259 / 999 us); at 32 rows or fewer mma.sync,
//   since half of a wgmma's 64 rows would be padding.
// - otherwise on sm_90: 128-row tiles above 64 query rows (A1 L=2048: 306 us against 327 us; A2:
//   206 us against 244 us), 64-row tiles with GQA packing below (A4g n=32: 87 us against 168 us).
// - elsewhere (A100: sm_80 code, never measured on an A100) 64-row tiles: the 128-row build
//   spills 104 bytes a thread for sm_80. GQA packing follows the same rule on every GPU (the
//   verified double_buffer kernel that auto picks there had none): it cuts the K/V reads anywhere.
#include "dlmfuse/attention_planner.h"

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <sstream>

#include "dlmfuse/errors.h"

namespace dlmfuse {
namespace {

constexpr const char* kEnv = "DLMFUSE_CUDA_ATTENTION";

bool tensor_cores_fit(const AttentionCall& c) {
  return c.half_precision && (c.head_dim == 64 || c.head_dim == 128) && c.aligned;
}

bool heads_pack(const AttentionCall& c) {
  return c.kv_heads > 0 && c.q_heads > c.kv_heads && c.q_heads % c.kv_heads == 0;
}

// A value of `key` in the override: one of `names` (its index), or an error listing them.
template <size_t N>
int parse_name(const std::string& text, const std::string& key, const std::string& value, const char* const (&names)[N]) {
  for (size_t i = 0; i < N; ++i)
    if (value == names[i]) return static_cast<int>(i);
  std::string allowed;
  for (size_t i = 0; i < N; ++i) allowed += std::string(i ? ", " : "") + names[i];
  throw_value_error(kEnv, "=\"", text, "\": ", key, " must be one of ", allowed, ", got \"", value, "\"");
}

int parse_int(const std::string& text, const std::string& key, const std::string& value, int lo, int hi) {
  bool digits = !value.empty() && value.size() <= 6;
  for (char ch : value) digits = digits && ch >= '0' && ch <= '9';
  const int parsed = digits ? std::atoi(value.c_str()) : -1;
  if (parsed < lo || parsed > hi)
    throw_value_error(kEnv, "=\"", text, "\": ", key, " must be an integer in [", lo, ", ", hi, "], got \"", value,
                      "\"");
  return parsed;
}

std::string trimmed(const std::string& s) {
  const size_t first = s.find_first_not_of(" \t");
  if (first == std::string::npos) return "";
  return s.substr(first, s.find_last_not_of(" \t") - first + 1);
}

// The grid the family launches: (query tiles, heads, batch x splits) or (heads, query tiles,
// batch x splits); the first two within CUDA's 65535 cap on y either way.
bool grid_fits(const AttentionCall& c, int tile_m, bool pack, int splits) {
  const int64_t rows = pack ? c.q_len * (c.q_heads / c.kv_heads) : c.q_len;
  const int64_t heads = pack ? c.kv_heads : c.q_heads;
  return plan_ceil_div(rows, tile_m) <= kAttentionMaxGridDim && heads <= kAttentionMaxGridDim &&
         c.batch * splits <= kAttentionMaxGridDim;
}

// The warp-specialized kernel packs a group of G query heads as one TMA box of 64 / G queries x G
// heads: G must divide 64.
bool heads_pack_in_tma_boxes(const AttentionCall& c) {
  return heads_pack(c) && 64 % (c.q_heads / c.kv_heads) == 0;
}

// mma=sm90 with tile_m=128: the warp-specialized TMA kernel; its TMA coordinates are 32-bit; a bias
// that a TMA map can load costs a ring of tiles in shared memory.
std::string warp_specialized_mismatch(const AttentionPlan& plan, const AttentionCall& c, const AttentionDevice& device) {
  const bool gather = plan.walk == AttentionWalk::kGather;
  if (gather && (!c.has_labels || c.has_bias))
    return concat("walk=gather needs labels and no bias; this call has ", c.has_labels ? "a bias" : "no labels");
  if (plan.pack_gqa && (c.has_bias || !heads_pack_in_tma_boxes(c)))
    return concat("pack_gqa=1 with mma=sm90,tile_m=128 needs no bias and q_heads / kv_heads dividing 64 (one TMA box of ",
                  "64 / G queries x G heads); this call has ",
                  c.has_bias ? "a bias" : concat("q_heads ", c.q_heads, ", kv_heads ", c.kv_heads));
  const int shared = attention_fwd_tma_bytes(static_cast<int>(c.head_dim), c.has_bias && c.bias_tma) +
                     attention_fwd_tma_static_bytes(static_cast<int>(c.head_dim), gather);
  if (device.max_shared_bytes > 0 && shared > device.max_shared_bytes)
    return concat("mma=sm90 with tile_m=128 at head_dim ", c.head_dim, " needs ", shared,
                  " bytes of shared memory per block, this GPU has ", device.max_shared_bytes);
  // cuTensorMapEncodeTiled documents no stride 0 (only multiples of 16 below 2^40).
  if (c.broadcast_rows)
    return "mma=sm90 with tile_m=128 loads q, k and v through TMA maps, which take no stride-0 (expanded) axis; "
           "this call has one (make the tensor contiguous, or let the planner choose)";
  if (c.k_len > INT32_MAX || !grid_fits(c, plan.tile_m, plan.pack_gqa, plan.splits))
    return concat("the grid would exceed ", kAttentionMaxGridDim, " CTAs along an axis, or k_len 2^31 keys (batch ",
                  c.batch, ", q_len ", c.q_len, ", k_len ", c.k_len, ", q_heads ", c.q_heads, ", splits ", plan.splits, ")");
  return "";
}

}  // namespace

const char* mma_name(AttentionMma mma) {
  switch (mma) {
    case AttentionMma::kSm80: return "sm80";
    case AttentionMma::kSm90: return "sm90";
    default: return "simt";
  }
}

const char* walk_name(AttentionWalk walk) { return walk == AttentionWalk::kGather ? "gather" : "tiles"; }

bool archs_have_sm90a(const std::string& archs) {
  std::string arch;
  for (size_t i = 0; i <= archs.size(); ++i) {
    if (i == archs.size() || archs[i] == ',' || archs[i] == ';') {
      if (arch.rfind("90a", 0) == 0) return true;  // "90a", "90a-real", "90a-virtual"
      arch.clear();
    } else {
      arch += archs[i];
    }
  }
  return false;
}

AttentionCall attention_call(const AttentionParams& p) {
  AttentionCall c;
  c.batch = p.batch;
  c.q_len = p.q_len;
  c.k_len = p.k_len;
  c.q_heads = p.q_heads;
  c.kv_heads = p.kv_heads;
  c.head_dim = p.head_dim;
  c.half_precision = p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16;
  c.has_labels = p.has_labels;
  c.has_bias = p.bias != nullptr;
  c.bias_tma = bias_tma_loadable(p);
  // The epilogue stores output pairs as 4-byte words.
  bool out_pairs = reinterpret_cast<uintptr_t>(p.out) % 4 == 0;
  for (int64_t stride : p.out_strides) out_pairs = out_pairs && stride % 2 == 0;
  c.aligned = rows_16_byte_aligned(p.q, p.q_strides) && rows_16_byte_aligned(p.k, p.k_strides) &&
              rows_16_byte_aligned(p.v, p.v_strides) && out_pairs;
  const int64_t q_extents[3] = {p.batch, p.q_len, p.q_heads}, kv_extents[3] = {p.batch, p.k_len, p.kv_heads};
  for (int d = 0; d < 3; ++d)
    c.broadcast_rows = c.broadcast_rows || (p.q_strides[d] == 0 && q_extents[d] > 1) ||
                       ((p.k_strides[d] == 0 || p.v_strides[d] == 0) && kv_extents[d] > 1);
  return c;
}

AttentionOverride parse_attention_override(const std::string& text) {
  AttentionOverride forced;
  forced.text = text;
  const std::string whole = trimmed(text);
  if (whole.empty() || whole == "auto") return forced;
  static const char* const kMmas[] = {"simt", "sm80", "sm90"};
  static const char* const kWalks[] = {"tiles", "gather"};
  static const char* const kTiles[] = {"64", "128"};
  static const char* const kFlags[] = {"0", "1"};
  std::stringstream items(whole);
  std::string item;
  while (std::getline(items, item, ',')) {
    const size_t eq = item.find('=');
    const std::string key = trimmed(item.substr(0, eq));
    if (eq == std::string::npos || key.empty())
      throw_value_error(kEnv, "=\"", text, "\": expected comma-separated key=value items (keys mma, tile_m, walk, "
                        "splits, pack_gqa), got \"", item, "\"");
    const std::string value = trimmed(item.substr(eq + 1));
    int* field = nullptr;
    int parsed = 0;
    if (key == "mma") {
      field = &forced.mma;
      parsed = parse_name(text, key, value, kMmas);
    } else if (key == "walk") {
      field = &forced.walk;
      parsed = parse_name(text, key, value, kWalks);
    } else if (key == "tile_m") {
      field = &forced.tile_m;
      parsed = parse_name(text, key, value, kTiles) == 0 ? 64 : 128;
    } else if (key == "splits") {
      field = &forced.splits;
      parsed = parse_int(text, key, value, 1, kAttentionMaxSplits);
    } else if (key == "pack_gqa") {
      field = &forced.pack_gqa;
      parsed = parse_name(text, key, value, kFlags);
    } else {
      throw_value_error(kEnv, "=\"", text, "\": unknown key \"", key, "\" (keys: mma, tile_m, walk, splits, pack_gqa)");
    }
    const bool unset = field == &forced.tile_m || field == &forced.splits ? *field == 0 : *field == AttentionOverride::kAuto;
    if (!unset) throw_value_error(kEnv, "=\"", text, "\": ", key, " is given twice");
    *field = parsed;
  }
  return forced;
}

std::string AttentionPlan::describe() const {
  std::ostringstream s;
  s << "mma=" << mma_name(mma) << ",tile_m=" << tile_m << ",walk=" << walk_name(walk) << ",splits=" << splits
    << ",pack_gqa=" << (pack_gqa ? 1 : 0);
  return s.str();
}

std::string plan_mismatch(const AttentionPlan& plan, const AttentionCall& c, const AttentionDevice& device) {
  if (c.head_dim != 64 && c.head_dim != 128) return concat("the CUDA kernels take head_dim 64 or 128, got ", c.head_dim);
  if (plan.splits < 1 || plan.splits > kAttentionMaxSplits)
    return concat("splits must lie in [1, ", kAttentionMaxSplits, "], got ", plan.splits);
  if (plan.mma == AttentionMma::kSimt) {
    if (plan.walk != AttentionWalk::kTiles || plan.splits != 1 || plan.pack_gqa || plan.tile_m != kAttentionCtaRows)
      return "mma=simt has its own tiles, one query head per CTA and no split (tile_m, walk=gather, splits > 1 and "
             "pack_gqa=1 are tensor-core choices)";
    return "";
  }
  if (!tensor_cores_fit(c))
    return concat("mma=", mma_name(plan.mma), " needs bf16 / fp16, head_dim 64 / 128 and 16-byte aligned rows; ",
                  "this call has ", c.half_precision ? "" : "float32 inputs, ", "head_dim ", c.head_dim,
                  c.aligned ? "" : ", unaligned rows");
  if (plan.mma == AttentionMma::kSm90 && device.cc_major != 9)
    return concat("mma=sm90 needs an sm_90 GPU (H100 / H200), this one is sm_", device.cc_major, device.cc_minor);
  if (plan.mma == AttentionMma::kSm90 && !device.sm90a_code)
    return "mma=sm90 needs sm_90a machine code, which this build lacks (build with CUDAARCHS including 90a-real)";
  if (plan.tile_m != 64 && plan.tile_m != 128) return concat("tile_m must be 64 or 128, got ", plan.tile_m);
  if (plan.warp_specialized()) return warp_specialized_mismatch(plan, c, device);
  if (plan.tile_m == 128 && (plan.walk != AttentionWalk::kTiles || plan.pack_gqa))
    return "tile_m=128 runs with walk=tiles and pack_gqa=0 only";
  const int shared = attention_fwd_dynamic_bytes(plan.tile_m, static_cast<int>(c.head_dim), plan.mma == AttentionMma::kSm90) +
                     attention_fwd_static_bytes(plan.tile_m, plan.walk == AttentionWalk::kGather);
  if (device.max_shared_bytes > 0 && shared > device.max_shared_bytes)
    return concat("tile_m=", plan.tile_m, " at head_dim ", c.head_dim, " needs ", shared,
                  " bytes of shared memory per block, this GPU has ", device.max_shared_bytes);
  if (plan.walk == AttentionWalk::kGather && (!c.has_labels || c.has_bias))
    return concat("walk=gather needs labels and no bias; this call has ", c.has_labels ? "a bias" : "no labels");
  if (plan.pack_gqa && (c.has_bias || !heads_pack(c)))
    return concat("pack_gqa=1 needs no bias and grouped heads (q_heads a multiple of kv_heads above it); this call has ",
                  c.has_bias ? "a bias" : concat("q_heads ", c.q_heads, ", kv_heads ", c.kv_heads));
  if (!grid_fits(c, plan.tile_m, plan.pack_gqa, plan.splits))
    return concat("the grid would exceed ", kAttentionMaxGridDim, " CTAs along an axis (batch ", c.batch, ", q_len ",
                  c.q_len, ", q_heads ", c.q_heads, ", splits ", plan.splits, ")");
  return "";
}

AttentionPlan plan_attention(const AttentionCall& c, const AttentionDevice& device, const AttentionOverride& forced) {
  const bool sm90 = device.cc_major == 9, wgmma = sm90 && device.sm90a_code;
  AttentionPlan plan;
  const bool any_forced = forced.mma != AttentionOverride::kAuto || forced.walk != AttentionOverride::kAuto ||
                          forced.tile_m != 0 || forced.splits != 0 || forced.pack_gqa != AttentionOverride::kAuto;
  if (forced.mma != AttentionOverride::kAuto) plan.mma = static_cast<AttentionMma>(forced.mma);
  else plan.mma = tensor_cores_fit(c) ? AttentionMma::kSm80 : AttentionMma::kSimt;

  if (plan.mma != AttentionMma::kSimt) {
    // Key walk.
    if (forced.walk != AttentionOverride::kAuto) plan.walk = static_cast<AttentionWalk>(forced.walk);
    else if (c.has_labels && !c.has_bias && 2 * c.q_len <= c.k_len &&
             (forced.tile_m != 128 || forced.mma == static_cast<int>(AttentionMma::kSm90)))
      plan.walk = AttentionWalk::kGather;  // (128-row tiles gather in the warp-specialized kernel only)
    // MMA policy (the choice between the two tensor-core policies).
    if (forced.mma == AttentionOverride::kAuto && wgmma && forced.tile_m != 128 &&
        (c.has_bias || (plan.walk == AttentionWalk::kGather && c.q_len > 32)))
      plan.mma = AttentionMma::kSm90;
    // Query tile.
    if (forced.tile_m != 0) plan.tile_m = forced.tile_m;
    else if (sm90 && plan.mma == AttentionMma::kSm80 && plan.walk == AttentionWalk::kTiles && !c.has_bias &&
             c.q_len > 64 && forced.pack_gqa != 1)
      plan.tile_m = 128;
    // GQA packing: where it needs fewer CTAs, i.e. fewer reads of each K/V tile (and its grid fits,
    // which the unpacked grid may where the packed one does not); 128-row tiles pack only in the
    // warp-specialized kernel.
    if (forced.pack_gqa != AttentionOverride::kAuto) plan.pack_gqa = forced.pack_gqa == 1;
    else if (plan.warp_specialized())
      plan.pack_gqa = !c.has_bias && heads_pack_in_tma_boxes(c) &&
                      attention_packs_gqa(c.q_heads, c.kv_heads, c.q_len, plan.tile_m) && grid_fits(c, plan.tile_m, true, 1);
    else
      plan.pack_gqa = plan.tile_m == 64 && !c.has_bias && attention_packs_gqa(c.q_heads, c.kv_heads, c.q_len, 64) &&
                      grid_fits(c, 64, true, 1);
    // Split-KV (the warp-specialized kernel's splits are unmeasured: forced only).
    if (forced.splits != 0) plan.splits = forced.splits;
    else if (plan.warp_specialized()) plan.splits = 1;
    else
      plan.splits = attention_num_splits(c.batch, c.q_heads, c.q_len, c.k_len, c.head_dim, device.sm_count,
                                         plan.tile_m, plan.pack_gqa ? c.kv_heads : 0);
  } else {
    if (forced.walk != AttentionOverride::kAuto) plan.walk = static_cast<AttentionWalk>(forced.walk);
    if (forced.tile_m != 0) plan.tile_m = forced.tile_m;
    if (forced.splits != 0) plan.splits = forced.splits;
    if (forced.pack_gqa != AttentionOverride::kAuto) plan.pack_gqa = forced.pack_gqa == 1;
  }

  const std::string why = plan_mismatch(plan, c, device);
  if (why.empty()) return plan;
  if (any_forced) throw_value_error(kEnv, "=\"", forced.text, "\" cannot run this call: ", why);
  // Only the grid limits (or a head dim the Python layer sends to the reference) stop an automatic
  // plan: the CUDA-core kernel takes the call.
  return AttentionPlan{};
}

}  // namespace dlmfuse
