// The per-warpgroup tile math of the attention kernel's sm_90a path (attention_sm80_kernel.cuh with
// kWgmma; DLMFUSE_CUDA_ATTENTION=sm90, verified on an H200): S = Q K^T and O += P V as wgmma
// batches (wgmma_sm90.cuh) on the 128-byte-swizzled tiles that load_tile_async<..., kSw128>
// writes. Everything else (masking, softmax, bias, epilogue) is the sm_80 path's.
#pragma once

#include "cuda/attention/attention_sm80_tile.cuh"
#include "cuda/attention/wgmma_sm90.cuh"

namespace dlmfuse::cuda::sm90 {

// ---------------------------------------------------------------- one key tile, per warpgroup
// The sm_90a path (DLMFUSE_CUDA_ATTENTION=sm90, verified on an H200): the CTA's 4 warps are one
// warpgroup; Q, K and V sit in shared memory in the 128-byte-swizzled layout (load_tile_async
// with kSw128). Each call issues its wgmma batch and waits for it (no overlap of the softmax with
// the next MMAs yet: FlashAttention-3's ping-pong is the next step).
using sm80::kBlockM;
using sm80::kBlockN;
static_assert(kBlockM == 64 && kBlockN == 64, "one warpgroup: 64 query rows, 64-key tiles");
constexpr uint32_t kSubTileBytes = 64 * 128;  // one [64 rows][64 elements] 16-bit sub-tile

// S = Q K^T for the warpgroup's 64 rows and the tile's 64 keys; this warp's rows in s.
template <typename T, int D>
__device__ __forceinline__ void score_tile(float (&s)[kBlockN / 8][4], const T* q_tile, const T* k_tile) {
  const uint32_t q = sm80::smem_address(q_tile), k = sm80::smem_address(k_tile);
  for (int nt = 0; nt < kBlockN / 8; ++nt)
    for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
  fence_operands(s);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {  // a k16 step is 32 bytes into a 128-byte swizzled row
    const uint32_t offset = (ks / 4) * kSubTileBytes + (ks % 4) * 32;
    wgmma_ss<T, kBlockN>(s, sw128_descriptor(q + offset, 16, 1024), sw128_descriptor(k + offset, 16, 1024), 1);
  }
  wgmma_commit();
  wgmma_wait_all();
  fence_operands(s);
}

// O += P V: P (this warp's probabilities) packed into A fragments, V [64 keys][D] MN-major.
template <typename T, int D>
__device__ __forceinline__ void accumulate_pv(float (&o)[D / 8][4], const float (&s)[kBlockN / 8][4], const T* v_tile) {
  uint32_t pa[kBlockN / 16][4];
  sm80::pack_p<T>(pa, s);
  const uint32_t v = sm80::smem_address(v_tile);
  fence_operands(o);
  fence_operands(pa);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk)  // 16 keys = 16 rows of 128 bytes
    wgmma_rs_mn_major_b<T, D>(o, pa[kk], sw128_descriptor(v + kk * 16 * 128, kSubTileBytes, 1024));
  wgmma_commit();
  wgmma_wait_all();
  fence_operands(o);
}

}  // namespace dlmfuse::cuda::sm90
