// sample_tokens on CUDA: one CTA per row, one pass over the vocabulary.
//
// Each thread walks its columns keeping (a) online softmax statistics of the confidence scores,
// (b) the two largest confidence scores, and (c) its best and second-best fp32 Gumbel scores.
// The pass reads 8-column chunks with 16-byte loads when the row is 16-byte aligned: thread t
// owns chunks t, t + kThreads, ... and loads two of them before using either (one for fp64,
// whose chunk is four loads already), so several loads are in flight per thread; one Philox call
// gives the noise of a column pair, four per chunk. The columns after the last whole chunk, and
// every column of an unaligned row, go through the scalar loop over column pairs
// (2t, 2t + 1) + 2 kThreads k. Both loops feed each column to the same per-column update
// (add_column), in increasing column order within a thread. The fp32 Gumbel noise uses the
// special function unit's log2 (gumbel_fp32); score_margin covers its error.
// After a block reduction gives the best fp32 score S, every token whose fp32 score lies within
// the error margin of S is re-scored exactly in float64 (the thread's best alone in the common
// case; a rescan of the thread's columns when its second-best is within the margin too), so the
// chosen token equals the float64 reference's, as on the CPU (csrc/cpu/sampling.cpp).
#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>

#include "cuda/sampling.h"
#include "cuda/sampling_noise.cuh"
#include "cuda/sampling_select.cuh"
#include "dlmfuse/half_convert.h"

namespace dlmfuse::cuda {
namespace {

using namespace sampling;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 8;  // columns per vector chunk: 16 bytes of bf16 / fp16

struct RowStats {
  float c_max, z, s;          // softmax statistics of c: max, sum exp(c - max), sum exp(c - max) (c - max)
  float c_first, c_second;    // two largest c
  float best, second;         // two largest fp32 scores
  int64_t best_index;
  int32_t kept;
};

// Screening width around the best fp32 score S; the float64 re-scoring decides among the tokens
// inside it. Error budget of one fp32 score against its float64 value: the scaled logit
// w = l * (1/T) and the final add carry <= 4 roundings, 2.4e-7 |score| + 1.8e-7 |g|, and the fp32
// Gumbel noise g (gumbel_fp32) is off by <= 7e-6 + 3e-7 |g|; with |g| <= 36.8 one score is off by
// <= 2.5e-5 + 2.4e-7 |score|. The winner's and S's errors together, 5e-5 + 4.8e-7 |S|, stay
// inside the margin with room to spare; a wider margin only re-scores a few more tokens.
__device__ __forceinline__ float score_margin(float best) { return 1e-4f + 4e-6f * fabsf(best); }

// A logit as fp32 (exact for bf16 / fp16 / fp32; float64 rounds to nearest).
__device__ __forceinline__ float logit_float(bf16_t x) { return to_float(x); }
__device__ __forceinline__ float logit_float(fp16_t x) {  // the hardware conversion: exact, like to_float
  return __half2float(__ushort_as_half(x.bits));
}
__device__ __forceinline__ float logit_float(float x) { return x; }
__device__ __forceinline__ float logit_float(double x) { return static_cast<float>(x); }

template <typename T>
__device__ __forceinline__ float load_logit(const T* row, int64_t j) {
  return logit_float(row[j]);
}

// ---------------------------------------------------------------- 16-byte chunk loads

// The raw 16-byte words of one 8-column chunk: 1 for bf16 / fp16, 2 for fp32, 4 for fp64.
template <typename T>
struct ChunkBits {
  static constexpr int kWords = kChunk * static_cast<int>(sizeof(T)) / 16;
  uint4 word[kWords];
};

template <typename T>
__device__ __forceinline__ ChunkBits<T> load_chunk(const T* row, int64_t chunk) {
  const uint4* src = reinterpret_cast<const uint4*>(row + chunk * kChunk);
  ChunkBits<T> bits;
#pragma unroll
  for (int i = 0; i < ChunkBits<T>::kWords; ++i) bits.word[i] = __ldg(src + i);
  return bits;
}

// 32-bit word i (compile-time after unrolling) of the chunk, in memory order.
template <typename T>
__device__ __forceinline__ uint32_t chunk_word(const ChunkBits<T>& bits, int i) {
  const uint4& v = bits.word[i / 4];
  switch (i % 4) {
    case 0: return v.x;
    case 1: return v.y;
    case 2: return v.z;
    default: return v.w;
  }
}

// Logit e (0..7) of a chunk as fp32, the same value load_logit gives (little-endian: the lower
// half of a 32-bit word is the lower column).
__device__ __forceinline__ float chunk_logit(const ChunkBits<bf16_t>& bits, int e) {
  const uint32_t word = chunk_word(bits, e / 2);
  return __uint_as_float(e % 2 ? word & 0xffff0000u : word << 16);
}
__device__ __forceinline__ float chunk_logit(const ChunkBits<fp16_t>& bits, int e) {
  const uint32_t word = chunk_word(bits, e / 2);
  return logit_float(fp16_t{static_cast<uint16_t>(e % 2 ? word >> 16 : word & 0xffffu)});
}
__device__ __forceinline__ float chunk_logit(const ChunkBits<float>& bits, int e) {
  return __uint_as_float(chunk_word(bits, e));
}
__device__ __forceinline__ float chunk_logit(const ChunkBits<double>& bits, int e) {
  const double l = __hiloint2double(static_cast<int>(chunk_word(bits, 2 * e + 1)),
                                    static_cast<int>(chunk_word(bits, 2 * e)));
  return logit_float(l);
}

// ---------------------------------------------------------------- the per-column update

// What every column of the row is tested and scored against.
struct RowScan {
  float inv_t;       // 1 / T, 1 when greedy
  float conf_scale;  // c = l * conf_scale
  float cut;         // top-k / top-p: kept tokens have w = l * inv_t >= cut (-inf: no filter)
  const uint8_t* suppressed;

  // w = l / T' in fp32: the value the cut and the fp32 score use (never fused into an FMA, so
  // every pass gets the same w).
  __device__ __forceinline__ float scaled(float l) const { return __fmul_rn(l, inv_t); }
  // Eligible: not suppressed, logit not -inf / NaN.
  __device__ __forceinline__ bool eligible(int64_t j, float l) const {
    return l > -INFINITY && !(suppressed != nullptr && suppressed[j]);
  }
  // Kept: eligible and through the cut (w = scaled(l)).
  __device__ __forceinline__ bool kept(int64_t j, float l, float w) const { return eligible(j, l) && w >= cut; }
  // The fp32 score the pass ranks by (w = scaled(l)); every pass over a column computes it so.
  template <bool kGumbel>
  __device__ __forceinline__ float score(float w, GumbelWords words) const {
    return kGumbel ? __fadd_rn(w, gumbel_fp32(words)) : w;
  }
};

// Adds column j (logit l, Gumbel words `words`, unused when greedy) to the thread's statistics if
// it is kept. Columns must come in increasing j so best_index keeps the lowest index among equal
// scores (strict >), as merge_stats does across threads.
// The top-2 updates use fmaxf / fminf instead of if / else-if chains: the same values for any
// c and score that are not NaN, and a kept column's are not (a NaN c = l / T' or score needs a
// NaN w, which fails w >= cut).
template <bool kGumbel>
__device__ __forceinline__ void add_column(RowStats& st, const RowScan& rs, int64_t j, float l, GumbelWords words) {
  const float w = rs.scaled(l);
  if (!rs.kept(j, l, w)) return;
  const float c = l * rs.conf_scale;
  if (c > st.c_max) {
    st.s = st.z > 0.0f ? __expf(st.c_max - c) * (st.s + (st.c_max - c) * st.z) : 0.0f;
    st.z = st.z > 0.0f ? st.z * __expf(st.c_max - c) + 1.0f : 1.0f;
    st.c_max = c;
  } else {
    const float d = c - st.c_max, ex = __expf(d);
    st.z += ex;
    st.s += ex * d;
  }
  st.c_second = fmaxf(st.c_second, fminf(st.c_first, c));
  st.c_first = fmaxf(st.c_first, c);
  const float score = rs.score<kGumbel>(w, words);
  if (score > st.best) st.best_index = j;
  st.second = fmaxf(st.second, fminf(st.best, score));
  st.best = fmaxf(st.best, score);
  ++st.kept;
}

// The 8 columns of chunk `chunk`, in increasing order: one Philox call per column pair.
template <bool kGumbel, typename T>
__device__ __forceinline__ void scan_chunk(RowStats& st, const RowScan& rs, const RowNoise& noise,
                                           int64_t chunk, const ChunkBits<T>& bits) {
  const int64_t j0 = chunk * kChunk;  // even, so the chunk holds the pairs j0 / 2 .. j0 / 2 + 3
  float l[kChunk];  // converted first: for fp64 this frees the 16 registers of the raw chunk
#pragma unroll
  for (int e = 0; e < kChunk; ++e) l[e] = chunk_logit(bits, e);
#pragma unroll
  for (int q = 0; q < kChunk / 2; ++q) {
    const Philox4x32 r = kGumbel ? noise.pair(static_cast<uint32_t>((j0 >> 1) + q)) : Philox4x32{{0, 0, 0, 0}};
    add_column<kGumbel>(st, rs, j0 + 2 * q, l[2 * q], GumbelWords{r.x[0], r.x[1]});
    add_column<kGumbel>(st, rs, j0 + 2 * q + 1, l[2 * q + 1], GumbelWords{r.x[2], r.x[3]});
  }
}

// Chunks threadIdx.x + kThreads k of [0, n_chunks), kStep of them loaded before any is used.
template <bool kGumbel, typename T>
__device__ __forceinline__ void scan_chunks(RowStats& st, const RowScan& rs, const RowNoise& noise,
                                            const T* row, int64_t n_chunks) {
  constexpr int kStep = sizeof(T) <= 4 ? 2 : 1;  // 32 (bf16 / fp16) or 64 bytes in flight per thread
  int64_t chunk = threadIdx.x;
  for (; chunk + (kStep - 1) * kThreads < n_chunks; chunk += kStep * kThreads) {
    ChunkBits<T> bits[kStep];
#pragma unroll
    for (int k = 0; k < kStep; ++k) bits[k] = load_chunk(row, chunk + k * kThreads);
#pragma unroll
    for (int k = 0; k < kStep; ++k) scan_chunk<kGumbel>(st, rs, noise, chunk + k * kThreads, bits[k]);
  }
  if (kStep > 1 && chunk < n_chunks) scan_chunk<kGumbel>(st, rs, noise, chunk, load_chunk(row, chunk));
}

// Columns [begin, vocab) one at a time (begin even): thread t takes the pairs starting at
// begin + 2 t + 2 kThreads k, one Philox call per pair.
template <bool kGumbel, typename T>
__device__ __forceinline__ void scan_pairs(RowStats& st, const RowScan& rs, const RowNoise& noise,
                                           const T* row, int64_t begin, int64_t vocab) {
  for (int64_t j0 = begin + 2 * static_cast<int64_t>(threadIdx.x); j0 < vocab; j0 += 2 * kThreads) {
    const Philox4x32 r = kGumbel ? noise.pair(static_cast<uint32_t>(j0 >> 1)) : Philox4x32{{0, 0, 0, 0}};
    add_column<kGumbel>(st, rs, j0, load_logit(row, j0), GumbelWords{r.x[0], r.x[1]});
    if (j0 + 1 < vocab) add_column<kGumbel>(st, rs, j0 + 1, load_logit(row, j0 + 1), GumbelWords{r.x[2], r.x[3]});
  }
}

// Calls f(j) for every column the thread owns in the pass (the chunks, then the scalar pairs),
// for the rare rescan: kept rolled up, since f holds a float64 re-scoring and unrolled copies
// would only add code and register pressure.
template <typename F>
__device__ __forceinline__ void for_each_owned_column(int64_t n_chunks, int64_t vocab, F&& f) {
#pragma unroll 1
  for (int64_t chunk = threadIdx.x; chunk < n_chunks; chunk += kThreads)
#pragma unroll 1
    for (int e = 0; e < kChunk; ++e) f(chunk * kChunk + e);
#pragma unroll 1
  for (int64_t j0 = n_chunks * kChunk + 2 * static_cast<int64_t>(threadIdx.x); j0 < vocab; j0 += 2 * kThreads) {
    f(j0);
    if (j0 + 1 < vocab) f(j0 + 1);
  }
}

// The thread's statistics over the columns it owns.
template <bool kGumbel, typename T>
__device__ __forceinline__ RowStats scan_row(const RowScan& rs, const RowNoise& noise, const T* row,
                                             int64_t n_chunks, int64_t vocab) {
  RowStats st{-INFINITY, 0.0f, 0.0f, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -1, 0};
  scan_chunks<kGumbel>(st, rs, noise, row, n_chunks);
  scan_pairs<kGumbel>(st, rs, noise, row, n_chunks * kChunk, vocab);
  return st;
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

// Block-wide merge into shared[0], which stays valid (nothing writes `shared` afterwards); returns
// the merged best fp32 score, valid in every thread. The rest is read back from shared[0] where it
// is used, rather than held in registers through the re-scoring.
__device__ float block_merge(RowStats v, RowStats* shared) {
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
  return shared[0].best;
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

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) sample_tokens_kernel(const SamplingParams p,
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
  RowScan rs{inv_t, conf_scale, -INFINITY, p.suppressed};
  const RowNoise noise(static_cast<uint32_t>(row), offset, seed, p.column_offset);

  if (p.top_k > 0 || p.top_p < 1.0) {
    __shared__ SelectShared select_shared;
    __shared__ double reduce_scratch[kWarps];
    // w of an eligible token (not suppressed, logit not -inf / NaN), exactly as the main pass.
    auto w_of = [&](int64_t j, float& w) {
      const float l = load_logit(logits, j);
      w = rs.scaled(l);
      return rs.eligible(j, l);
    };
    double w_max = -INFINITY, eligible = 0.0;
    for (int64_t j = threadIdx.x; j < p.vocab; j += kThreads) {
      float w;
      if (w_of(j, w)) w_max = fmax(w_max, static_cast<double>(w)), eligible += 1.0;
    }
    w_max = block_reduce<kThreads>(w_max, true, reduce_scratch);
    eligible = block_reduce<kThreads>(eligible, false, reduce_scratch);
    double mass = 0.0;
    if (p.top_p < 1.0) {
      for (int64_t j = threadIdx.x; j < p.vocab; j += kThreads) {
        float w;
        if (w_of(j, w)) mass += token_weight(w, static_cast<float>(w_max));
      }
      mass = block_reduce<kThreads>(mass, false, reduce_scratch);
    }
    if (eligible > 0.0)
      rs.cut = select_cut<kThreads>(p, static_cast<int64_t>(eligible), w_of, static_cast<float>(w_max), mass, select_shared);
  }

  // 16-byte loads need a 16-byte aligned row; otherwise every column takes the scalar loop.
  const bool row_aligned = reinterpret_cast<uintptr_t>(logits) % 16 == 0;
  const int64_t n_chunks = row_aligned ? p.vocab / kChunk : 0;
  const RowStats st = gumbel ? scan_row<true>(rs, noise, logits, n_chunks, p.vocab)
                             : scan_row<false>(rs, noise, logits, n_chunks, p.vocab);
  const float row_best = block_merge(st, shared_stats);

  // Exact float64 re-scoring of every token within the margin of the best fp32 score.
  // A +inf best (a +inf logit) would make best - margin NaN: re-score every +inf token instead.
  const float floor = row_best == INFINITY ? INFINITY : row_best - score_margin(row_best);
  double exact = -INFINITY;
  int64_t exact_index = -1;
  auto consider = [&](int64_t j) {
    const double l = to_double(logits[j]);
    const double sj = gumbel ? l / p.temperature + gumbel_fp64(noise.words(j)) : l;
    if (exact_index < 0 || sj > exact || (sj == exact && j < exact_index)) exact = sj, exact_index = j;
  };
  if (st.best_index >= 0 && st.best >= floor) {
    if (st.second >= floor) {  // rare: several near-best tokens in this thread's columns
      for_each_owned_column(n_chunks, p.vocab, [&](int64_t j) {
        const float l = load_logit(logits, j), w = rs.scaled(l);
        if (rs.kept(j, l, w) && (gumbel ? rs.score<true>(w, noise.words(j))
                                        : rs.score<false>(w, GumbelWords{0, 0})) >= floor)
          consider(j);
      });
    } else {
      consider(st.best_index);
    }
  }
  block_argmax(exact, exact_index, shared_score, shared_index);

  if (threadIdx.x == 0) {
    const RowStats row_stats = shared_stats[0];
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
    if (p.stats != nullptr) {
      double* out = p.stats + row * kSamplingStats;
      out[kStatMax] = row_stats.c_max;
      out[kStatSumExp] = row_stats.z;
      out[kStatSumExpTimesD] = row_stats.s;
      out[kStatSecond] = row_stats.c_second;
    }
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
