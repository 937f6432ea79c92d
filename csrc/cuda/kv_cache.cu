// kv_scatter_ on CUDA: one CTA per new row (b, i) copies that row's H x D elements of K and of
// V with the widest vector the pointers and strides allow (16 bytes for aligned caches).
#include "cuda/kv_cache.h"
#include "cuda/launch.h"

namespace dlmfuse::cuda {
namespace {

constexpr int kThreads = 128;

template <typename Vec>
__global__ void __launch_bounds__(kThreads) kv_scatter_kernel(const KvScatterParams p) {
  const int64_t b = blockIdx.x / p.n_new;
  const int64_t i = blockIdx.x % p.n_new;
  const int64_t pos = p.position(b, i);
  if (pos < 0 || pos >= p.max_len) return;  // validate=False contract: skip, never write OOB
  const int64_t vecs_per_head = p.head_dim * p.element_size / static_cast<int64_t>(sizeof(Vec));
  const int64_t total = p.heads * vecs_per_head;
  const char* k_src = static_cast<const char*>(p.k_new);
  const char* v_src = static_cast<const char*>(p.v_new);
  char* k_dst = static_cast<char*>(p.k_cache);
  char* v_dst = static_cast<char*>(p.v_cache);
  for (int64_t c = threadIdx.x; c < total; c += kThreads) {
    const int64_t h = c / vecs_per_head, within = c % vecs_per_head;
    const int64_t es = p.element_size;
    const int64_t k_in = (b * p.k_new_strides[0] + i * p.k_new_strides[1] + h * p.k_new_strides[2]) * es;
    const int64_t v_in = (b * p.v_new_strides[0] + i * p.v_new_strides[1] + h * p.v_new_strides[2]) * es;
    const int64_t k_out = (b * p.k_cache_strides[0] + pos * p.k_cache_strides[1] + h * p.k_cache_strides[2]) * es;
    const int64_t v_out = (b * p.v_cache_strides[0] + pos * p.v_cache_strides[1] + h * p.v_cache_strides[2]) * es;
    reinterpret_cast<Vec*>(k_dst + k_out)[within] = reinterpret_cast<const Vec*>(k_src + k_in)[within];
    reinterpret_cast<Vec*>(v_dst + v_out)[within] = reinterpret_cast<const Vec*>(v_src + v_in)[within];
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
