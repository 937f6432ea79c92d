// Launch of the attention family from a plan (dlmfuse/attention_planner.h): the kernel instance,
// shared memory and grid for the plan's MMA policy, query tile and key walk, then the split-KV merge;
// after every plan (the CUDA-core and Hopper kernels' too) the float64 rescue of rows whose scores
// float32 could not hold (exact_row.cuh).
#include "cuda/attention/attention.h"
#include "cuda/attention/family/attention_fwd.cuh"
#include "cuda/attention/exact_row.cuh"
#include "cuda/attention/split_merge.cuh"
#include "cuda/device_info.h"

namespace dlmfuse::cuda {
namespace {

using family::FwdTraits;

template <class Tr>
cudaError_t launch(const AttentionParams& p, cudaStream_t stream) {
  // Room for bias tiles where the device has it (the same for every call on a device, so that
  // concurrent launches never lower the attribute under each other); used by tileable biases.
  auto kernel = family::attention_fwd_kernel<Tr>;
  cudaFuncAttributes attributes{};
  const cudaError_t read = cudaFuncGetAttributes(&attributes, kernel);
  if (read != cudaSuccess) return read;
  const int tiled_bytes = Tr::kSharedBytes + sm80::bias_tiles_bytes(Tr::kTileM);
  const bool room_for_bias = tiled_bytes + static_cast<int>(attributes.sharedSizeBytes) <=
                             current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  const int most_bytes = room_for_bias ? tiled_bytes : Tr::kSharedBytes;
  const int bytes = room_for_bias && sm80::bias_tileable(p) ? tiled_bytes : Tr::kSharedBytes;
  const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, most_bytes);
  if (attr != cudaSuccess) return attr;
  const int64_t rows = p.pack_gqa ? p.q_len * (p.q_heads / p.kv_heads) : p.q_len;
  const auto q_tiles = static_cast<unsigned>(plan_ceil_div(rows, Tr::kTileM));
  const auto heads = static_cast<unsigned>(p.pack_gqa ? p.kv_heads : p.q_heads);
  const auto splits = static_cast<unsigned>(p.batch * p.num_splits);
  // Heaviest query tiles first under labels (family::query_rows).
  const dim3 grid = p.has_labels ? dim3(heads, q_tiles, splits) : dim3(q_tiles, heads, splits);
  kernel<<<grid, sm80::kThreads, bytes, stream>>>(p);
  const cudaError_t launched = cudaGetLastError();
  if (launched != cudaSuccess || p.num_splits == 1) return launched;
  return launch_split_merge<typename Tr::T, Tr::D>(p, stream);
}

template <typename T, int D>
cudaError_t dispatch(const AttentionParams& p, const AttentionPlan& plan, cudaStream_t stream) {
  constexpr auto kSm80 = AttentionMma::kSm80, kSm90 = AttentionMma::kSm90;
  constexpr auto kTiles = AttentionWalk::kTiles, kGather = AttentionWalk::kGather;
  const bool gather = plan.walk == kGather;
  if (plan.mma == kSm90)
    return gather ? launch<FwdTraits<T, D, 64, kSm90, kGather>>(p, stream)
                  : launch<FwdTraits<T, D, 64, kSm90, kTiles>>(p, stream);
  if (plan.tile_m == 128) return launch<FwdTraits<T, D, 128, kSm80, kTiles>>(p, stream);
  return gather ? launch<FwdTraits<T, D, 64, kSm80, kGather>>(p, stream)
                : launch<FwdTraits<T, D, 64, kSm80, kTiles>>(p, stream);
}

template <typename T>
cudaError_t rescue_rows(const AttentionParams& p, cudaStream_t stream) {
  return p.head_dim == 64 ? launch_rescue_rows<T, 64>(p, stream) : launch_rescue_rows<T, 128>(p, stream);
}

cudaError_t launch_plan(const AttentionParams& p, const AttentionPlan& plan, cudaStream_t stream) {
  if (plan.mma == AttentionMma::kSimt) return attention_forward_simple(p, stream);
  if (plan.warp_specialized()) return attention_forward_warp_specialized(p, plan, stream);
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.head_dim == 64) return bf16 ? dispatch<bf16_t, 64>(p, plan, stream) : dispatch<fp16_t, 64>(p, plan, stream);
  return bf16 ? dispatch<bf16_t, 128>(p, plan, stream) : dispatch<fp16_t, 128>(p, plan, stream);
}

}  // namespace

cudaError_t attention_forward_family(const AttentionParams& p, const AttentionPlan& plan, cudaStream_t stream) {
  if (p.batch * p.q_heads * p.q_len == 0) return cudaSuccess;
  const cudaError_t launched = launch_plan(p, plan, stream);
  if (launched != cudaSuccess) return launched;
  // Then every plan's rows whose scores float32 could not hold, again in float64 (exact_row.cuh).
  switch (p.dtype) {
    case DType::kFloat32: return rescue_rows<float>(p, stream);
    case DType::kBFloat16: return rescue_rows<bf16_t>(p, stream);
    default: return rescue_rows<fp16_t>(p, stream);
  }
}

}  // namespace dlmfuse::cuda
