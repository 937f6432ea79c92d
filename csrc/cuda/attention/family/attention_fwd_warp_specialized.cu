// Launch of the family's Hopper kernel (plan mma=sm90 with tile_m=128): the TMA descriptors of
// q, k, v and the bias, shared memory, the grid, then the split-KV merge.
#include <cuda.h>

#include "cuda/attention/attention.h"
#include "cuda/attention/family/attention_fwd_warp_specialized.cuh"
#include "cuda/attention/split_merge.cuh"

namespace dlmfuse::cuda {
namespace {

using family::AttentionTensorMaps;
using family::WarpSpecializedTraits;

// cuTensorMapEncodeTiled from the driver the process runs on (the module links the static CUDA
// runtime, not libcuda).
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// A function-local static, not std::call_once: the release wheels link this object (host code
// compiled by g++) with libc++, and std::call_once needs libstdc++'s runtime; static
// initialisation needs only the C++ ABI's guards, which both provide.
EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* address = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const bool ok = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &address, 12000, cudaEnableDefault,
                                                     &found) == cudaSuccess &&
                    found == cudaDriverEntryPointSuccess;
    return ok ? reinterpret_cast<EncodeTiled>(address) : nullptr;
  }();
  return fn;
}

// A 16-bit tensor of kRank axes (extents innermost first; element strides of axes 1.. kRank - 1,
// the innermost one contiguous) as a tensor map with boxes `box` and the 128-byte swizzle; reads
// past an axis are zeros. An axis of extent 1 is never stepped, so any multiple of 16 serves as its
// byte stride.
template <int kRank>
cudaError_t encode_swizzled_map(CUtensorMap* map, const void* data, DType dtype, const int64_t (&extents)[kRank],
                                const int64_t (&strides)[kRank - 1], const cuuint32_t (&box)[kRank]) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  cuuint64_t dims[kRank], byte_strides[kRank - 1];
  cuuint32_t element_strides[kRank];
  for (int i = 0; i < kRank; ++i) {
    dims[i] = static_cast<cuuint64_t>(extents[i]);
    element_strides[i] = 1;
    if (i > 0) byte_strides[i - 1] = extents[i] == 1 ? 16 : static_cast<cuuint64_t>(strides[i - 1]) * 2;
  }
  const CUresult result =
      encode(map, dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, kRank,
             const_cast<void*>(data), dims, byte_strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// A [B, L, H, D] 16-bit tensor (strides of batch, row, head in elements) as the 4-d map (D, H, L, B)
// with boxes of 64 columns x 1 head x `rows` rows.
cudaError_t encode_map(CUtensorMap* map, const void* data, DType dtype, int64_t batch, int64_t len, int64_t heads,
                       int64_t head_dim, const int64_t (&strides)[3], uint32_t rows) {
  return encode_swizzled_map<4>(map, data, dtype, {head_dim, heads, len, batch}, {strides[2], strides[1], strides[0]},
                                {64, 1, rows, 1});
}

// GQA packing: q [B, L, Hkv x G, D] as the 5-d map (D, G, L, Hkv, B), boxes of 64 columns x G heads x
// 64 / G rows: one box is 64 packed rows (query-major) of one KV head, as the consumers read them.
cudaError_t encode_packed_q_map(CUtensorMap* map, const AttentionParams& p) {
  const int64_t group = p.q_heads / p.kv_heads;
  return encode_swizzled_map<5>(
      map, p.q, p.dtype, {p.head_dim, group, p.q_len, p.kv_heads, p.batch},
      {p.q_strides[2], p.q_strides[1], group * p.q_strides[2], p.q_strides[0]},
      {64, static_cast<cuuint32_t>(group), static_cast<cuuint32_t>(kAttentionTmaRows / 2 / group), 1, 1});
}

// The [B, Hq, Lq, Lk] 16-bit bias (bias_tma_loadable) as the 4-d map (Lk, Lq, Hq, B) with boxes of
// 64 keys x `rows` rows. A stride-0 axis becomes extent 1 (the kernel reads it at coordinate 0).
cudaError_t encode_bias_map(CUtensorMap* map, const AttentionParams& p, uint32_t rows) {
  auto extent = [](int64_t n, int64_t stride) { return stride == 0 ? 1 : n; };
  return encode_swizzled_map<4>(map, p.bias, p.bias_dtype,
                                {p.k_len, extent(p.q_len, p.bias_strides[2]), extent(p.q_heads, p.bias_strides[1]),
                                 extent(p.batch, p.bias_strides[0])},
                                {p.bias_strides[2], p.bias_strides[1], p.bias_strides[0]}, {64, rows, 1, 1});
}

template <typename T, int D, family::BiasLoad kBiasLoad, bool kGather = false>
cudaError_t launch(const AttentionParams& p, cudaStream_t stream) {
  using Tr = WarpSpecializedTraits<T, D, kBiasLoad, kGather>;
  AttentionTensorMaps maps;
  cudaError_t status = p.pack_gqa ? encode_packed_q_map(&maps.q, p)
                                  : encode_map(&maps.q, p.q, p.dtype, p.batch, p.q_len, p.q_heads, D, p.q_strides, Tr::kQRows);
  maps.k = maps.v = maps.q;  // no keys, or the gathered walk's cp.async loads: no K / V maps
  if (status == cudaSuccess && p.k_len > 0 && !kGather)
    status = encode_map(&maps.k, p.k, p.dtype, p.batch, p.k_len, p.kv_heads, D, p.k_strides, Tr::kTileN);
  if (status == cudaSuccess && p.k_len > 0 && !kGather)
    status = encode_map(&maps.v, p.v, p.dtype, p.batch, p.k_len, p.kv_heads, D, p.v_strides, Tr::kTileN);
  maps.bias = maps.q;
  if (status == cudaSuccess && Tr::kBiasTiles && p.k_len > 0)
    status = encode_bias_map(&maps.bias, p, p.bias_strides[2] == 0 ? 1 : Tr::kQRows);
  if (status != cudaSuccess) return status;
  auto kernel = family::attention_fwd_warp_specialized_kernel<Tr>;
  status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSharedBytes);
  if (status != cudaSuccess) return status;
  const int64_t rows = p.pack_gqa ? p.q_len * (p.q_heads / p.kv_heads) : p.q_len;  // packed: per KV head
  const auto q_tiles = static_cast<unsigned>(plan_ceil_div(rows, Tr::kTileM));
  const auto heads = static_cast<unsigned>(p.pack_gqa ? p.kv_heads : p.q_heads);
  const auto splits = static_cast<unsigned>(p.batch * p.num_splits);
  // Heaviest query tiles first under labels (the kernel reads the grid the same way).
  const dim3 grid = p.has_labels ? dim3(heads, q_tiles, splits) : dim3(q_tiles, heads, splits);
  kernel<<<grid, Tr::kThreads, Tr::kSharedBytes, stream>>>(p, maps);
  status = cudaGetLastError();
  if (status != cudaSuccess || p.num_splits == 1) return status;
  return launch_split_merge<T, D>(p, stream);
}

template <typename T, int D>
cudaError_t launch_for_walk(const AttentionParams& p, bool gather, cudaStream_t stream) {
  using family::BiasLoad;
  if (gather)  // never with a bias (the planner's rule): the gather instance would drop it
    return p.bias == nullptr ? launch<T, D, BiasLoad::kNone, true>(p, stream) : cudaErrorInvalidValue;
  if (p.bias == nullptr) return launch<T, D, BiasLoad::kNone>(p, stream);
  return bias_tma_loadable(p) ? launch<T, D, BiasLoad::kTiles>(p, stream) : launch<T, D, BiasLoad::kRows>(p, stream);
}

}  // namespace

cudaError_t attention_forward_warp_specialized(const AttentionParams& p, const AttentionPlan& plan,
                                               cudaStream_t stream) {
  const bool bf16 = p.dtype == DType::kBFloat16, gather = plan.walk == AttentionWalk::kGather;
  if (p.head_dim == 64)
    return bf16 ? launch_for_walk<bf16_t, 64>(p, gather, stream) : launch_for_walk<fp16_t, 64>(p, gather, stream);
  return bf16 ? launch_for_walk<bf16_t, 128>(p, gather, stream) : launch_for_walk<fp16_t, 128>(p, gather, stream);
}

}  // namespace dlmfuse::cuda
