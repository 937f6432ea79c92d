// sample_tokens on CUDA: one CTA per row, one pass over the vocabulary.
//
// Each thread walks its columns keeping (a) online softmax statistics of the confidence scores,
// (b) the two largest confidence scores, and (c) its best and second-best fp32 Gumbel scores.
// After a block reduction gives the best fp32 score S, every token whose fp32 score lies within
// the error margin of S is re-scored exactly in float64 (the thread's best alone in the common
// case; a rescan of the thread's columns when its second-best is within the margin too), so the
// chosen token equals the float64 reference's, as on the CPU (csrc/cpu/sampling.cpp).
#include <cfloat>
#include <cmath>

#include "cuda/sampling.h"
#include "dlmfuse/half_convert.h"

namespace dlmfuse::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

struct RowStats {
  float c_max, z, s;          // softmax statistics of c: max, sum exp(c - max), sum exp(c - max) (c - max)
  float c_first, c_second;    // two largest c
  float best, second;         // two largest fp32 scores
  int64_t best_index;
  int32_t kept;
};

__device__ __forceinline__ float score_margin(float best) { return 5e-5f + 1e-6f * fabsf(best); }

__device__ __forceinline__ float gumbel_fp32(GumbelWords w) {
  const uint32_t low_bits = (w.lo >> 12) * 2u;
  const float u = static_cast<float>(w.hi) * 0x1.0p-32f + static_cast<float>(low_bits + 1u) * 0x1.0p-53f;
  const float one_minus_u = static_cast<float>(~w.hi) * 0x1.0p-32f +
                            static_cast<float>((1u << 21) - 1u - low_bits) * 0x1.0p-53f;
  const float minus_log_u = u >= 0.5f ? -log1pf(-one_minus_u) : -logf(u);
  return -logf(minus_log_u);
}

__device__ __forceinline__ double gumbel_fp64(GumbelWords w) {
  return -log(-log(gumbel_uniform(w)));
}

template <typename T>
__device__ __forceinline__ float load_logit(const T* row, int64_t j) {
  return static_cast<float>(to_double(row[j]));
}

__device__ __forceinline__ void merge_stats(RowStats& a, const RowStats& b) {
  if (b.z > 0.0f) {
    const float m = fmaxf(a.c_max, b.c_max);
    const float fa = a.z > 0.0f ? __expf(a.c_max - m) : 0.0f, fb = __expf(b.c_max - m);
    a.s = (a.z > 0.0f ? fa * (a.s + (a.c_max - m) * a.z) : 0.0f) + fb * (b.s + (b.c_max - m) * b.z);
    a.z = fa * a.z + fb * b.z;
    a.c_max = m;
  }
  // top-2 of the union
  const float hi = fmaxf(a.c_first, b.c_first);
  const float lo = fmaxf(fminf(a.c_first, b.c_first), fmaxf(a.c_second, b.c_second));
  a.c_first = hi;
  a.c_second = lo;
  if (b.best > a.best || (b.best == a.best && b.best_index >= 0 && b.best_index < a.best_index)) {
    a.second = fmaxf(a.best, b.second);
    a.best = b.best;
    a.best_index = b.best_index;
  } else {
    a.second = fmaxf(a.second, b.best);
  }
  a.kept += b.kept;
}

__device__ RowStats shuffle_down(const RowStats& v, int delta) {
  RowStats o;
  o.c_max = __shfl_down_sync(0xffffffffu, v.c_max, delta);
  o.z = __shfl_down_sync(0xffffffffu, v.z, delta);
  o.s = __shfl_down_sync(0xffffffffu, v.s, delta);
  o.c_first = __shfl_down_sync(0xffffffffu, v.c_first, delta);
  o.c_second = __shfl_down_sync(0xffffffffu, v.c_second, delta);
  o.best = __shfl_down_sync(0xffffffffu, v.best, delta);
  o.second = __shfl_down_sync(0xffffffffu, v.second, delta);
  o.best_index = __shfl_down_sync(0xffffffffu, v.best_index, delta);
  o.kept = __shfl_down_sync(0xffffffffu, v.kept, delta);
  return o;
}

// Block-wide merge; the result is valid in every thread.
__device__ RowStats block_merge(RowStats v, RowStats* shared) {
  for (int delta = 16; delta > 0; delta /= 2) merge_stats(v, shuffle_down(v, delta));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = shared[lane < kWarps ? lane : 0];
    if (lane >= kWarps) v.z = 0.0f, v.c_first = v.c_second = v.best = v.second = -INFINITY, v.best_index = -1, v.kept = 0;
    for (int delta = 16; delta > 0; delta /= 2) merge_stats(v, shuffle_down(v, delta));
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  const RowStats out = shared[0];
  __syncthreads();
  return out;
}

// (score, index) max with ties to the lower index, block-wide; valid in every thread.
__device__ void block_argmax(double& score, int64_t& index, double* shared_score, int64_t* shared_index) {
  for (int delta = 16; delta > 0; delta /= 2) {
    const double s = __shfl_down_sync(0xffffffffu, score, delta);
    const int64_t i = __shfl_down_sync(0xffffffffu, index, delta);
    if (i >= 0 && (index < 0 || s > score || (s == score && i < index))) score = s, index = i;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared_score[warp] = score, shared_index[warp] = index;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      const double s = shared_score[w];
      const int64_t i = shared_index[w];
      if (i >= 0 && (index < 0 || s > score || (s == score && i < index))) score = s, index = i;
    }
    shared_score[0] = score, shared_index[0] = index;
  }
  __syncthreads();
  score = shared_score[0];
  index = shared_index[0];
}

// ---------------------------------------------------------------- top-k / top-p cut by radix select
// The cut is a value of w = l / T' (fp32, as the CPU computes it): tokens with w >= cut are kept.
// Both selections descend the 32-bit order-preserving key of w one byte at a time over the row
// (4 passes each, no sort): top-k counts tokens per byte bucket, top-p sums their probability
// mass; the CPU path (csrc/cpu/sampling_select.h) picks the same values.

__device__ __forceinline__ uint32_t order_key(float w) {
  const uint32_t bits = __float_as_uint(w);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// exp(w - w_max) in float64, the same weight the CPU's top-p selection uses.
__device__ __forceinline__ double token_weight(float w, float w_max) {
  return exp(static_cast<double>(w) - static_cast<double>(w_max));
}

// Block-wide max (is_max) or sum of a double; the result is valid in every thread.
__device__ double block_reduce(double x, bool is_max, double* scratch) {
  for (int delta = 16; delta > 0; delta /= 2) {
    const double other = __shfl_xor_sync(0xffffffffu, x, delta);
    x = is_max ? fmax(x, other) : x + other;
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  double total = scratch[0];
  for (int w = 1; w < kWarps; ++w) total = is_max ? fmax(total, scratch[w]) : total + scratch[w];
  __syncthreads();
  return total;
}

struct SelectShared {
  unsigned int count[256];
  double mass[256];
  uint32_t prefix;
  double above;
  int64_t remaining;
};

// One byte of the descent: histogram of the eligible tokens whose key matches `prefix` on the
// bits above `shift`, then thread 0 walks the buckets from the top. by_mass: weights
// exp(w - w_max) against `target`; else counts against `remaining`.
template <typename W>
__device__ void radix_step(int64_t vocab, W&& w_of, int shift, bool by_mass, float w_max,
                           double target, SelectShared& sh) {
  for (int i = threadIdx.x; i < 256; i += kThreads) sh.count[i] = 0, sh.mass[i] = 0.0;
  __syncthreads();
  const uint32_t high_mask = shift == 24 ? 0u : ~((1u << (shift + 8)) - 1u);
  for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
    float w;
    if (!w_of(j, w)) continue;
    const uint32_t key = order_key(w);
    if ((key & high_mask) != (sh.prefix & high_mask)) continue;
    const int bucket = (key >> shift) & 0xff;
    if (by_mass) atomicAdd(&sh.mass[bucket], token_weight(w, w_max));
    else atomicAdd(&sh.count[bucket], 1u);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int bucket = 255; bucket >= 0; --bucket) {
      const bool crosses = by_mass ? sh.above + sh.mass[bucket] >= target
                                   : static_cast<int64_t>(sh.count[bucket]) >= sh.remaining;
      if (crosses || bucket == 0) {
        sh.prefix = (sh.prefix & high_mask) | (static_cast<uint32_t>(bucket) << shift);
        break;
      }
      if (by_mass) sh.above += sh.mass[bucket];
      else sh.remaining -= sh.count[bucket];
    }
  }
  __syncthreads();
}

template <typename W>
__device__ float select_cut(const SamplingParams& p, int64_t eligible, W&& w_of, float w_max,
                            double total_mass, SelectShared& sh) {
  float cut = -INFINITY;
  if (p.top_p < 1.0) {
    if (threadIdx.x == 0) sh.prefix = 0, sh.above = 0.0;
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) radix_step(p.vocab, w_of, shift, true, w_max, p.top_p * total_mass, sh);
    cut = key_value(sh.prefix);
  }
  if (p.top_k > 0 && p.top_k < eligible) {
    if (threadIdx.x == 0) sh.prefix = 0, sh.remaining = p.top_k;
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) radix_step(p.vocab, w_of, shift, false, w_max, 0.0, sh);
    cut = fmaxf(cut, key_value(sh.prefix));
  }
  __syncthreads();
  return cut;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_tokens_kernel(const SamplingParams p,
                                                                 const int64_t* seed_device,
                                                                 const int64_t* offset_device) {
  __shared__ RowStats shared_stats[kWarps];
  __shared__ double shared_score[kWarps];
  __shared__ int64_t shared_index[kWarps];
  const int64_t row = blockIdx.x;
  const T* logits = static_cast<const T*>(p.logits) + row * p.row_stride;
  const uint64_t seed = seed_device ? static_cast<uint64_t>(*seed_device) : p.seed;
  const uint64_t offset = offset_device ? static_cast<uint64_t>(*offset_device) : p.offset;
  const bool gumbel = p.temperature > 0.0;
  const float inv_t = gumbel ? static_cast<float>(1.0 / p.temperature) : 1.0f;
  const float conf_scale = p.tempered_confidence ? inv_t : 1.0f;

  // Thread t owns the column pairs (2t, 2t + 1) + 2 kThreads k: one Philox call per pair.
  auto fp32_score = [&](int64_t j, float l, GumbelWords words) {
    return l * inv_t + (gumbel ? gumbel_fp32(words) : 0.0f);
  };
  auto is_kept = [&](int64_t j, float l) {  // eligible: not suppressed, logit not -inf / NaN
    return l > -INFINITY && !(p.suppressed != nullptr && p.suppressed[j]);
  };

  float cut = -INFINITY;
  if (p.top_k > 0 || p.top_p < 1.0) {
    __shared__ SelectShared select_shared;
    __shared__ double reduce_scratch[kWarps];
    // w of an eligible token (not suppressed, logit not -inf / NaN), exactly as the main pass.
    auto w_of = [&](int64_t j, float& w) {
      const float l = load_logit(logits, j);
      w = l * inv_t;
      return is_kept(j, l);
    };
    double w_max = -INFINITY, eligible = 0.0;
    for (int64_t j = threadIdx.x; j < p.vocab; j += kThreads) {
      float w;
      if (w_of(j, w)) w_max = fmax(w_max, static_cast<double>(w)), eligible += 1.0;
    }
    w_max = block_reduce(w_max, true, reduce_scratch);
    eligible = block_reduce(eligible, false, reduce_scratch);
    double mass = 0.0;
    if (p.top_p < 1.0) {
      for (int64_t j = threadIdx.x; j < p.vocab; j += kThreads) {
        float w;
        if (w_of(j, w)) mass += token_weight(w, static_cast<float>(w_max));
      }
      mass = block_reduce(mass, false, reduce_scratch);
    }
    if (eligible > 0.0)
      cut = select_cut(p, static_cast<int64_t>(eligible), w_of, static_cast<float>(w_max), mass, select_shared);
  }

  RowStats st{-INFINITY, 0.0f, 0.0f, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -1, 0};
  for (int64_t j0 = 2 * static_cast<int64_t>(threadIdx.x); j0 < p.vocab; j0 += 2 * kThreads) {
    const Philox4x32 r = gumbel ? philox4x32_10(static_cast<uint32_t>(j0 >> 1), static_cast<uint32_t>(row),
                                                static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                                                static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32))
                                : Philox4x32{{0, 0, 0, 0}};
    for (int e = 0; e < 2 && j0 + e < p.vocab; ++e) {
      const int64_t j = j0 + e;
      const float l = load_logit(logits, j);
      if (!is_kept(j, l) || !(l * inv_t >= cut)) continue;
      const float c = l * conf_scale;
      if (c > st.c_max) {
        st.s = st.z > 0.0f ? __expf(st.c_max - c) * (st.s + (st.c_max - c) * st.z) : 0.0f;
        st.z = st.z > 0.0f ? st.z * __expf(st.c_max - c) + 1.0f : 1.0f;
        st.c_max = c;
      } else {
        const float d = c - st.c_max, ex = __expf(d);
        st.z += ex;
        st.s += ex * d;
      }
      if (c > st.c_first) st.c_second = st.c_first, st.c_first = c;
      else if (c > st.c_second) st.c_second = c;
      const float score = fp32_score(j, l, e ? GumbelWords{r.x[2], r.x[3]} : GumbelWords{r.x[0], r.x[1]});
      if (score > st.best) st.second = st.best, st.best = score, st.best_index = j;
      else if (score > st.second) st.second = score;
      ++st.kept;
    }
  }
  const RowStats row_stats = block_merge(st, shared_stats);

  // Exact float64 re-scoring of every token within the margin of the best fp32 score.
  // A +inf best (a +inf logit) would make best - margin NaN: re-score every +inf token instead.
  const float floor = row_stats.best == INFINITY ? INFINITY : row_stats.best - score_margin(row_stats.best);
  double exact = -INFINITY;
  int64_t exact_index = -1;
  auto consider = [&](int64_t j) {
    const double l = to_double(logits[j]);
    const double sj = gumbel ? l / p.temperature + gumbel_fp64(gumbel_words(seed, offset, row, j)) : l;
    if (exact_index < 0 || sj > exact || (sj == exact && j < exact_index)) exact = sj, exact_index = j;
  };
  if (st.best_index >= 0 && st.best >= floor) {
    if (st.second >= floor) {  // rare: several near-best tokens in this thread's columns
      for (int64_t j = 2 * static_cast<int64_t>(threadIdx.x); j < p.vocab; j += 2 * kThreads)
        for (int e = 0; e < 2 && j + e < p.vocab; ++e) {
          const float l = load_logit(logits, j + e);
          if (is_kept(j + e, l) && l * inv_t >= cut &&
              fp32_score(j + e, l, gumbel_words(seed, offset, row, j + e)) >= floor)
            consider(j + e);
        }
    } else {
      consider(st.best_index);
    }
  }
  block_argmax(exact, exact_index, shared_score, shared_index);

  if (threadIdx.x == 0) {
    p.tokens[row] = exact_index;
    float conf = -INFINITY;
    if (exact_index >= 0) {
      const float l = load_logit(logits, exact_index);
      const float c = l * conf_scale;
      switch (p.confidence) {
        case ConfidenceKind::kProb: conf = __expf(c - row_stats.c_max) / row_stats.z; break;
        case ConfidenceKind::kMargin:
          conf = (1.0f - __expf(row_stats.c_second - row_stats.c_max)) / row_stats.z;
          break;
        case ConfidenceKind::kNegEntropy: conf = row_stats.s / row_stats.z - logf(row_stats.z); break;
        case ConfidenceKind::kLogit: conf = l; break;
      }
    }
    p.confidence_out[row] = conf;
  }
}

}  // namespace

cudaError_t sample_tokens(const SamplingParams& p, const int64_t* seed_device,
                          const int64_t* offset_device, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: sample_tokens_kernel<float><<<p.rows, kThreads, 0, stream>>>(p, seed_device, offset_device); break;
    case DType::kBFloat16: sample_tokens_kernel<bf16_t><<<p.rows, kThreads, 0, stream>>>(p, seed_device, offset_device); break;
    case DType::kFloat16: sample_tokens_kernel<fp16_t><<<p.rows, kThreads, 0, stream>>>(p, seed_device, offset_device); break;
    case DType::kFloat64: sample_tokens_kernel<double><<<p.rows, kThreads, 0, stream>>>(p, seed_device, offset_device); break;
  }
  return cudaGetLastError();
}

}  // namespace dlmfuse::cuda
