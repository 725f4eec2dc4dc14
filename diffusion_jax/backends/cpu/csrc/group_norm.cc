// Group normalization (optionally followed by swish) of float32 NHWC images, forward and
// backward, as XLA FFI handlers for JAX's CPU backend (diffusion_jax/backends/cpu/
// group_norm.py calls them; the formulas are those of the reference kernels in
// diffusion_jax/ops/group_norm.py).
//
//   DjGroupNormForward   x [N, P, C], scale [C], bias [C] -> y [N, P, C], mean [N, G],
//                        rstd [N, G]
//       x_hat = (x - mean_g) rstd_g,  a = x_hat scale + bias,  y = a (or swish(a)),
//       mean and variance over the P pixels and C / G channels of each group (mean first,
//       then the variance around it, sums in double), rstd = 1 / sqrt(var + epsilon).
//   DjGroupNormBackward  x, scale, bias, mean, rstd, dy -> dx, dscale, dbias
//       da = dy (or dy swish'(a)),  dscale = sum_{n,p} da x_hat,  dbias = sum_{n,p} da,
//       dx = rstd (da scale - mean_group(da scale) - x_hat mean_group(da scale x_hat)).
// Attributes: groups (G), epsilon (forward), swish (0 or 1).
//
// XLA:CPU computes the same as a chain of reductions and elementwise fusions, each a pass
// over the tensor, several of them on one thread. Here each image is read three times
// forwards (mean, variance, output) and twice backwards (sums, input gradient) while it
// sits in the cache, and the batch is cut into one slice per XLA pool thread (parallel_for.h);
// backwards, each slice sums its own parameter gradients (in double), added in slice
// order, so results do not depend on timing.
//
// Inner loops run over the channels of one pixel (contiguous), vectorized by the compiler
// (built with -O3 -march=native, see backends/cpu/library.py); exp is a polynomial that
// vectorizes (below).

#include <algorithm>
#include <cmath>
#include <exception>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;

namespace {

using diffusion_jax::ParallelFor;
using diffusion_jax::SliceBatch;
using diffusion_jax::Slices;

// exp(x) for float32, to within 2 ulp on [-87, 88] (clamped outside): x = n ln2 + r with
// |r| <= ln2 / 2, exp(r) by Cephes' degree-6 polynomial, 2^n through the exponent bits.
// Only arithmetic and selects, so loops that call it vectorize (the library's expf does
// not); that needs -fno-trapping-math (the clamp is then a select, not a branch) and no
// memcpy (a bit cast instead), see backends/cpu/library.py.
inline float Exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // n = floor(x / ln2 + 1/2), through a truncation of a positive number (for NaN: 0; the
  // result is NaN through r).
  const float t = x == x ? x * 1.44269504088896341f : 0.0f;
  const int32_t i = static_cast<int32_t>(t + 1000.5f) - 1000;
  const float n = static_cast<float>(i);
  float r = x - n * 0.693359375f;  // ln2 in two parts: the first exact in float
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  return e * __builtin_bit_cast(float, (i + 127) << 23);  // e 2^n
}

inline float Sigmoid(float a) { return 1.0f / (1.0f + Exp(-a)); }

// d swish(a) / da times g.
inline float SwishGrad(float a, float g) {
  const float s = Sigmoid(a);
  return g * (s * (1.0f + a * (1.0f - s)));
}

struct Geometry {
  int64_t n, p, c, g;  // images, pixels per image, channels, groups
  int64_t per_group() const { return c / g; }
  double count() const { return static_cast<double>(p) * static_cast<double>(c / g); }
};

// Per-group sums of per-channel values: out[j] = sum of in[k] over the channels k of group j.
void GroupSums(const Geometry& s, const double* in, double* out) {
  const int64_t cg = s.per_group();
  for (int64_t j = 0; j < s.g; ++j) {
    double sum = 0.0;
    for (int64_t k = j * cg; k < (j + 1) * cg; ++k) sum += in[k];
    out[j] = sum;
  }
}

// One image's forward: y, and its groups' mean and rstd.
template <bool kSwish>
void ForwardImage(const Geometry& s, float epsilon, const float* x,
                  const float* scale, const float* bias, float* y, float* mean_out,
                  float* rstd_out) {
  const int64_t c = s.c, cg = s.per_group();
  std::vector<double> sums(c, 0.0), groups(s.g);
  std::vector<float> mean_c(c), a(c), b(c);
  for (int64_t i = 0; i < s.p; ++i) {
    const float* __restrict row = x + i * c;
    double* __restrict acc = sums.data();
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) acc[k] += row[k];
  }
  GroupSums(s, sums.data(), groups.data());
  for (int64_t k = 0; k < c; ++k) {
    mean_c[k] = static_cast<float>(groups[k / cg] / s.count());
    sums[k] = 0.0;
  }
  for (int64_t i = 0; i < s.p; ++i) {  // two-pass variance
    const float* __restrict row = x + i * c;
    const float* __restrict m = mean_c.data();
    double* __restrict acc = sums.data();
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      const double d = static_cast<double>(row[k]) - static_cast<double>(m[k]);
      acc[k] += d * d;
    }
  }
  std::vector<double> variance(s.g);
  GroupSums(s, sums.data(), variance.data());
  for (int64_t j = 0; j < s.g; ++j) {
    const float rstd = static_cast<float>(1.0 / std::sqrt(variance[j] / s.count() + epsilon));
    mean_out[j] = mean_c[j * cg];
    rstd_out[j] = rstd;
    for (int64_t k = j * cg; k < (j + 1) * cg; ++k) {
      a[k] = rstd * scale[k];
      b[k] = bias[k] - mean_c[k] * a[k];
    }
  }
  for (int64_t i = 0; i < s.p; ++i) {
    const float* __restrict row = x + i * c;
    float* __restrict out = y + i * c;
    const float* __restrict ak = a.data();
    const float* __restrict bk = b.data();
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      const float v = row[k] * ak[k] + bk[k];
      if constexpr (kSwish) {
        out[k] = v * Sigmoid(v);
      } else {
        out[k] = v;
      }
    }
  }
}

// One image's backward: dx, and its contributions to dscale and dbias (added to
// dscale_acc, dbias_acc).
template <bool kSwish>
void BackwardImage(const Geometry& s, const float* x, const float* scale,
                   const float* bias, const float* mean, const float* rstd, const float* dy,
                   float* dx, double* dscale_acc, double* dbias_acc) {
  const int64_t c = s.c, cg = s.per_group();
  std::vector<float> r(c), o(c);  // x_hat = x r + o
  for (int64_t k = 0; k < c; ++k) {
    r[k] = rstd[k / cg];
    o[k] = -mean[k / cg] * rstd[k / cg];
  }
  std::vector<double> sum_da(c, 0.0), sum_dax(c, 0.0);
  for (int64_t i = 0; i < s.p; ++i) {
    const float* __restrict row = x + i * c;
    const float* __restrict grad = dy + i * c;
    const float* __restrict rk = r.data();
    const float* __restrict ok = o.data();
    const float* __restrict sk = scale;
    const float* __restrict bk = bias;
    double* __restrict acc_a = sum_da.data();
    double* __restrict acc_ax = sum_dax.data();
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      const float x_hat = row[k] * rk[k] + ok[k];
      float da = grad[k];
      if constexpr (kSwish) da = SwishGrad(x_hat * sk[k] + bk[k], da);
      acc_a[k] += da;
      acc_ax[k] += da * x_hat;
    }
  }
  std::vector<double> weighted(c), mean_da(s.g), mean_dax(s.g);
  for (int64_t k = 0; k < c; ++k) weighted[k] = sum_da[k] * scale[k];
  GroupSums(s, weighted.data(), mean_da.data());
  for (int64_t k = 0; k < c; ++k) weighted[k] = sum_dax[k] * scale[k];
  GroupSums(s, weighted.data(), mean_dax.data());
  // dx = da A + x_hat B + D per channel.
  std::vector<float> coef_a(c), coef_b(c), coef_d(c);
  for (int64_t k = 0; k < c; ++k) {
    const int64_t j = k / cg;
    coef_a[k] = rstd[j] * scale[k];
    coef_b[k] = static_cast<float>(-rstd[j] * (mean_dax[j] / s.count()));
    coef_d[k] = static_cast<float>(-rstd[j] * (mean_da[j] / s.count()));
    dscale_acc[k] += sum_dax[k];
    dbias_acc[k] += sum_da[k];
  }
  for (int64_t i = 0; i < s.p; ++i) {
    const float* __restrict row = x + i * c;
    const float* __restrict grad = dy + i * c;
    float* __restrict out = dx + i * c;
    const float* __restrict rk = r.data();
    const float* __restrict ok = o.data();
    const float* __restrict sk = scale;
    const float* __restrict bk = bias;
    const float* __restrict ca = coef_a.data();
    const float* __restrict cb = coef_b.data();
    const float* __restrict cd = coef_d.data();
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      const float x_hat = row[k] * rk[k] + ok[k];
      float da = grad[k];
      if constexpr (kSwish) da = SwishGrad(x_hat * sk[k] + bk[k], da);
      out[k] = da * ca[k] + x_hat * cb[k] + cd[k];
    }
  }
}

template <typename T>
std::string Dims(const T& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

ffi::Error Invalid(const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "GroupNorm: " + message);
}

// The geometry from x's dimensions [N, ..., C] (the middle ones are the pixels).
ffi::Error MakeGeometry(ffi::Span<const int64_t> x, int64_t groups, Geometry* s) {
  if (x.size() < 2) return Invalid("x " + Dims(x) + " needs a batch and a channel axis");
  int64_t pixels = 1;
  for (size_t i = 1; i + 1 < x.size(); ++i) pixels *= x[i];
  const int64_t channels = x[x.size() - 1];
  if (groups < 1 || channels % groups != 0) {
    return Invalid(std::to_string(channels) + " channels are not divisible into " +
                   std::to_string(groups) + " groups");
  }
  *s = Geometry{x[0], pixels, channels, groups};
  return ffi::Error::Success();
}

ffi::Error CheckDims(const char* name, ffi::Span<const int64_t> dims,
                     std::vector<int64_t> want) {
  if (dims.size() == want.size() && std::equal(want.begin(), want.end(), dims.begin())) {
    return ffi::Error::Success();
  }
  return Invalid(std::string(name) + " is " + Dims(dims) + ", expected " + Dims(want));
}

using F32Buffer = ffi::Buffer<ffi::F32>;
using F32Result = ffi::ResultBuffer<ffi::F32>;

ffi::Error Forward(ffi::ThreadPool pool, F32Buffer x, F32Buffer scale, F32Buffer bias,
                   F32Result y, F32Result mean, F32Result rstd, int64_t groups,
                   float epsilon, int64_t swish) {
  Geometry s;
  if (auto e = MakeGeometry(x.dimensions(), groups, &s); e.failure()) return e;
  for (auto [name, dims, want] :
       {std::tuple("scale", scale.dimensions(), std::vector<int64_t>{s.c}),
        std::tuple("bias", bias.dimensions(), std::vector<int64_t>{s.c}),
        std::tuple("mean", mean->dimensions(), std::vector<int64_t>{s.n, s.g}),
        std::tuple("rstd", rstd->dimensions(), std::vector<int64_t>{s.n, s.g})}) {
    if (auto e = CheckDims(name, dims, want); e.failure()) return e;
  }
  const float* xs = x.typed_data();
  float* ys = y->typed_data();
  const Slices slices = SliceBatch(pool, s.n);
  const int64_t items = s.p * s.c;
  const auto image = swish ? ForwardImage<true> : ForwardImage<false>;
  try {
    ParallelFor(pool, slices.count, [&](int64_t t) {
      for (int64_t n = slices.start(t); n < slices.start(t + 1); ++n) {
        image(s, epsilon, xs + n * items, scale.typed_data(), bias.typed_data(),
              ys + n * items, mean->typed_data() + n * s.g, rstd->typed_data() + n * s.g);
      }
    });
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("GroupNorm: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, F32Buffer x, F32Buffer scale, F32Buffer bias,
                    F32Buffer mean, F32Buffer rstd, F32Buffer dy, F32Result dx,
                    F32Result dscale, F32Result dbias, int64_t groups, int64_t swish) {
  Geometry s;
  if (auto e = MakeGeometry(x.dimensions(), groups, &s); e.failure()) return e;
  const std::vector<int64_t> x_dims(x.dimensions().begin(), x.dimensions().end());
  for (auto [name, dims, want] :
       {std::tuple("scale", scale.dimensions(), std::vector<int64_t>{s.c}),
        std::tuple("bias", bias.dimensions(), std::vector<int64_t>{s.c}),
        std::tuple("mean", mean.dimensions(), std::vector<int64_t>{s.n, s.g}),
        std::tuple("rstd", rstd.dimensions(), std::vector<int64_t>{s.n, s.g}),
        std::tuple("dy", dy.dimensions(), x_dims), std::tuple("dx", dx->dimensions(), x_dims),
        std::tuple("dscale", dscale->dimensions(), std::vector<int64_t>{s.c}),
        std::tuple("dbias", dbias->dimensions(), std::vector<int64_t>{s.c})}) {
    if (auto e = CheckDims(name, dims, want); e.failure()) return e;
  }
  const Slices slices = SliceBatch(pool, s.n);
  const int64_t items = s.p * s.c;
  // Per slice: dscale sums, then dbias sums.
  std::vector<std::vector<double>> partial;
  const auto image = swish ? BackwardImage<true> : BackwardImage<false>;
  try {
    partial.assign(slices.count, std::vector<double>(2 * s.c, 0.0));
    ParallelFor(pool, slices.count, [&](int64_t t) {
      double* acc = partial[t].data();
      for (int64_t n = slices.start(t); n < slices.start(t + 1); ++n) {
        image(s, x.typed_data() + n * items, scale.typed_data(), bias.typed_data(),
              mean.typed_data() + n * s.g, rstd.typed_data() + n * s.g,
              dy.typed_data() + n * items, dx->typed_data() + n * items, acc, acc + s.c);
      }
    });
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("GroupNorm: ") + e.what());
  }
  for (int64_t k = 0; k < s.c; ++k) {
    double ds = 0.0, db = 0.0;
    for (const std::vector<double>& p : partial) {
      ds += p[k];
      db += p[s.c + k];
    }
    dscale->typed_data()[k] = static_cast<float>(ds);
    dbias->typed_data()[k] = static_cast<float>(db);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjGroupNormForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buffer>()  // x
                                  .Arg<F32Buffer>()  // scale
                                  .Arg<F32Buffer>()  // bias
                                  .Ret<F32Buffer>()  // y
                                  .Ret<F32Buffer>()  // mean
                                  .Ret<F32Buffer>()  // rstd
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("swish"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DjGroupNormBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buffer>()  // x
                                  .Arg<F32Buffer>()  // scale
                                  .Arg<F32Buffer>()  // bias
                                  .Arg<F32Buffer>()  // mean
                                  .Arg<F32Buffer>()  // rstd
                                  .Arg<F32Buffer>()  // dy
                                  .Ret<F32Buffer>()  // dx
                                  .Ret<F32Buffer>()  // dscale
                                  .Ret<F32Buffer>()  // dbias
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("swish"));
