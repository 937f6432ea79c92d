// A small persistent thread pool for the CPU kernels (no OpenMP: torch ships its own runtime, and
// two OpenMP runtimes in one process fight over cores).
//
// Bounded: never more threads than the hardware has (max_threads()); larger requests are clamped.
// Threads start lazily, when a call first needs them; a thread that cannot start (process or
// memory limits) leaves the pool smaller, with one message on stderr, never hung.
#pragma once

#include <cstdint>
#include <functional>

namespace dlmfuse::cpu {

// The bound on the pool: the hardware thread count (at least 1).
int max_threads();
// Threads used by parallel_for: set_num_threads, else env DLMFUSE_NUM_THREADS, else the CPUs this
// process may run on; always in [1, max_threads()].
int num_threads();
// n >= 1 (ValueError otherwise); clamped to max_threads(). Returns the count now in effect. Takes
// effect on the next call, in both directions (the pool grows on demand; a call wakes only the
// threads it uses).
int set_num_threads(int n);

// Runs body(task, worker) for every task in [0, n_tasks), tasks handed out dynamically, on at
// most `workers` threads (the caller's included); worker is in [0, workers). Callers that keep
// per-worker scratch pass the count they sized it for. Calls from several Python threads at once
// are safe: a call that finds the pool busy runs its tasks inline.
void parallel_for(int64_t n_tasks, int workers, const std::function<void(int64_t task, int worker)>& body);

// parallel_for on num_threads() threads.
inline void parallel_for(int64_t n_tasks, const std::function<void(int64_t task, int worker)>& body) {
  parallel_for(n_tasks, num_threads(), body);
}

}  // namespace dlmfuse::cpu
