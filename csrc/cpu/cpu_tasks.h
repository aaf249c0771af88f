// CPU-only helpers for the C++ kernels: dynamic task scheduling on ATen's thread pool.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace westar {
namespace cpu {

// Runs fn(i) for i in [0, num_tasks) on ATen's intra-op threads, handing out tasks one
// at a time from a shared counter (tasks of very uneven cost balance well when the
// expensive ones come first). Each task's result must depend only on i, never on the
// thread that ran it, so the outcome is deterministic. `work` estimates the total cost
// in elements: small jobs run serially on the calling thread.
template <typename Fn>
void run_tasks(int64_t num_tasks, int64_t work, const Fn& fn) {
  if (num_tasks <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), num_tasks);
  if (threads <= 1 || work < 32768 || at::in_parallel_region()) {
    for (int64_t i = 0; i < num_tasks; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (;;) {
        const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
        if (i >= num_tasks) break;
        fn(i);
      }
    }
  });
}

}  // namespace cpu
}  // namespace westar
