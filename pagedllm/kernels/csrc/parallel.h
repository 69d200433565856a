// Spreading a kernel's tasks over PyTorch's threads.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

namespace pagedllm {

// Runs work(i) for i in [0, count) on every thread, each taking the next i when done (put the heaviest first):
// a static split of tasks of unequal sizes leaves threads idle.
template <typename Fn>
void run_balanced(int64_t count, const Fn& work) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < count; i = next++) work(i);
  });
}

}  // namespace pagedllm
