// kv_scatter_ on CUDA: one CTA per new row (b, i) copies that row's H x D elements of K and of
// V with the widest vector the pointers and strides allow (16 bytes for aligned caches).
//
// Bandwidth comes from bytes in flight: each thread first loads kUnroll vectors of K and of V
// (2 x kUnroll independent 16-byte loads), then stores them, instead of a load -> store chain per
// vector that the compiler must keep in order (the caches may alias the inputs as far as it knows).
#include "cuda/kv_cache.h"
#include "cuda/launch.h"

namespace dlmfuse::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kUnroll = 4;

template <typename Vec>
__global__ void __launch_bounds__(kThreads) kv_scatter_kernel(const KvScatterParams p) {
  const int64_t b = blockIdx.x / p.n_new;
  const int64_t i = blockIdx.x % p.n_new;
  const int64_t pos = p.position(b, i);
  if (pos < 0 || pos >= p.max_len) return;  // validate=False contract: skip, never write OOB
  if (p.resolve_duplicates) {  // a later row with this position wins; CTAs never share a slot
    bool superseded = false;
    for (int64_t j = i + 1 + threadIdx.x; j < p.n_new; j += kThreads) superseded |= p.position(b, j) == pos;
    if (__syncthreads_or(superseded)) return;
  }
  // Per-row element counts fit in 32 bits (heads * head_dim of one cache row).
  const int vecs_per_head = static_cast<int>(p.head_dim * p.element_size / static_cast<int64_t>(sizeof(Vec)));
  const int total = static_cast<int>(p.heads) * vecs_per_head;
  const int64_t es = p.element_size;
  // Row bases in bytes; head h adds h * (head stride) on top.
  const char* k_src = static_cast<const char*>(p.k_new) + (b * p.k_new_strides[0] + i * p.k_new_strides[1]) * es;
  const char* v_src = static_cast<const char*>(p.v_new) + (b * p.v_new_strides[0] + i * p.v_new_strides[1]) * es;
  char* k_dst = static_cast<char*>(p.k_cache) + (b * p.k_cache_strides[0] + pos * p.k_cache_strides[1]) * es;
  char* v_dst = static_cast<char*>(p.v_cache) + (b * p.v_cache_strides[0] + pos * p.v_cache_strides[1]) * es;
  const int64_t k_src_head = p.k_new_strides[2] * es, v_src_head = p.v_new_strides[2] * es;
  const int64_t k_dst_head = p.k_cache_strides[2] * es, v_dst_head = p.v_cache_strides[2] * es;

  for (int first = threadIdx.x; first < total; first += kThreads * kUnroll) {
    Vec k_vec[kUnroll], v_vec[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = first + u * kThreads;
      if (c < total) {
        const int h = c / vecs_per_head, within = c - h * vecs_per_head;
        k_vec[u] = reinterpret_cast<const Vec*>(k_src + h * k_src_head)[within];
        v_vec[u] = reinterpret_cast<const Vec*>(v_src + h * v_src_head)[within];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = first + u * kThreads;
      if (c < total) {
        const int h = c / vecs_per_head, within = c - h * vecs_per_head;
        reinterpret_cast<Vec*>(k_dst + h * k_dst_head)[within] = k_vec[u];
        reinterpret_cast<Vec*>(v_dst + h * v_dst_head)[within] = v_vec[u];
      }
    }
  }
}

// Widest power-of-two vector (<= 16 bytes) dividing every base pointer, every stride in bytes
// and the row length in bytes.
int vector_bytes(const KvScatterParams& p) {
  const void* ptrs[] = {p.k_cache, p.v_cache, p.k_new, p.v_new};
  const int64_t* strides[] = {p.k_cache_strides, p.v_cache_strides, p.k_new_strides, p.v_new_strides};
  for (int bytes = 16; bytes > 1; bytes /= 2) {
    bool ok = (p.head_dim * p.element_size) % bytes == 0;
    for (int t = 0; t < 4 && ok; ++t) {
      ok = aligned_to(ptrs[t], bytes);
      for (int d = 0; d < 3 && ok; ++d) ok = (strides[t][d] * p.element_size) % bytes == 0;
    }
    if (ok) return bytes;
  }
  return 1;
}

}  // namespace

cudaError_t kv_scatter(const KvScatterParams& p, cudaStream_t stream) {
  const int64_t blocks = p.batch * p.n_new;
  if (blocks == 0 || p.heads == 0 || p.head_dim == 0) return cudaSuccess;
  switch (vector_bytes(p)) {
    case 16: kv_scatter_kernel<uint4><<<blocks, kThreads, 0, stream>>>(p); break;
    case 8: kv_scatter_kernel<uint2><<<blocks, kThreads, 0, stream>>>(p); break;
    case 4: kv_scatter_kernel<uint32_t><<<blocks, kThreads, 0, stream>>>(p); break;
    case 2: kv_scatter_kernel<uint16_t><<<blocks, kThreads, 0, stream>>>(p); break;
    default: kv_scatter_kernel<uint8_t><<<blocks, kThreads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace dlmfuse::cuda
