// Threads for the native kernels (kernels.cpp and blocks.cpp): torch's own OpenMP pool via at::parallel_for.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace llamaforge {

// Rows 0..N of a matmul in chunks handed out to the threads as they come free: with static shares, the step
// waits for the slower thread whenever one core is busier (a VM neighbour, the Python thread).
template <class F>
void parallel_rows(int64_t N, int64_t grain, const F& f) {
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = std::max(grain, (N + 8 * threads - 1) / (8 * threads));
  const int64_t n_chunks = (N + chunk - 1) / chunk;
  if (threads == 1 || n_chunks == 1 || at::in_parallel_region()) return f(0, N);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < n_chunks;)
      f(c * chunk, std::min(N, (c + 1) * chunk));
  });
}

}  // namespace llamaforge
