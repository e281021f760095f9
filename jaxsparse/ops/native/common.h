// Shared by the native CPU kernels: 16-float vectors and work sharing over XLA's intra-op pool.
#ifndef JAXSPARSE_NATIVE_COMMON_H_
#define JAXSPARSE_NATIVE_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jaxsparse_native {

// 16 floats: one AVX-512 register, or two AVX2 registers where the compiler has no AVX-512.
typedef float Vec __attribute__((vector_size(64)));
constexpr int kLanes = 16;

// Lanes [0, n) from p (contiguous); the rest zero. memcpy: no alignment asked of p. The full
// case is spelled out so that it compiles to one vector move even when n is a runtime value
// (a variable-length memcpy is a library call, and made the scan kernel 2.6x slower).
inline Vec load(const float* p, int n = kLanes) {
  Vec v{};
  if (n == kLanes) std::memcpy(&v, p, sizeof v);
  else std::memcpy(&v, p, n * sizeof(float));
  return v;
}
inline void store(float* p, Vec v, int n = kLanes) {
  if (n == kLanes) std::memcpy(p, &v, sizeof v);
  else std::memcpy(p, &v, n * sizeof(float));
}

// Runs task(i) for every i in [0, count) on XLA's intra-op threads and the calling thread;
// returns when all are done. Indices are handed out through an atomic counter and the caller
// takes them too, so a busy pool never stalls the call. Kernels that sum partial results keep
// one partial per index and add them in index order afterwards: the result never depends on
// which thread ran what.
template <typename Task>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t count, Task task) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto run = [state, count, task]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < count;) {
      task(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  // A worker that starts after every index is taken returns at once: `task` (which refers to
  // the caller's frame) only runs while the caller waits below.
  for (int64_t i = 0; i < std::min<int64_t>(pool.num_threads(), count - 1); ++i) {
    auto copy = run;
    pool.Schedule(std::move(copy));
  }
  run();
  while (state->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

}  // namespace jaxsparse_native

#endif  // JAXSPARSE_NATIVE_COMMON_H_
