// Dropout of float32 tensors with a counter-based random mask, as an XLA FFI handler for
// JAX's CPU backend (diffusion_jax/backends/cpu/dropout.py calls it).
//
//   DjDropout   x [...], key u32[2], shard u32[1] -> y,   y[i] = keep_g ? x[i] / keep : 0
// Attribute: keep (the probability of keeping an element).
//
// x is piece `shard` of an array cut into equal consecutive pieces of x's size, so its
// element i is element g = shard * size + i of the whole array. keep_g = (u_g < keep 2^32)
// for the 32-bit word u_g that Philox4x32-10 (Salmon et al., "Parallel random numbers: as
// easy as 1, 2, 3", 2011; the generator of PyTorch's and of JAX's "rbg" random bits on
// GPU) gives element g: counter (g / 4 as two 32-bit words, 0, 0), key the two words of
// `key`, output word g mod 4. A word depends only on (key, g), so the mask does not
// depend on threads or on how the array is cut over devices, and the gradient (the same
// map applied to the cotangent) recomputes it instead of storing it.
//
// XLA:CPU computes JAX's threefry bits as dozens of elementwise fusions over the tensor
// (about 13 ns per element here); this loop vectorizes (32x32 -> 64-bit products) and
// runs on XLA's threads (parallel_for.h).

#include <algorithm>
#include <cstdint>
#include <exception>
#include <string>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;

namespace {

using diffusion_jax::ParallelFor;

constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;  // Philox4x32 multipliers
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule increments

// One Philox4x32 round on (x0, x1, x2, x3) under key (k0, k1).
inline void Round(uint32_t& x0, uint32_t& x1, uint32_t& x2, uint32_t& x3, uint32_t k0,
                  uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kMul0) * x0;
  const uint64_t p1 = static_cast<uint64_t>(kMul1) * x2;
  x0 = static_cast<uint32_t>(p1 >> 32) ^ x1 ^ k0;
  x1 = static_cast<uint32_t>(p1);
  x2 = static_cast<uint32_t>(p0 >> 32) ^ x3 ^ k1;
  x3 = static_cast<uint32_t>(p0);
}

// Philox4x32-10 of counter (c0, c1, 0, 0) under key (k0, k1): the four output words in
// (x0, x1, x2, x3). Written out (no loops), so that a loop calling it vectorizes.
inline void Philox(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1, uint32_t& x0,
                   uint32_t& x1, uint32_t& x2, uint32_t& x3) {
  x0 = c0;
  x1 = c1;
  x2 = 0;
  x3 = 0;
  Round(x0, x1, x2, x3, k0, k1);
  Round(x0, x1, x2, x3, k0 + 1 * kWeyl0, k1 + 1 * kWeyl1);
  Round(x0, x1, x2, x3, k0 + 2 * kWeyl0, k1 + 2 * kWeyl1);
  Round(x0, x1, x2, x3, k0 + 3 * kWeyl0, k1 + 3 * kWeyl1);
  Round(x0, x1, x2, x3, k0 + 4 * kWeyl0, k1 + 4 * kWeyl1);
  Round(x0, x1, x2, x3, k0 + 5 * kWeyl0, k1 + 5 * kWeyl1);
  Round(x0, x1, x2, x3, k0 + 6 * kWeyl0, k1 + 6 * kWeyl1);
  Round(x0, x1, x2, x3, k0 + 7 * kWeyl0, k1 + 7 * kWeyl1);
  Round(x0, x1, x2, x3, k0 + 8 * kWeyl0, k1 + 8 * kWeyl1);
  Round(x0, x1, x2, x3, k0 + 9 * kWeyl0, k1 + 9 * kWeyl1);
}

inline float Drop(float x, uint32_t word, uint32_t threshold, bool keep_all, float keep) {
  return keep_all || word < threshold ? x / keep : 0.0f;
}

// y[i] for i in [4 begin, min(4 end, size)), where local block j is global block
// first_block + j (the piece starts on a block boundary).
void DropBlocks(const float* x, float* y, int64_t size, int64_t begin, int64_t end,
                uint64_t first_block, uint32_t k0, uint32_t k1, uint32_t threshold,
                bool keep_all_words, float keep) {
  const int64_t full_end = std::min<int64_t>(end, size / 4);
#pragma omp simd
  for (int64_t j = begin; j < full_end; ++j) {
    const uint64_t c = first_block + static_cast<uint64_t>(j);
    uint32_t u0, u1, u2, u3;
    Philox(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), k0, k1, u0, u1, u2, u3);
    y[4 * j] = Drop(x[4 * j], u0, threshold, keep_all_words, keep);
    y[4 * j + 1] = Drop(x[4 * j + 1], u1, threshold, keep_all_words, keep);
    y[4 * j + 2] = Drop(x[4 * j + 2], u2, threshold, keep_all_words, keep);
    y[4 * j + 3] = Drop(x[4 * j + 3], u3, threshold, keep_all_words, keep);
  }
  for (int64_t j = std::max(full_end, begin); j < end; ++j) {  // the last, partial block
    const uint64_t c = first_block + static_cast<uint64_t>(j);
    uint32_t u[4];
    Philox(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), k0, k1, u[0], u[1],
           u[2], u[3]);
    for (int64_t i = 4 * j; i < std::min<int64_t>(4 * j + 4, size); ++i) {
      y[i] = Drop(x[i], u[i - 4 * j], threshold, keep_all_words, keep);
    }
  }
}

// y[i] for i in [begin, end) when the piece starts inside a block (first, global element
// index of x[0], not a multiple of 4): one Philox call per element.
void DropElements(const float* x, float* y, int64_t begin, int64_t end, uint64_t first,
                  uint32_t k0, uint32_t k1, uint32_t threshold, bool keep_all_words,
                  float keep) {
  for (int64_t i = begin; i < end; ++i) {
    const uint64_t g = first + static_cast<uint64_t>(i);
    uint32_t u[4];
    Philox(static_cast<uint32_t>(g >> 2), static_cast<uint32_t>(g >> 34), k0, k1, u[0], u[1],
           u[2], u[3]);
    y[i] = Drop(x[i], u[g & 3], threshold, keep_all_words, keep);
  }
}

ffi::Error Dropout(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> key,
                   ffi::Buffer<ffi::U32> shard, ffi::ResultBuffer<ffi::F32> y, float keep) {
  if (key.element_count() != 2) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "dropout: the key must be two uint32 words");
  }
  if (shard.element_count() != 1) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "dropout: the shard index must be one uint32 word");
  }
  if (!(keep > 0.0f && keep <= 1.0f)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "dropout: keep must be in (0, 1], got " + std::to_string(keep));
  }
  const int64_t size = x.element_count();
  const uint32_t k0 = key.typed_data()[0], k1 = key.typed_data()[1];
  // keep 2^32, rounded to the nearest word; keep = 1 keeps every word.
  const double scaled = static_cast<double>(keep) * 4294967296.0 + 0.5;
  const bool keep_all = scaled >= 4294967296.0;
  const uint32_t threshold = keep_all ? 0u : static_cast<uint32_t>(scaled);
  const uint64_t first = static_cast<uint64_t>(shard.typed_data()[0]) *
                         static_cast<uint64_t>(size);  // global index of x[0]
  const int64_t blocks = (size + 3) / 4;
  const int64_t tasks = std::max<int64_t>(
      1, std::min<int64_t>(pool.num_threads(), blocks / 4096));  // >= 16k elements each
  try {
    ParallelFor(pool, tasks, [&](int64_t t) {
      if (first % 4 == 0) {
        DropBlocks(x.typed_data(), y->typed_data(), size, blocks * t / tasks,
                   blocks * (t + 1) / tasks, first / 4, k0, k1, threshold, keep_all, keep);
      } else {
        DropElements(x.typed_data(), y->typed_data(), size * t / tasks,
                     size * (t + 1) / tasks, first, k0, k1, threshold, keep_all, keep);
      }
    });
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("dropout: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjDropout, Dropout,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::U32>>()  // key
                                  .Arg<ffi::Buffer<ffi::U32>>()  // shard
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<float>("keep"));
