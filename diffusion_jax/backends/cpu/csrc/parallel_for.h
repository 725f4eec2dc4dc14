// ParallelFor on XLA:CPU's thread pool, shared by the FFI handlers of this folder.
//
// XLA:CPU runs independent operations of a program at the same time on its own thread
// pool; a handler that brought its own threads would make them and XLA's wait for each
// other on the same cores. The handlers here cut their work into `count` tasks instead:
// the calling thread and count - 1 tasks scheduled on XLA's pool claim task indices until
// none is left (a busy pool leaves them all to the caller).

#ifndef DIFFUSION_JAX_NATIVE_PARALLEL_FOR_H_
#define DIFFUSION_JAX_NATIVE_PARALLEL_FOR_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace diffusion_jax {

// Runs task(i) for i in [0, count) and returns when all have finished. The first error (an
// exception of a task) is rethrown as std::runtime_error with its message. If scheduling
// fails, the calling thread does all the work (tasks already queued find none left).
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count,
                        const std::function<void(int64_t)>& task) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mutex;
    std::condition_variable all_done;
    bool failed = false;
    std::string error;
  };
  auto state = std::make_shared<State>();
  auto work = [state, count, task]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < count;) {
      bool failed = false;
      std::string error;
      try {
        task(i);
      } catch (const std::exception& e) {
        failed = true;
        error = e.what();
      } catch (...) {
        failed = true;
        error = "unknown exception";
      }
      std::lock_guard<std::mutex> lock(state->mutex);
      if (failed && !state->failed) {
        state->failed = true;
        state->error = error.empty() ? "exception without a message" : error;
      }
      if (++state->done == count) state->all_done.notify_all();
    }
  };
  try {
    for (int64_t i = 1; i < count; ++i) {
      auto copy = work;
      pool.Schedule(std::move(copy));
    }
  } catch (...) {
    // Not all tasks queued: the caller's work() below claims whatever is left.
  }
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->all_done.wait(lock, [&] { return state->done == count; });
  if (state->failed) throw std::runtime_error(state->error);
}

// The batch cut into `count` near-equal slices: slice i is [start(i), start(i + 1)).
struct Slices {
  int64_t batch, count;
  int64_t start(int64_t i) const { return batch * i / count; }
  int64_t size(int64_t i) const { return start(i + 1) - start(i); }
};

// One slice per pool thread (fewer for small batches).
inline Slices SliceBatch(xla::ffi::ThreadPool& pool, int64_t batch) {
  const int64_t threads = pool.num_threads() > 1 ? pool.num_threads() : 1;
  const int64_t count = batch < threads ? (batch > 1 ? batch : 1) : threads;
  return Slices{batch, count};
}

}  // namespace diffusion_jax

#endif  // DIFFUSION_JAX_NATIVE_PARALLEL_FOR_H_
