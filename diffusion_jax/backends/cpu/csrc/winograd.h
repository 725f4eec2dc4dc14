// 3x3 convolutions (stride 1, one pixel of zero padding on every side) of NHWC float32
// images with HWIO kernels by Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray,
// "Fast Algorithms for Convolutional Neural Networks", 2016), for the oneDNN convolution
// handlers (onednn_conv.cc): this oneDNN build has no Winograd kernels of its own.
//
// Each 2x2 block of outputs ("tile") is computed from the 4x4 block of inputs around it:
//
//   Y = A^T [ (G g G^T) (.) (B^T d B) ] A          (per input/output channel pair)
//
// and the sum over input channels is, for each of the 16 positions xi of the 4x4
// transformed block, one matrix product [tiles, Cin] @ [Cin, Cout]: 16 products with
// 2.25x fewer multiplications than the direct convolution's. The transforms are additions
// over channel vectors. Gradients: the input gradient is the same computation on dy with
// the kernel turned by 180 degrees (channels swapped); the kernel gradient is the adjoint,
// dg = G^T [ sum over tiles (A dY A^T) (.) (B^T d B) ] G, 16 products [Cin, tiles] @
// [tiles, Cout]. Float32 throughout; for finite inputs the results differ from the direct
// convolution's by rounding only (a few units in the last place of the outputs' scale);
// an inf input gives NaN around it (the transforms subtract inputs).
//
// Work is cut into chunks of tiles (the transformed chunk stays in the core's cache) and
// shared out on XLA's pool (parallel_for.h); the matrix products are oneDNN's sgemm on the
// calling thread. The kernel gradient gives each pool task a fixed range of chunks and sums
// the tasks' partial gradients in task order, so results do not depend on scheduling.

#ifndef DIFFUSION_JAX_NATIVE_WINOGRAD_H_
#define DIFFUSION_JAX_NATIVE_WINOGRAD_H_

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace diffusion_jax::winograd {

// Whether a convolution of this geometry is one these functions compute (3x3 kernel,
// stride 1, padding 1 on each side).
bool Applies(int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
             int64_t pl, int64_t pr);

// y = conv(x, k) + b: x [n, h, w, ci], k [3, 3, ci, co], b [co] -> y [n, h, w, co].
void Forward(xla::ffi::ThreadPool& pool, int64_t n, int64_t h, int64_t w, int64_t ci,
             int64_t co, const float* x, const float* k, const float* b, float* y);

// The gradients of Forward for the output cotangent dy [n, h, w, co]: dx [n, h, w, ci],
// dk [3, 3, ci, co], db [co].
void Backward(xla::ffi::ThreadPool& pool, int64_t n, int64_t h, int64_t w, int64_t ci,
              int64_t co, const float* x, const float* k, const float* dy, float* dx,
              float* dk, float* db);

}  // namespace diffusion_jax::winograd

#endif  // DIFFUSION_JAX_NATIVE_WINOGRAD_H_
