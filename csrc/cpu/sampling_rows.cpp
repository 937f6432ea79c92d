// CPU sample_tokens row pass. Compiled once per instruction set (see CMakeLists.txt); all code
// lives in that ISA's namespace and uses no std templates (see vec.h).
//
// One pass over a row, in blocks of kSampleBlock columns:
//   * kept tokens: not suppressed, logit not NaN / -inf, and w = l / T' >= cut (top-k / top-p);
//   * softmax statistics of the confidence scores c (max, sum of exp, sum of exp * c);
//   * fp32 scores w + G (Gumbel) or w (greedy) and a buffer of every token within the error
//     margin of the running best; the dispatcher re-scores those exactly in float64.
// The Gumbel noise is computed in fp32 from the exact 52-bit uniform's two Philox words, with
// 1 - u formed exactly so the tail (u -> 1, G up to 36.7) keeps full relative accuracy.
#include <math.h>

#include "cpu/sampling_rows.h"
#include "cpu/vec.h"
#include "dlmfuse/half_convert.h"

namespace dlmfuse::cpu::DLMFUSE_CPU_ISA {
namespace {

using vec::vfloat;
using vec::vint;
using vec::vuint;
using vec::vulong;
constexpr int W = vec::kWidth;
constexpr int B = kSampleBlock;
static_assert(B % (2 * W) == 0, "a block must hold whole Philox vectors");

inline float load_as_float(const float* p, int64_t j) { return p[j]; }
inline float load_as_float(const double* p, int64_t j) { return static_cast<float>(p[j]); }

// float64 logits beyond fp32's range (finite in float64, inf in fp32) need the float64 path.
template <typename T>
inline bool beyond_fp32(const T*, int64_t, int) { return false; }
inline bool beyond_fp32(const double* p, int64_t j0, int n) {
  bool beyond = false;
  for (int j = 0; j < n; ++j) beyond |= (p[j0 + j] > 3.4e38) & (p[j0 + j] < INFINITY) | (p[j0 + j] < -3.4e38) & (p[j0 + j] > -INFINITY);
  return beyond;
}
inline float load_as_float(const bf16_t* p, int64_t j) { return to_float(p[j]); }
inline float load_as_float(const fp16_t* p, int64_t j) { return to_float(p[j]); }

// Philox4x32-10 on W consecutive counters (c0 + lane, c1, c2, c3); same math as philox.h.
inline void philox_vector(vuint c0, uint32_t c1s, uint32_t c2s, uint32_t c3s, uint32_t k0,
                          uint32_t k1, vuint out[4]) {
  vuint c1 = vuint{} + c1s, c2 = vuint{} + c2s, c3 = vuint{} + c3s;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const vulong p0 = __builtin_convertvector(c0, vulong) * 0xD2511F53ull;
    const vulong p1 = __builtin_convertvector(c2, vulong) * 0xCD9E8D57ull;
    const vuint hi0 = __builtin_convertvector(p0 >> 32, vuint);
    const vuint lo0 = __builtin_convertvector(p0, vuint);
    const vuint hi1 = __builtin_convertvector(p1 >> 32, vuint);
    const vuint lo1 = __builtin_convertvector(p1, vuint);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// G = -log(-log u) in fp32 for u = (2 (hi 2^20 + lo >> 12) + 1) / 2^53 (sampling_params.h).
inline vfloat gumbel_from_words(vuint hi, vuint lo) {
  const vuint low_bits = (lo >> 12) * 2u;  // 21-bit field below hi, without its +1
  const vfloat u = __builtin_convertvector(hi, vfloat) * 0x1.0p-32f +
                   __builtin_convertvector(low_bits + 1u, vfloat) * 0x1.0p-53f;
  const vfloat one_minus_u = __builtin_convertvector(~hi, vfloat) * 0x1.0p-32f +
                             __builtin_convertvector((1u << 21) - 1u - low_bits, vfloat) * 0x1.0p-53f;
  // log u with u = 1 - w near 1 taken as log(1 + f) with f = -w exactly: no cancellation.
  vint exponent;
  vfloat f;
  vec::log_reduce(u, exponent, f);
  const vint near_one = u >= vec::splat(0.70710678f);
  f = near_one ? -one_minus_u : f;
  exponent = near_one ? vint{} : exponent;
  const vfloat minus_log_u = -vec::log_reduced(exponent, f);
  return -vec::log(minus_log_u);
}

// Largest Gumbel value the 52-bit uniforms can produce: -log(-log(1 - 2^-53)) = 36.74.
constexpr float kGumbelMax = 36.8f;

inline float max_of(const float* x) {
  vfloat m = vec::splat(-INFINITY);
  for (int j = 0; j < B; j += W) {
    const vfloat v = vec::load(x + j);
    m = v > m ? v : m;
  }
  return vec::reduce_max(m);
}

template <typename T>
void sample_row(const SamplingParams& p, int64_t row, float cut, float* scratch, RowPass* out) {
  const T* logits = static_cast<const T*>(p.logits) + row * p.row_stride;
  const bool gumbel = p.temperature > 0.0;
  const float inv_t = gumbel ? static_cast<float>(1.0 / p.temperature) : 1.0f;
  const float conf_scale = p.tempered_confidence ? inv_t : 1.0f;
  float* w = scratch;            // [B] w = l / T' of kept tokens, -inf otherwise
  float* const score = gumbel ? scratch + B : w;  // [B] w + G, or w itself when greedy
  float* c = scratch + 2 * B;    // [B] confidence scores of kept tokens, -inf otherwise
  float* noise = scratch + 3 * B;  // [B] Gumbel noise
  float* raw = scratch + 4 * B;    // [B] logits as fp32
  const uint32_t seed_lo = static_cast<uint32_t>(p.seed), seed_hi = static_cast<uint32_t>(p.seed >> 32);
  const uint32_t off_lo = static_cast<uint32_t>(p.offset), off_hi = static_cast<uint32_t>(p.offset >> 32);
  const uint32_t first_pair = static_cast<uint32_t>(p.column_offset >> 1);  // column_offset is even

  const vfloat neg_inf = vec::splat(-INFINITY), pos_inf = vec::splat(INFINITY), vcut = vec::splat(cut);
  RowPass r;
  float best = -INFINITY;
  vuint lane_index;
  for (int i = 0; i < W; ++i) lane_index[i] = static_cast<uint32_t>(i);

  for (int64_t j0 = 0; j0 < p.vocab; j0 += B) {
    const int n = static_cast<int>(vec::min_i64(B, p.vocab - j0));
    // Logits of the block as fp32 (padding and suppressed tokens -inf), then the kept test,
    // w and c, branch-free on whole vectors.
    for (int j = 0; j < n; ++j) raw[j] = load_as_float(logits, j0 + j);
    r.needs_exact |= beyond_fp32(logits, j0, n);
    vec::fill(raw + n, raw + B, -INFINITY);
    if (p.suppressed != nullptr)
      for (int j = 0; j < n; ++j) raw[j] = p.suppressed[j0 + j] ? -INFINITY : raw[j];
    vint out_of_range = {};
    for (int j = 0; j < B; j += W) {
      const vfloat l = vec::load(raw + j);
      const vfloat wj = l * inv_t;
      const vfloat cj = l * conf_scale;
      const vint kept = (l > neg_inf) & (wj >= vcut);  // NaN fails both tests
      vec::store(w + j, kept ? wj : neg_inf);
      vec::store(c + j, kept ? cj : neg_inf);
      // A finite logit whose fp32 w or c overflows (extreme T) needs the float64 path.
      out_of_range |= (l > neg_inf) & (l < pos_inf) & ((wj == pos_inf) | (wj == neg_inf) | (cj == pos_inf) | (cj == neg_inf));
    }
    for (int i = 0; i < W; ++i) r.needs_exact |= out_of_range[i] != 0;

    // Noise only where it can matter: a block whose best w plus the largest possible Gumbel
    // value cannot reach the running best is skipped (most of a peaked LM distribution).
    float block_best = max_of(w);
    if (gumbel) {
      if (block_best + kGumbelMax >= best - sampling_score_margin(best)) {
        for (int v = 0; v < B / 2; v += W) {
          vuint words[4];
          const vuint counter = lane_index + (static_cast<uint32_t>((j0 >> 1) + v) + first_pair);
          philox_vector(counter, static_cast<uint32_t>(row), off_lo, off_hi, seed_lo, seed_hi, words);
          const vfloat g_even = gumbel_from_words(words[0], words[1]);
          const vfloat g_odd = gumbel_from_words(words[2], words[3]);
          for (int i = 0; i < W; ++i) {
            noise[2 * (v + i)] = g_even[i];
            noise[2 * (v + i) + 1] = g_odd[i];
          }
        }
        for (int j = 0; j < B; j += W) vec::store(score + j, vec::load(w + j) + vec::load(noise + j));
        block_best = max_of(score);
      } else {
        block_best = -INFINITY;
      }
    }

    // Candidates near the running best (rare after the first blocks: checked per block first).
    if (block_best > -INFINITY && block_best >= best - sampling_score_margin(best)) {
      for (int j = 0; j < n; ++j) {
        const float sj = score[j];
        if (!(sj > -INFINITY) || sj < best - sampling_score_margin(best)) continue;
        if (sj > best) best = sj;
        if (r.n_candidates == kSampleCandidates) {  // drop entries the new best has left behind
          int kept_count = 0;
          for (int e = 0; e < r.n_candidates; ++e) {
            if (r.candidate_scores[e] < best - sampling_score_margin(best)) continue;
            r.candidates[kept_count] = r.candidates[e];
            r.candidate_scores[kept_count++] = r.candidate_scores[e];
          }
          r.n_candidates = kept_count;
          if (r.n_candidates == kSampleCandidates) {
            r.overflow = true;
            continue;
          }
        }
        r.candidate_scores[r.n_candidates] = sj;
        r.candidates[r.n_candidates++] = j0 + j;
      }
    }

    // Softmax statistics of c over this block, merged into the row's in float64.
    vfloat cmax = vec::splat(-INFINITY);
    for (int j = 0; j < B; j += W) {
      const vfloat x = vec::load(c + j);
      cmax = x > cmax ? x : cmax;
    }
    const float block_cmax = vec::reduce_max(cmax);
    if (!(block_cmax > -INFINITY)) continue;
    vfloat vz = {}, vs = {}, vcount = {};
    const vfloat offset = vec::splat(block_cmax);
    for (int j = 0; j < B; j += W) {
      const vfloat x = vec::load(c + j);
      const vfloat d = x - offset;  // -inf for dropped tokens -> e = 0
      const vfloat e = vec::exp2(d * kLog2e);
      vz += e;
      const vint live = x > vec::splat(-INFINITY);
      // e * d -> 0 as d -> -inf; skip e == 0 so an fp32 overflow of d (-inf) cannot give NaN.
      vs += (live & (e > vfloat{})) ? e * d : vfloat{};
      vcount += live ? vec::splat(1.0f) : vfloat{};
    }
    const double zb = vec::reduce_sum(vz), sb = vec::reduce_sum(vs);
    const double m_new = r.c_max > block_cmax ? r.c_max : block_cmax;
    if (r.z > 0) {  // rescale what the previous blocks accumulated to the new max
      const double fa = ::exp(r.c_max - m_new);
      r.s = fa * (r.s + (r.c_max - m_new) * r.z);
      r.z *= fa;
    }
    const double fb = ::exp(block_cmax - m_new);
    r.s += fb * (sb + (block_cmax - m_new) * zb);
    r.z += fb * zb;
    r.kept += static_cast<int64_t>(vec::reduce_sum(vcount));
    // Second-largest c (margin confidence, statistics): only a block reaching above it can change it.
    if ((p.confidence == ConfidenceKind::kMargin || p.stats != nullptr) && block_cmax > r.c_second) {
      double first = r.c_max;
      for (int j = 0; j < n; ++j) {
        const double x = c[j];
        if (x > first) {
          r.c_second = first;
          first = x;
        } else if (x > r.c_second) {
          r.c_second = x;
        }
      }
    }
    r.c_max = m_new;
  }
  *out = r;
}

}  // namespace

SampleRowFn sample_row_fn(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return &sample_row<float>;
    case DType::kBFloat16: return &sample_row<bf16_t>;
    case DType::kFloat16: return &sample_row<fp16_t>;
    case DType::kFloat64: return &sample_row<double>;
  }
  return nullptr;
}

}  // namespace dlmfuse::cpu::DLMFUSE_CPU_ISA
