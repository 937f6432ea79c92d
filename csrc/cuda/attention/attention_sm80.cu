// Attention forward on tensor cores (sm_80 mma.sync; runs on A100 and H100):
// the launch (grid, shared memory, kernel instance per AttentionParams flags) and the host-side
// checks. The kernel is in attention_sm80_kernel.cuh, its per-warp tile math in
// attention_sm80_tile.cuh.
#include "cuda/attention/attention.h"
#include "cuda/attention/attention_sm80_kernel.cuh"
#include "cuda/attention/split_merge.cuh"
#include "cuda/device_info.h"

#include <type_traits>

namespace dlmfuse::cuda {
namespace {

using namespace sm80;

static_assert(kBlockM == kAttentionCtaRows && kBlockN == kAttentionKeyTile, "the planner's tile sizes");
// Whether the current device allows `bytes` of dynamic shared memory per block (with 1 KB to spare
// for the kernel's static shared variables).
bool dynamic_shared_fits(int bytes) {
  return bytes + 1024 <= current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
}

template <typename T, int D, int kStages, bool kNext, int kM = 1, bool kWgmma = false, bool kGather = false>
cudaError_t launch_sm80(const AttentionParams& p, cudaStream_t stream) {
  constexpr int kAlignSlack = kWgmma ? 1024 : 0;  // the kernel aligns its tiles to 1024 bytes
  constexpr int base_bytes = shared_bytes<D, kStages, kM>() + kAlignSlack;
  int most_bytes = base_bytes, bytes = base_bytes;
  if constexpr (kNext && !kGather) {  // (gathered keys: calls without a bias only)
    // Room for bias tiles where the device has it (the same for every call on a device, so that
    // concurrent launches never lower the attribute under each other); used by tileable biases.
    const int tiled_bytes = base_bytes + bias_tiles_bytes(kM * kBlockM);
    if (dynamic_shared_fits(tiled_bytes)) {
      most_bytes = tiled_bytes;
      if (bias_tileable(p)) bytes = tiled_bytes;
    }
  }
  auto kernel = attention_sm80_kernel<T, D, kStages, kNext, kM, kWgmma, kGather>;
  const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, most_bytes);
  if (attr != cudaSuccess) return attr;
  const bool packed = kNext && kM == 1 && p.pack_gqa;  // rows: (query, head) pairs per KV head
  const int64_t rows = packed ? p.q_len * (p.q_heads / p.kv_heads) : p.q_len;
  const auto q_tiles = static_cast<unsigned>(ceil_div(rows, kM * kBlockM));
  const auto heads = static_cast<unsigned>(packed ? p.kv_heads : p.q_heads);
  // kNext with labels: heaviest first. CTAs start in grid order (x fastest), and under the masks
  // of the field (causal, block-causal, BD3, Eso-LM) later query tiles see more keys. With the
  // heads fastest and the query tiles in descending order, the longest CTAs start first and the
  // tail holds the shortest (list scheduling): a model of A2 on 264 resident CTAs gives 0.95 of
  // the ideal makespan, against 0.77 in the verified order (tiles fastest, ascending). Without
  // labels every CTA has the same work: the verified order, whose concurrent CTAs share K/V heads.
  const dim3 grid = kNext && p.has_labels ? dim3(heads, q_tiles, static_cast<unsigned>(p.batch * p.num_splits))
                                          : dim3(q_tiles, heads, static_cast<unsigned>(p.batch * p.num_splits));
  kernel<<<grid, kThreads, bytes, stream>>>(p);
  if (p.num_splits == 1) return cudaGetLastError();
  const cudaError_t launched = cudaGetLastError();
  if (launched != cudaSuccess) return launched;
  return launch_split_merge<T, D>(p, stream);
}

// Whether the current device is an sm_90 GPU (H100 / H200): only there does the wgmma instance
// use wgmma (elsewhere it would be the next paths plus 1 KB of unused shared memory).
bool current_device_is_sm90() { return current_device_attribute(cudaDevAttrComputeCapabilityMajor) == 9; }

// The kernel instance for p.kv_stages, p.next_paths, p.wide_rows, p.wgmma and p.gather_keys
// (next_paths, wide_rows and wgmma: two buffers only; wgmma on sm_90 only, else the next paths
// run; gather_keys: next paths or wgmma, 16 rows per warp).
template <typename T, int D>
cudaError_t launch_variant(const AttentionParams& p, cudaStream_t stream) {
  if (p.wgmma && current_device_is_sm90())
    return p.gather_keys ? launch_sm80<T, D, 2, true, 1, true, true>(p, stream)
                         : launch_sm80<T, D, 2, true, 1, true>(p, stream);
  if (p.wide_rows) return launch_sm80<T, D, 2, true, 2>(p, stream);
  if (p.next_paths)
    return p.gather_keys ? launch_sm80<T, D, 2, true, 1, false, true>(p, stream) : launch_sm80<T, D, 2, true>(p, stream);
  return p.kv_stages == 2 ? launch_sm80<T, D, 2, false>(p, stream) : launch_sm80<T, D, 1, false>(p, stream);
}

// cp.async moves 16 bytes: every row of q / k / v must start on a 16-byte boundary; the epilogue
// stores pairs of outputs as 4-byte words; the merge reads the split workspace as float4 / float2.
bool rows_are_16_byte_aligned(const AttentionParams& p) {
  if (p.num_splits > 1 && (reinterpret_cast<uintptr_t>(p.partial_out) % 16 != 0 ||
                           reinterpret_cast<uintptr_t>(p.partial_lse) % 4 != 0))
    return false;
  if (reinterpret_cast<uintptr_t>(p.out) % 4 != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (p.out_strides[d] % 2 != 0) return false;
  const void* ptrs[] = {p.q, p.k, p.v};
  const int64_t* strides[] = {p.q_strides, p.k_strides, p.v_strides};
  for (int t = 0; t < 3; ++t) {
    if (reinterpret_cast<uintptr_t>(ptrs[t]) % 16 != 0) return false;
    for (int d = 0; d < 3; ++d)
      if (strides[t][d] % 8 != 0) return false;  // 8 elements of 16 bits
  }
  return true;
}

}  // namespace

bool attention_sm80_supports(const AttentionParams& p) {
  return (p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16) &&
         (p.head_dim == 64 || p.head_dim == 128) && rows_are_16_byte_aligned(p) &&
         p.num_splits >= 1 && p.num_splits <= kAttentionMaxSplits && (p.kv_stages == 1 || p.kv_stages == 2) &&
         (!p.next_paths || p.kv_stages == 2) &&
         (!p.wide_rows || (p.next_paths && p.kv_stages == 2)) &&
         (!p.wgmma || (p.next_paths && p.kv_stages == 2 && !p.wide_rows)) &&
         (!p.gather_keys || (p.next_paths && !p.wide_rows && p.has_labels && p.bias == nullptr)) &&
         (!p.pack_gqa || (p.next_paths && !p.wide_rows && p.bias == nullptr &&
                          p.q_len * (p.q_heads / p.kv_heads) <= kAttentionMaxGridDim * kBlockM)) &&
         p.q_len <= kAttentionMaxGridDim * kBlockM && p.q_heads <= kAttentionMaxGridDim && p.batch * p.num_splits <= kAttentionMaxGridDim;
}

cudaError_t attention_forward_sm80(const AttentionParams& p, cudaStream_t stream) {
  if (p.batch * p.q_heads * p.q_len == 0) return cudaSuccess;
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.head_dim == 64) return bf16 ? launch_variant<bf16_t, 64>(p, stream) : launch_variant<fp16_t, 64>(p, stream);
  return bf16 ? launch_variant<bf16_t, 128>(p, stream) : launch_variant<fp16_t, 128>(p, stream);
}

}  // namespace dlmfuse::cuda
