// Thin wrappers over the sm_90a warpgroup MMA (wgmma) that the attention kernel's opt-in
// Hopper path uses (DLMFUSE_CUDA_ATTENTION=sm90; verified on an H200, 2026-11-27). A warpgroup (4 warps,
// 128 threads) computes a 64-row tile; each warp's accumulator fragment covers rows
// 16 w + lane / 4 (+ 8) and, in n8 block j, columns 8 j + 2 (lane % 4) + {0, 1}: the layout of
// mma.sync m16n8 C fragments, so the masking and softmax code of the sm_80 path applies as is.
// The A operand from registers (P in O += P V) has the m16n8k16 A-fragment layout per warp.
//
// Shared-memory operands use the 128-byte swizzle (Swizzle<3,4,3>): 64 16-bit elements per
// 128-byte row, the 16-byte chunk index XOR-ed with row % 8, 8-row atoms of 1024 bytes, tiles
// 1024-byte aligned. A head_dim-128 tile is two such [rows][64] sub-tiles (sw128_offset).
// Compiled for other architectures (DLMFUSE_WGMMA == 0) the kernel's wgmma instance runs the
// mma.sync path instead (attention_sm80_kernel.cuh, kUseWgmma), and these wrappers, never called, trap.
#pragma once

#include <cstdint>

#include "cuda/attention/mma_sm80.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DLMFUSE_WGMMA 1
#else
#define DLMFUSE_WGMMA 0
#endif

namespace dlmfuse::cuda::sm90 {

// Element offset of (row, col) in a [rows][D] tile stored as D / 64 sub-tiles of [rows][64] with
// the 128-byte swizzle (the canonical layout of wgmma's K-major and MN-major operands alike).
template <int D>
__device__ __forceinline__ int sw128_offset(int row, int col, int rows) {
  return (col / 64) * rows * 64 + row * 64 + ((((col % 64) >> 3) ^ (row & 7)) << 3) + (col & 7);
}

// Matrix descriptor of a 128-byte-swizzled shared-memory operand: start address, leading and
// stride byte offsets (16-byte units, 14 bits each), layout type 1 (128-byte swizzle) in bits 62-63.
//   K-major (Q, K): stride = 1024 (between 8-row atoms); leading unused (1).
//   MN-major (V):   stride = 1024 (between 8-key atoms); leading = the byte size of one
//                   [rows][64] sub-tile (between 64-column blocks of head_dim).
__device__ __forceinline__ uint64_t sw128_descriptor(uint32_t smem_address, uint32_t leading_bytes,
                                                     uint32_t stride_bytes) {
  return static_cast<uint64_t>((smem_address >> 4) & 0x3FFF) |
         (static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFF) << 32) | (static_cast<uint64_t>(1) << 62);
}

// Pins registers at this point of the program for the compiler: the wgmma asm's register operands
// are produced when the batch is issued, but hold their values only after wgmma_wait_all, so code
// that reads (or last wrote) them must not be moved across the batch (CUTLASS's
// warpgroup_fence_operand).
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_operands(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[i][e])::"memory");
}

// Before the first wgmma of a batch (its accumulators or A registers were written by other code).
__device__ __forceinline__ void wgmma_fence() {
#if DLMFUSE_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if DLMFUSE_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until no committed wgmma batch of this warpgroup is in flight.
__device__ __forceinline__ void wgmma_wait_all() {
#if DLMFUSE_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
// Waits until at most N of this warpgroup's committed wgmma batches are in flight (the older ones
// have completed: batches complete in the order they were committed).
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if DLMFUSE_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Makes this thread's shared-memory writes (cp.async, stores) visible to wgmma's operand reads,
// which go through the async proxy; a barrier after it covers every thread's writes.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if DLMFUSE_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// d (64 x N, fp32) = (scale_d ? d : 0) + A B^T with A [64][16] and B [N][16] K-major in shared
// memory (descriptors), one k16 step.
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b, int scale_d);

// d (64 x N, fp32) += A B with A [64][16] from registers (per warp: an m16n8k16 A fragment) and
// B [16][N] MN-major (N contiguous) in shared memory, one k16 step.
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs_mn_major_b(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b);

// The specialisations spell out every accumulator register (the asm needs one operand each); one
// macro per instruction shape serves bf16 and fp16, which differ only in the PTX type name.
#if DLMFUSE_WGMMA
#define DLMFUSE_WGMMA_ASM(...) asm volatile(__VA_ARGS__)
#else
#define DLMFUSE_WGMMA_ASM(...) __trap()
#endif
#define DLMFUSE_WGMMA_ACC4(d, i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define DLMFUSE_WGMMA_ACC32(d)                                                                         \
  DLMFUSE_WGMMA_ACC4(d, 0), DLMFUSE_WGMMA_ACC4(d, 1), DLMFUSE_WGMMA_ACC4(d, 2), DLMFUSE_WGMMA_ACC4(d, 3), \
      DLMFUSE_WGMMA_ACC4(d, 4), DLMFUSE_WGMMA_ACC4(d, 5), DLMFUSE_WGMMA_ACC4(d, 6), DLMFUSE_WGMMA_ACC4(d, 7)
#define DLMFUSE_WGMMA_ACC64(d)                                                                          \
  DLMFUSE_WGMMA_ACC32(d), DLMFUSE_WGMMA_ACC4(d, 8), DLMFUSE_WGMMA_ACC4(d, 9), DLMFUSE_WGMMA_ACC4(d, 10), \
      DLMFUSE_WGMMA_ACC4(d, 11), DLMFUSE_WGMMA_ACC4(d, 12), DLMFUSE_WGMMA_ACC4(d, 13),                   \
      DLMFUSE_WGMMA_ACC4(d, 14), DLMFUSE_WGMMA_ACC4(d, 15)
#define DLMFUSE_WGMMA_D32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define DLMFUSE_WGMMA_D64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// One specialisation per instruction shape N (the n of m64nNk16) and element type; D_LIST / ACC
// spell out the N / 2 accumulator registers %0.., the operands after them are numbered from N / 2.
// wgmma_ss<T, N>: descriptors %(N/2), %(N/2 + 1), scale_d %(N/2 + 2).
#define DLMFUSE_WGMMA_SS(T, PTX, N, D_LIST, ACC, DESC_A, DESC_B, SCALE)                                      \
  template <>                                                                                              \
  __device__ __forceinline__ void wgmma_ss<T, N>(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b,    \
                                                 int scale_d) {                                            \
    DLMFUSE_WGMMA_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                                    \
                      "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " " D_LIST ", " DESC_A    \
                      ", " DESC_B ", p, 1, 1, 0, 0;\n}\n"                                                     \
                      : ACC(d)                                                                             \
                      : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                             \
  }
// wgmma_rs_mn_major_b<T, N>: A registers %(N/2)..%(N/2 + 3), the descriptor %(N/2 + 4), scale_d (1)
// %(N/2 + 5).
#define DLMFUSE_WGMMA_RS(T, PTX, N, D_LIST, ACC, A_LIST, DESC_B, SCALE)                                      \
  template <>                                                                                              \
  __device__ __forceinline__ void wgmma_rs_mn_major_b<T, N>(float (&d)[N / 8][4], const uint32_t (&a)[4],   \
                                                            uint64_t desc_b) {                             \
    DLMFUSE_WGMMA_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                                    \
                      "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " " D_LIST ", " A_LIST    \
                      ", " DESC_B ", p, 1, 1, 1;\n}\n"                                                        \
                      : ACC(d)                                                                             \
                      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));                    \
  }
#define DLMFUSE_WGMMA_SHAPES(T, PTX)                                                                          \
  DLMFUSE_WGMMA_SS(T, PTX, 64, DLMFUSE_WGMMA_D32, DLMFUSE_WGMMA_ACC32, "%32", "%33", "%34")                  \
  DLMFUSE_WGMMA_SS(T, PTX, 128, DLMFUSE_WGMMA_D64, DLMFUSE_WGMMA_ACC64, "%64", "%65", "%66")                 \
  DLMFUSE_WGMMA_RS(T, PTX, 64, DLMFUSE_WGMMA_D32, DLMFUSE_WGMMA_ACC32, "{%32, %33, %34, %35}", "%36", "%37") \
  DLMFUSE_WGMMA_RS(T, PTX, 128, DLMFUSE_WGMMA_D64, DLMFUSE_WGMMA_ACC64, "{%64, %65, %66, %67}", "%68", "%69")

DLMFUSE_WGMMA_SHAPES(bf16_t, "bf16")
DLMFUSE_WGMMA_SHAPES(fp16_t, "f16")

}  // namespace dlmfuse::cuda::sm90
