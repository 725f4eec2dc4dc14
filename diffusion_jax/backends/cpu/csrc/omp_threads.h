// OmpThreads: the calling thread's OpenMP thread count, set for a scope and restored.
//
// oneDNN (the convolutions and its sgemm) plans and runs with the calling thread's OpenMP
// thread count. The handlers here run on XLA's pool threads (or the caller's own, when XLA
// runs an operation inline), whose setting is shared with other OpenMP users in the
// process (PyTorch loads the same libgomp.so.1), so they set it for their work and put the
// old value back.

#ifndef DIFFUSION_JAX_NATIVE_OMP_THREADS_H_
#define DIFFUSION_JAX_NATIVE_OMP_THREADS_H_

#include <omp.h>

namespace diffusion_jax {

class OmpThreads {
 public:
  explicit OmpThreads(int threads) : saved_(omp_get_max_threads()) {
    omp_set_num_threads(threads);
  }
  ~OmpThreads() { omp_set_num_threads(saved_); }
  OmpThreads(const OmpThreads&) = delete;
  OmpThreads& operator=(const OmpThreads&) = delete;

 private:
  int saved_;
};

}  // namespace diffusion_jax

#endif  // DIFFUSION_JAX_NATIVE_OMP_THREADS_H_
