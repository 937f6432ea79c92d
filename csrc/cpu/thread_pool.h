// A small persistent thread pool for the CPU kernels (no OpenMP: torch ships its own runtime, and
// two OpenMP runtimes in one process fight over cores).
#pragma once

#include <cstdint>
#include <functional>

namespace dlmfuse::cpu {

// Threads used by parallel_for: env DLMFUSE_NUM_THREADS, else the hardware concurrency.
int num_threads();
// n >= 1 (ValueError otherwise); takes effect on the next call, up to the pool's size (fixed at
// first use: one thread per core, or DLMFUSE_NUM_THREADS).
void set_num_threads(int n);

// Runs body(task, worker) for every task in [0, n_tasks), tasks handed out dynamically;
// worker is in [0, num_threads()). The caller's thread works too. Calls from several Python
// threads at once are safe: a call that finds the pool busy runs its tasks inline.
void parallel_for(int64_t n_tasks, const std::function<void(int64_t task, int worker)>& body);

}  // namespace dlmfuse::cpu
