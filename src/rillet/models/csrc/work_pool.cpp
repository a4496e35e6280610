// See work_pool.h. One job at a time (calls are serialised by a mutex); helper threads are
// started on first use and live for the process.
#include "work_pool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace rillet {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// How long an idle helper spins for the next job before it sleeps. Jobs of one model step
// come microseconds apart; between steps (Python: scheduling, sampling) it sleeps.
constexpr auto kSpin = std::chrono::microseconds(50);

class Pool {
 public:
  void run(int64_t n, int helpers, const std::function<void(int64_t)>& fn) {
    std::lock_guard<std::mutex> one_job(job_mutex_);
    ensure_helpers(helpers);
    fn_ = &fn;
    n_ = n;
    next_.store(0);
    open_.store(true);
    generation_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    for (int64_t i = next_.fetch_add(1); i < n; i = next_.fetch_add(1)) fn(i);
    // Close the job, then wait only for helpers inside it: each finishes the item it
    // claimed and leaves. A helper that enters after this sees the job closed.
    open_.store(false);
    while (active_.load() > 0) cpu_relax();
  }

 private:
  void ensure_helpers(int helpers) {
    while (static_cast<int>(started_) < helpers) {
      std::thread([this] { helper_loop(); }).detach();
      ++started_;
    }
  }

  void helper_loop() {
    uint64_t seen = generation_.load();
    for (;;) {
      wait_for_job(seen);
      seen = generation_.load();
      active_.fetch_add(1);
      if (open_.load() && generation_.load() == seen) {
        const std::function<void(int64_t)>& fn = *fn_;
        const int64_t n = n_;
        for (int64_t i = next_.fetch_add(1); i < n; i = next_.fetch_add(1)) fn(i);
      }
      active_.fetch_sub(1);
    }
  }

  void wait_for_job(uint64_t seen) {
    const auto spin_until = std::chrono::steady_clock::now() + kSpin;
    while (generation_.load() == seen) {
      if (std::chrono::steady_clock::now() < spin_until) {
        for (int k = 0; k < 64; ++k) cpu_relax();
        continue;
      }
      std::unique_lock<std::mutex> lock(sleep_mutex_);
      sleepers_.fetch_add(1);
      wake_.wait(lock, [&] { return generation_.load() != seen; });
      sleepers_.fetch_sub(1);
    }
  }

  std::mutex job_mutex_;
  unsigned started_ = 0;
  // The job: written by the caller before `generation_` is bumped, read by helpers after.
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<bool> open_{false};
  std::atomic<int> active_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleepers_{0};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
};

Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: helpers outlive static teardown
  return *instance;
}

}  // namespace

void run_claimed(int64_t n, int helpers, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  if (helpers <= 0 || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  pool().run(n, helpers, fn);
}

}  // namespace rillet
