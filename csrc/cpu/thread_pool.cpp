#include "cpu/thread_pool.h"

#include "dlmfuse/errors.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace dlmfuse::cpu {
namespace {

int hardware_threads() { return std::max(1, static_cast<int>(std::thread::hardware_concurrency())); }

// The CPUs this process may run on (taskset, cgroup cpusets), at most the hardware count.
int affinity_threads() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return hardware_threads();
  return std::clamp(CPU_COUNT(&set), 1, hardware_threads());
}

// DLMFUSE_NUM_THREADS clamped to [1, max_threads()]; unset or not a positive integer: the
// affinity count (Python warns about both cases once, at import).
int default_threads() {
  if (const char* env = std::getenv("DLMFUSE_NUM_THREADS")) {
    char* end = nullptr;
    const long long n = std::strtoll(env, &end, 10);
    while (end != env && std::isspace(static_cast<unsigned char>(*end))) ++end;
    if (end != env && *end == '\0' && n >= 1) return static_cast<int>(std::min<long long>(n, max_threads()));
  }
  return affinity_threads();
}

std::atomic<int> g_requested_threads{0};  // 0 = not set yet

class ThreadPool {
 public:
  // Room for every worker up front: adding one never reallocates (nor throws once it runs).
  ThreadPool() : pid_(getpid()) { workers_.reserve(static_cast<size_t>(max_threads())); }

  // Pool size, the caller's thread included.
  int size() const { return static_cast<int>(workers_.size()) + 1; }
  pid_t pid() const { return pid_; }

  // Starts workers until the pool holds n threads; a worker that cannot start stops the growth
  // for good (the limit that refused it will refuse the next one too). Returns the size.
  int grow(int n) {
    while (size() < n && !start_failed_) {
      const int index = size();
      workers_.push_back(std::make_unique<Worker>());  // owned before its thread can use it
      Worker* worker = workers_.back().get();
      try {
        worker->thread = std::thread(&ThreadPool::worker_loop, this, index, worker);
      } catch (const std::exception& e) {
        workers_.pop_back();
        start_failed_ = true;
        std::fprintf(stderr, "dlmfuse: could not start CPU worker thread %d (%s); the CPU kernels use %d thread%s\n",
                     index, e.what(), size(), size() == 1 ? "" : "s");
        break;
      }
      worker->thread.detach();  // never joined: the pool lives until the process ends
    }
    return size();
  }

  // Runs one job on the caller and workers 1 .. n_threads - 1 only; the caller holds `busy`
  // (so jobs never overlap) and has grown the pool to n_threads.
  void run(int64_t n_tasks, int n_threads, const std::function<void(int64_t, int)>& body) {
    const int helpers = std::min(n_threads, size()) - 1;
    body_ = &body;
    n_tasks_ = n_tasks;
    next_task_.store(0, std::memory_order_relaxed);
    pending_.store(helpers, std::memory_order_relaxed);
    ++generation_;
    for (int w = 0; w < helpers; ++w) {  // the worker reads the job after taking its lock
      Worker& worker = *workers_[w];
      {
        std::lock_guard<std::mutex> lock(worker.mutex);
        worker.job = generation_;
      }
      worker.wake.notify_one();
    }
    drain(0);
    {
      std::unique_lock<std::mutex> lock(done_mutex_);
      done_.wait(lock, [this] { return pending_.load(std::memory_order_acquire) == 0; });
    }
    body_ = nullptr;
    if (error_) {  // every thread has stopped touching the job: hand the first error to the caller
      std::exception_ptr error = error_;
      error_ = nullptr;
      std::rethrow_exception(error);
    }
  }

  std::mutex busy;

 private:
  struct Worker {
    std::mutex mutex;
    std::condition_variable wake;
    uint64_t job = 0;  // generation of the last job handed to this worker
    std::thread thread;
  };

  // Runs tasks until none is left. A task that throws stops the job: the other threads take no
  // further task, and run() rethrows the first error once they have all returned (an exception
  // must neither escape a worker thread nor unwind the caller while workers still use the job).
  void drain(int worker) {
    for (int64_t task = next_task_.fetch_add(1); task < n_tasks_; task = next_task_.fetch_add(1)) {
      try {
        (*body_)(task, worker);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
        next_task_.store(n_tasks_);
      }
    }
  }

  void worker_loop(int index, Worker* self) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(self->mutex);
        self->wake.wait(lock, [&] { return self->job != seen; });
        seen = self->job;
      }
      drain(index);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(done_mutex_);
        done_.notify_one();
      }
    }
  }

  pid_t pid_;
  std::vector<std::unique_ptr<Worker>> workers_;
  bool start_failed_ = false;
  const std::function<void(int64_t, int)>* body_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_task_{0};
  std::atomic<int> pending_{0};
  uint64_t generation_ = 0;
  std::mutex done_mutex_;
  std::condition_variable done_;
  std::mutex error_mutex_;
  std::exception_ptr error_;  // the job's first exception
};

// Created on first parallel use, empty; workers start when a call needs them. Intentionally
// leaked at exit: joining threads during interpreter shutdown can deadlock.
std::mutex g_pool_mutex;
ThreadPool* g_pool = nullptr;

ThreadPool* shared_pool() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  // After fork() only the forking thread exists in the child: abandon the parent's pool.
  if (g_pool != nullptr && g_pool->pid() != getpid()) g_pool = nullptr;
  if (g_pool == nullptr) g_pool = new ThreadPool();
  return g_pool;
}

}  // namespace

int max_threads() {
  static const int n = hardware_threads();
  return n;
}

int num_threads() {
  int n = g_requested_threads.load();
  if (n == 0) {
    n = default_threads();
    g_requested_threads.store(n);
  }
  return n;
}

int set_num_threads(int n) {
  if (n < 1) throw_value_error("set_num_threads: n must be >= 1, got ", n);
  n = std::min(n, max_threads());
  g_requested_threads.store(n);
  return n;
}

void parallel_for(int64_t n_tasks, int workers, const std::function<void(int64_t, int)>& body) {
  const int n_threads = std::min(workers, num_threads());
  if (n_tasks <= 1 || n_threads <= 1) {
    for (int64_t task = 0; task < n_tasks; ++task) body(task, 0);
    return;
  }
  ThreadPool* pool = shared_pool();
  std::unique_lock<std::mutex> busy(pool->busy, std::try_to_lock);
  if (!busy.owns_lock()) {  // another Python thread is using the pool right now
    for (int64_t task = 0; task < n_tasks; ++task) body(task, 0);
    return;
  }
  pool->grow(n_threads);
  pool->run(n_tasks, n_threads, body);
}

}  // namespace dlmfuse::cpu
