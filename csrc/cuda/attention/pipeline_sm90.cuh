// The sm_90a synchronisation and copy instructions of the family's Hopper kernel, one PTX
// instruction each: mbarriers (arrival counts and transaction bytes), TMA tensor loads,
// warpgroup register reallocation and named barriers.
//
// Written here rather than taken from CUTLASS's headers: those include <iostream>, whose static
// initialiser the host object then needs from libstdc++, which the release wheels (linked against
// libc++) do not provide; the instructions are the same ones CUTLASS emits. Every wrapper has a
// memory clobber, so plain shared-memory accesses stay on their side of a wait or an arrival.
// Compiled for other architectures (DLMFUSE_WGMMA == 0) the wrappers are empty; nothing calls them
// there.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "cuda/attention/wgmma_sm90.cuh"

namespace dlmfuse::cuda::sm90 {

// ---------------------------------------------------------------- mbarriers
// A phase completes when `count` arrivals have been made and every expected transaction byte has
// landed; waits name the parity of the phase they wait for.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
#if DLMFUSE_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(sm80::smem_address(bar)), "r"(count) : "memory");
#endif
}
// Makes the initialisations visible to the other threads and to the TMA unit (before a barrier).
__device__ __forceinline__ void fence_mbarrier_init() {
#if DLMFUSE_WGMMA
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#if DLMFUSE_WGMMA
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(sm80::smem_address(bar))
               : "memory");
#endif
}
// One arrival that also expects `bytes` more transaction bytes (the TMA loads it then issues).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if DLMFUSE_WGMMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(sm80::smem_address(bar)), "r"(bytes)
               : "memory");
#endif
}
// Returns once the phase of parity `parity` has completed (acquire: what the arrivals published is
// visible after it).
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#if DLMFUSE_WGMMA
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(sm80::smem_address(bar)),
      "r"(parity)
      : "memory");
#endif
}

// ---------------------------------------------------------------- TMA
// L2 eviction priority "normal" (createpolicy's encoding, as CUTLASS's CacheHintSm90::EVICT_NORMAL).
constexpr uint64_t kL2EvictNormal = 0x1000000000000000ull;

// The box of `map` at coordinates (c0, c1, c2, c3), innermost first, into `dst` (shared memory,
// aligned as the map's swizzle needs); its bytes complete a transaction on `bar`.
__device__ __forceinline__ void tma_load_4d(const CUtensorMap* map, uint64_t* bar, void* dst, int32_t c0, int32_t c1,
                                            int32_t c2, int32_t c3) {
#if DLMFUSE_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%3, %4, %5, %6}], [%2], %7;\n" ::"r"(sm80::smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(sm80::smem_address(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
      "l"(kL2EvictNormal)
      : "memory");
#endif
}

// The same for a 5-d map (GQA-packed Q: its head axis split into KV head and query head of the group).
__device__ __forceinline__ void tma_load_5d(const CUtensorMap* map, uint64_t* bar, void* dst, int32_t c0, int32_t c1,
                                            int32_t c2, int32_t c3, int32_t c4) {
#if DLMFUSE_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%3, %4, %5, %6, %7}], [%2], %8;\n" ::"r"(sm80::smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(sm80::smem_address(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
      "r"(c4), "l"(kL2EvictNormal)
      : "memory");
#endif
}

// ---------------------------------------------------------------- warpgroups
// Every thread of the warpgroup executes these (the count per thread, a multiple of 8).
template <int kRegisters>
__device__ __forceinline__ void warpgroup_registers_increase() {
#if DLMFUSE_WGMMA
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
#endif
}
template <int kRegisters>
__device__ __forceinline__ void warpgroup_registers_decrease() {
#if DLMFUSE_WGMMA
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
#endif
}

// Named barrier `id` (1-15; 0 is __syncthreads') over `threads` threads (whole warps): sync waits
// for the barrier to complete, arrive counts this warp's threads without waiting.
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t threads) {
#if DLMFUSE_WGMMA
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
#endif
}
__device__ __forceinline__ void named_barrier_arrive(uint32_t id, uint32_t threads) {
#if DLMFUSE_WGMMA
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
#endif
}

}  // namespace dlmfuse::cuda::sm90
