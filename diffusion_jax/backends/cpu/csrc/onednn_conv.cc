// 2-D convolutions of NHWC float32 images with HWIO kernels through oneDNN, as XLA FFI
// handlers for JAX's CPU backend (diffusion_jax/backends/cpu/library.py builds and
// registers them).
//
// Two handlers (b: a bias per output channel, added in the convolution's own pass):
//   DjOnednnConvForward   y = conv(x, w) + b                 x, w, b  -> y
//   DjOnednnConvBackward  dx = conv^T_x(dy, w),              x, w, dy -> dx, dw, db
//                         dw = conv^T_w(x, dy), db = sum_{n,h,w} dy
// Attributes: strides (stride_h, stride_w) and explicit zero padding (pad_top,
// pad_bottom, pad_left, pad_right), as in lax.conv_general_dilated; `winograd` (bool):
// compute the call by Winograd's F(2x2, 3x3) instead (winograd.h; 3x3 kernels, stride 1,
// padding 1 only), else by oneDNN's direct convolution.
//
// Threads: XLA:CPU runs independent operations of a program at the same time on its own
// thread pool. oneDNN's OpenMP parallelism would add a second set of threads that
// wait for each other at barriers while XLA's threads hold the cores (measured: the
// same convolutions took up to 1.7x their time alone inside a train step). So the work
// is shared out on XLA's pool instead: the batch is cut into one slice per pool thread,
// the calling thread and tasks scheduled on the pool take slices until none is left (a
// busy pool leaves them all to the caller), and the kernel gradient sums the slices'
// partial gradients. Backwards, each slice computes its input gradient and then its
// partial kernel gradient, while its part of dy is still in the cache. oneDNN runs each
// slice single-threaded, unless the batch has fewer images than the pool has threads:
// then each slice gets pool threads / slices OpenMP threads, so that small batches still
// use every core.
//
// Images stay NHWC; oneDNN picks its preferred kernel layout and the kernel is reordered
// from HWIO once per call (each slice's kernel gradient back to HWIO). Primitives are
// built once per geometry and kept.

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"
#include "omp_threads.h"
#include "parallel_for.h"
#include "winograd.h"

namespace ffi = xla::ffi;
using diffusion_jax::OmpThreads;
using diffusion_jax::ParallelFor;
using diffusion_jax::SliceBatch;
using diffusion_jax::Slices;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
constexpr memory::data_type kF32 = memory::data_type::f32;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

enum Part : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// One convolution: images [n, h, w, cin] -> [n, oh, ow, cout], kernel [kh, kw, cin, cout].
struct Shape {
  int64_t n, h, w, cin, kh, kw, cout, oh, ow, sh, sw, pt, pb, pl, pr;
};

using Key = std::array<int64_t, 17>;

// oneDNN plans a primitive for the OpenMP thread count at its creation, so the count is
// part of the key.
Key MakeKey(const Shape& s, Part part) {
  return Key{s.n,  s.h,  s.w,  s.cin, s.kh, s.kw, s.cout, s.oh, s.ow,
             s.sh, s.sw, s.pt, s.pb,  s.pl, s.pr, part, omp_get_max_threads()};
}

struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = 0;
    for (int64_t v : k) h = h * 1000003u ^ static_cast<size_t>(v);
    return h;
  }
};

memory::desc Images(const Shape& s) {
  return memory::desc({s.n, s.cin, s.h, s.w}, kF32, Tag::nhwc);
}
memory::desc OutImages(const Shape& s) {
  return memory::desc({s.n, s.cout, s.oh, s.ow}, kF32, Tag::nhwc);
}
memory::desc Kernel(const Shape& s, Tag tag) {
  return memory::desc({s.cout, s.cin, s.kh, s.kw}, kF32, tag);
}
memory::desc Bias(const Shape& s) { return memory::desc({s.cout}, kF32, Tag::a); }

struct Plan {
  dnnl::primitive primitive;
  memory::desc kernel_desc;  // oneDNN's layout of the kernel (or of its gradient)
  bool reorder;              // whether that layout differs from HWIO
  memory::desc scratchpad;   // the working memory an execution needs
};

// Primitives run concurrently on several threads, so each execution gets the working
// memory of its own thread ("user" scratchpad): oneDNN's default library-managed
// scratchpad is shared between primitives and gave wrong results when they ran at the
// same time.
dnnl::primitive_attr OwnScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// The calling thread's working memory for oneDNN, at least `bytes` long (64-byte
// aligned, grown as needed, kept for the thread's next calls: executions on one thread
// follow each other, and a fresh allocation per call costs page faults).
void* ThreadScratch(size_t bytes) {
  struct Buffer {
    void* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffer;
  if (bytes > buffer.size) {
    std::free(buffer.data);
    buffer.size = 0;
    buffer.data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (buffer.data == nullptr) throw std::bad_alloc();
    buffer.size = (bytes + 63) / 64 * 64;
  }
  return buffer.data;
}

// Executes `primitive` with `args` and the thread's scratchpad on `stream` (blocking).
void Execute(const dnnl::primitive& primitive, const memory::desc& scratchpad,
             std::unordered_map<int, memory> args, dnnl::stream& stream) {
  if (scratchpad.get_size() > 0) {
    args.emplace(DNNL_ARG_SCRATCHPAD,
                 memory(scratchpad, Engine(), ThreadScratch(scratchpad.get_size())));
  }
  primitive.execute(stream, args);
}

// Copies `from` into `to` (a layout change), on the calling thread.
void Reorder(memory& from, memory& to, dnnl::stream& stream) {
  dnnl::reorder::primitive_desc pd(from, to, OwnScratchpad());
  Execute(dnnl::reorder(pd), pd.scratchpad_desc(), {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}},
          stream);
}

// Builds a primitive; call with OpenMP limited to one thread (oneDNN plans for it).
Plan MakePlan(const Shape& s, Part part) {
  const memory::dims strides{s.sh, s.sw}, pad_l{s.pt, s.pl}, pad_r{s.pb, s.pr};
  const memory::desc hwio = Kernel(s, Tag::hwio);
  const dnnl::primitive_attr attr = OwnScratchpad();
  dnnl::convolution_forward::primitive_desc forward(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Images(s), Kernel(s, Tag::any), Bias(s), OutImages(s), strides, pad_l, pad_r, attr);
  if (part == kForward) {
    return Plan{dnnl::convolution_forward(forward), forward.weights_desc(),
                forward.weights_desc() != hwio, forward.scratchpad_desc()};
  }
  if (part == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, Images(s), Kernel(s, Tag::any),
        OutImages(s), strides, pad_l, pad_r, forward, attr);
    return Plan{dnnl::convolution_backward_data(pd), pd.weights_desc(),
                pd.weights_desc() != hwio, pd.scratchpad_desc()};
  }
  dnnl::convolution_backward_weights::primitive_desc pd(
      Engine(), dnnl::algorithm::convolution_direct, Images(s), Kernel(s, Tag::any),
      Bias(s), OutImages(s), strides, pad_l, pad_r, forward, attr);
  return Plan{dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(),
              pd.diff_weights_desc() != hwio, pd.scratchpad_desc()};
}

const Plan& GetPlan(const Shape& s, Part part) {
  static std::mutex mutex;
  static std::unordered_map<Key, std::unique_ptr<Plan>, KeyHash> plans;
  const Key key = MakeKey(s, part);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans.find(key);
  if (it == plans.end()) {
    it = plans.emplace(key, std::make_unique<Plan>(MakePlan(s, part))).first;
  }
  return *it->second;
}


template <typename T>
std::string Dims(const T& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// The shape from the image (NHWC), kernel (HWIO) and output (NHWC) dimensions.
ffi::Error MakeShape(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                     ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt,
                     int64_t pb, int64_t pl, int64_t pr, Shape* s) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4 || x[3] != w[2] || y[3] != w[3] ||
      x[0] != y[0] || sh < 1 || sw < 1 ||
      (x[1] + pt + pb - w[0]) / sh + 1 != y[1] || (x[2] + pl + pr - w[1]) / sw + 1 != y[2]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "oneDNN convolution: inconsistent shapes x " + Dims(x) + ", w " +
                          Dims(w) + ", y " + Dims(y));
  }
  *s = Shape{x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2], sh, sw, pt, pb, pl, pr};
  return ffi::Error::Success();
}

// OpenMP threads per slice: one, unless the batch has fewer images than the pool has
// threads (then the pool's threads shared among the slices).
int OmpPerSlice(ffi::ThreadPool& pool, const Slices& slices) {
  return static_cast<int>(std::max<int64_t>(pool.num_threads() / slices.count, 1));
}

Shape WithBatch(Shape s, int64_t n) {
  s.n = n;
  return s;
}

float* Offset(void* data, int64_t items) { return static_cast<float*>(data) + items; }

// The kernel in the layout `plan` wants: HWIO itself, or a reordered copy (a memory
// handle owns its buffer while any copy of the handle lives).
memory PlanKernel(const Plan& plan, const Shape& s, void* hwio_data) {
  memory hwio(Kernel(s, Tag::hwio), Engine(), hwio_data);
  if (!plan.reorder) return hwio;
  memory reordered(plan.kernel_desc, Engine());
  dnnl::stream stream(Engine());
  Reorder(hwio, reordered, stream);
  stream.wait();
  return reordered;
}

// The forward (kForward) or input-gradient (kBackwardData) primitive of each batch slice,
// with the kernel in its layout (reordered from HWIO once per layout).
struct ImagesJob {
  Shape shape;
  Part part;
  Slices slices;
  std::vector<const Plan*> plans;
  std::vector<memory> kernels;
};

ImagesJob PrepareImages(const Slices& slices, const Shape& s, Part part, void* w) {
  ImagesJob job{s, part, slices, std::vector<const Plan*>(slices.count),
                std::vector<memory>(slices.count)};
  for (int64_t i = 0; i < slices.count; ++i) {  // at most two slice sizes
    job.plans[i] = &GetPlan(WithBatch(s, slices.size(i)), part);
    int64_t same = -1;
    for (int64_t j = 0; j < i && same < 0; ++j) {
      if (job.plans[j]->kernel_desc == job.plans[i]->kernel_desc) same = j;
    }
    job.kernels[i] = same >= 0 ? job.kernels[same] : PlanKernel(*job.plans[i], s, w);
  }
  return job;
}

// Slice i of the forward (x -> y, adding the bias b) or of the input gradient (dy in y ->
// dx in x; b unused).
void RunImagesSlice(const ImagesJob& job, int64_t i, void* x, void* b, void* y) {
  const Shape& s = job.shape;
  const Shape slice = WithBatch(s, job.slices.size(i));
  const int64_t image_items = s.h * s.w * s.cin, out_items = s.oh * s.ow * s.cout;
  memory images(Images(slice), Engine(), Offset(x, job.slices.start(i) * image_items));
  memory out(OutImages(slice), Engine(), Offset(y, job.slices.start(i) * out_items));
  dnnl::stream stream(Engine());
  const bool forward = job.part == kForward;
  std::unordered_map<int, memory> args{
      {forward ? DNNL_ARG_SRC : DNNL_ARG_DIFF_SRC, images},
      {DNNL_ARG_WEIGHTS, job.kernels[i]},
      {forward ? DNNL_ARG_DST : DNNL_ARG_DIFF_DST, out}};
  if (forward) args.emplace(DNNL_ARG_BIAS, memory(Bias(s), Engine(), b));
  Execute(job.plans[i]->primitive, job.plans[i]->scratchpad, std::move(args), stream);
  stream.wait();
}

// The kernel- and bias-gradient primitive of each batch slice, and the slices' partial
// gradients (the first slice writes dw and db themselves).
struct KernelGradJob {
  Shape shape;
  Slices slices;
  std::vector<const Plan*> plans;
  std::vector<std::unique_ptr<float[]>> partials;  // HWIO kernel, then the bias
};

KernelGradJob PrepareKernelGrad(const Slices& slices, const Shape& s) {
  KernelGradJob job{s, slices, std::vector<const Plan*>(slices.count), {}};
  const int64_t kernel_items = s.kh * s.kw * s.cin * s.cout;
  for (int64_t i = 0; i < slices.count; ++i) {
    job.plans[i] = &GetPlan(WithBatch(s, slices.size(i)), kBackwardWeights);
    // Written whole by the primitive: no need to zero them.
    if (i > 0) job.partials.emplace_back(new float[kernel_items + s.cout]);
  }
  return job;
}

void RunKernelGradSlice(const KernelGradJob& job, int64_t i, void* x, void* dy, void* dw,
                        void* db) {
  const Shape& s = job.shape;
  const Shape slice = WithBatch(s, job.slices.size(i));
  const Plan& plan = *job.plans[i];
  const int64_t kernel_items = s.kh * s.kw * s.cin * s.cout;
  const int64_t image_items = s.h * s.w * s.cin, out_items = s.oh * s.ow * s.cout;
  float* target = i == 0 ? static_cast<float*>(dw) : job.partials[i - 1].get();
  float* bias_target = i == 0 ? static_cast<float*>(db) : target + kernel_items;
  memory images(Images(slice), Engine(), Offset(x, job.slices.start(i) * image_items));
  memory grads(OutImages(slice), Engine(), Offset(dy, job.slices.start(i) * out_items));
  memory hwio(Kernel(s, Tag::hwio), Engine(), target);
  memory kernel = plan.reorder ? memory(plan.kernel_desc, Engine()) : hwio;
  dnnl::stream stream(Engine());
  Execute(plan.primitive, plan.scratchpad,
          {{DNNL_ARG_SRC, images}, {DNNL_ARG_DIFF_WEIGHTS, kernel},
           {DNNL_ARG_DIFF_BIAS, memory(Bias(s), Engine(), bias_target)},
           {DNNL_ARG_DIFF_DST, grads}},
          stream);
  if (plan.reorder) Reorder(kernel, hwio, stream);
  stream.wait();
}

// dw, db += the other slices' partial gradients, in slice order.
void SumPartials(const KernelGradJob& job, void* dw, void* db) {
  const Shape& s = job.shape;
  const int64_t kernel_items = s.kh * s.kw * s.cin * s.cout;
  float* out = static_cast<float*>(dw);
  float* bias_out = static_cast<float*>(db);
  for (const std::unique_ptr<float[]>& partial : job.partials) {
    for (int64_t k = 0; k < kernel_items; ++k) out[k] += partial[k];
    for (int64_t k = 0; k < s.cout; ++k) bias_out[k] += partial[kernel_items + k];
  }
}

void RunForward(ffi::ThreadPool& pool, const Shape& s, void* x, void* w, void* b, void* y) {
  const Slices slices = SliceBatch(pool, s.n);
  const int omp = OmpPerSlice(pool, slices);
  OmpThreads threads(omp);  // for the plans and the kernel reorders
  const ImagesJob job = PrepareImages(slices, s, kForward, w);
  ParallelFor(pool, slices.count, [&](int64_t i) {
    OmpThreads slice_threads(omp);
    RunImagesSlice(job, i, x, b, y);
  });
}

// All three gradients; each slice computes its input gradient, then its partial kernel
// and bias gradients, while its part of dy is still in the cache (one pass over the
// pool, not two).
void RunBackward(ffi::ThreadPool& pool, const Shape& s, void* x, void* w, void* dy,
                 void* dx, void* dw, void* db) {
  const Slices slices = SliceBatch(pool, s.n);
  const int omp = OmpPerSlice(pool, slices);
  OmpThreads threads(omp);  // for the plans and the kernel reorders
  const ImagesJob data = PrepareImages(slices, s, kBackwardData, w);
  const KernelGradJob weights = PrepareKernelGrad(slices, s);
  ParallelFor(pool, slices.count, [&](int64_t i) {
    OmpThreads slice_threads(omp);
    RunImagesSlice(data, i, dx, nullptr, dy);
    RunKernelGradSlice(weights, i, x, dy, dw, db);
  });
  SumPartials(weights, dw, db);
}

ffi::Error Failure(const std::exception& e) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("oneDNN convolution failed: ") + e.what());
}

using F32Buffer = ffi::Buffer<ffi::F32>;
using F32Result = ffi::ResultBuffer<ffi::F32>;

// An error unless `bias` is a vector of the output channels.
ffi::Error CheckBias(ffi::Span<const int64_t> bias, const Shape& s) {
  if (bias.size() == 1 && bias[0] == s.cout) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "oneDNN convolution: the bias " + Dims(bias) + " is not [" +
                        std::to_string(s.cout) + "]");
}

// An error if Winograd's algorithm is asked for a geometry it does not compute.
ffi::Error CheckWinograd(bool winograd, const Shape& s) {
  if (winograd && (s.cin < 1 || s.cout < 1)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "oneDNN convolution: Winograd's algorithm needs at least one input "
                      "and one output channel");
  }
  if (!winograd ||
      diffusion_jax::winograd::Applies(s.kh, s.kw, s.sh, s.sw, s.pt, s.pb, s.pl, s.pr)) {
    return ffi::Error::Success();
  }
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "oneDNN convolution: Winograd's algorithm takes 3x3 kernels, stride 1 "
                    "and padding 1; got a " + std::to_string(s.kh) + "x" +
                        std::to_string(s.kw) + " kernel, strides (" + std::to_string(s.sh) +
                        ", " + std::to_string(s.sw) + "), padding (" + std::to_string(s.pt) +
                        ", " + std::to_string(s.pb) + ", " + std::to_string(s.pl) + ", " +
                        std::to_string(s.pr) + ")");
}

ffi::Error Forward(ffi::ThreadPool pool, F32Buffer x, F32Buffer w, F32Buffer b, F32Result y,
                   int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                   bool winograd) {
  Shape s;
  if (auto e = MakeShape(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb,
                         pl, pr, &s);
      e.failure()) {
    return e;
  }
  if (auto e = CheckBias(b.dimensions(), s); e.failure()) return e;
  if (auto e = CheckWinograd(winograd, s); e.failure()) return e;
  try {
    if (winograd) {
      diffusion_jax::winograd::Forward(pool, s.n, s.h, s.w, s.cin, s.cout, x.typed_data(),
                                       w.typed_data(), b.typed_data(), y->typed_data());
    } else {
      RunForward(pool, s, x.untyped_data(), w.untyped_data(), b.untyped_data(),
                 y->untyped_data());
    }
  } catch (const std::exception& e) {
    return Failure(e);
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, F32Buffer x, F32Buffer w, F32Buffer dy,
                    F32Result dx, F32Result dw, F32Result db, int64_t sh, int64_t sw,
                    int64_t pt, int64_t pb, int64_t pl, int64_t pr, bool winograd) {
  auto same = [](auto a, auto b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
  };
  if (!same(dx->dimensions(), x.dimensions()) || !same(dw->dimensions(), w.dimensions())) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "oneDNN convolution backward: gradient shapes differ from x " +
                          Dims(x.dimensions()) + " or w " + Dims(w.dimensions()));
  }
  Shape s;
  if (auto e = MakeShape(x.dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pb,
                         pl, pr, &s);
      e.failure()) {
    return e;
  }
  if (auto e = CheckBias(db->dimensions(), s); e.failure()) return e;
  if (auto e = CheckWinograd(winograd, s); e.failure()) return e;
  try {
    if (winograd) {
      diffusion_jax::winograd::Backward(pool, s.n, s.h, s.w, s.cin, s.cout, x.typed_data(),
                                        w.typed_data(), dy.typed_data(), dx->typed_data(),
                                        dw->typed_data(), db->typed_data());
    } else {
      RunBackward(pool, s, x.untyped_data(), w.untyped_data(), dy.untyped_data(),
                  dx->untyped_data(), dw->untyped_data(), db->untyped_data());
    }
  } catch (const std::exception& e) {
    return Failure(e);
  }
  return ffi::Error::Success();
}

}  // namespace

namespace {

// The attributes both handlers take after their buffers.
template <typename Binding>
auto WithGeometry(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_bottom")
      .template Attr<int64_t>("pad_left")
      .template Attr<int64_t>("pad_right")
      .template Attr<bool>("winograd");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjOnednnConvForward, Forward,
                              WithGeometry(ffi::Ffi::Bind()
                                               .Ctx<ffi::ThreadPool>()
                                               .Arg<F32Buffer>()     // x
                                               .Arg<F32Buffer>()     // w
                                               .Arg<F32Buffer>()     // b
                                               .Ret<F32Buffer>()));  // y
XLA_FFI_DEFINE_HANDLER_SYMBOL(DjOnednnConvBackward, Backward,
                              WithGeometry(ffi::Ffi::Bind()
                                               .Ctx<ffi::ThreadPool>()
                                               .Arg<F32Buffer>()     // x
                                               .Arg<F32Buffer>()     // w
                                               .Arg<F32Buffer>()     // dy
                                               .Ret<F32Buffer>()     // dx
                                               .Ret<F32Buffer>()     // dw
                                               .Ret<F32Buffer>()));  // db
