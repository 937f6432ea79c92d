#include "cpu/thread_pool.h"

#include "dlmfuse/errors.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace dlmfuse::cpu {
namespace {

int default_threads() {
  if (const char* env = std::getenv("DLMFUSE_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n >= 1) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

std::atomic<int> g_requested_threads{0};  // 0 = not set yet

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads) : pid_(getpid()) {
    for (int w = 1; w < n_threads; ++w) workers_.emplace_back([this, w] { worker_loop(w); });
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  pid_t pid() const { return pid_; }

  // Runs one job on the caller and the first n_threads - 1 workers; the caller holds `busy`
  // so jobs never overlap.
  void run(int64_t n_tasks, int n_threads, const std::function<void(int64_t, int)>& body) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      body_ = &body;
      n_tasks_ = n_tasks;
      n_threads_ = n_threads;
      next_task_.store(0);
      active_workers_ = static_cast<int>(workers_.size());
      ++generation_;
    }
    wake_.notify_all();
    drain(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return active_workers_ == 0; });
    body_ = nullptr;
  }

  std::mutex busy;

 private:
  void drain(int worker) {
    for (int64_t task = next_task_.fetch_add(1); task < n_tasks_; task = next_task_.fetch_add(1))
      (*body_)(task, worker);
  }

  void worker_loop(int worker) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
      }
      if (worker < n_threads_) drain(worker);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--active_workers_ == 0) done_.notify_one();
    }
  }

  pid_t pid_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t, int)>* body_ = nullptr;
  int64_t n_tasks_ = 0;
  int n_threads_ = 0;
  std::atomic<int64_t> next_task_{0};
  int active_workers_ = 0;
  uint64_t generation_ = 0;
  bool stopping_ = false;
};

// Created on first use with one thread per core (or DLMFUSE_NUM_THREADS); set_num_threads only
// changes how many of them take part. Intentionally leaked at exit: joining threads during
// interpreter shutdown can deadlock.
std::mutex g_pool_mutex;
ThreadPool* g_pool = nullptr;

ThreadPool* shared_pool() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  // After fork() only the forking thread exists in the child: abandon the parent's pool.
  if (g_pool != nullptr && g_pool->pid() != getpid()) g_pool = nullptr;
  if (g_pool == nullptr) g_pool = new ThreadPool(std::max(default_threads(), num_threads()));
  return g_pool;
}

}  // namespace

int num_threads() {
  int n = g_requested_threads.load();
  if (n == 0) {
    n = default_threads();
    g_requested_threads.store(n);
  }
  return n;
}

void set_num_threads(int n) {
  if (n < 1) throw_value_error("set_num_threads: n must be >= 1, got ", n);
  g_requested_threads.store(n);
}

void parallel_for(int64_t n_tasks, const std::function<void(int64_t, int)>& body) {
  const int n_threads = num_threads();
  if (n_tasks <= 1 || n_threads == 1) {
    for (int64_t task = 0; task < n_tasks; ++task) body(task, 0);
    return;
  }
  ThreadPool* pool = shared_pool();
  std::unique_lock<std::mutex> busy(pool->busy, std::try_to_lock);
  if (!busy.owns_lock()) {  // another Python thread is using the pool right now
    for (int64_t task = 0; task < n_tasks; ++task) body(task, 0);
    return;
  }
  pool->run(n_tasks, std::min(n_threads, pool->size()), body);
}

}  // namespace dlmfuse::cpu
