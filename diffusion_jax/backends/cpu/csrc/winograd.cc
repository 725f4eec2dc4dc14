// Winograd F(2x2, 3x3) convolutions and their gradients; see winograd.h.

#include "winograd.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.h"
#include "omp_threads.h"
#include "parallel_for.h"

namespace diffusion_jax::winograd {
namespace {

namespace ffi = xla::ffi;

// The matrices of F(2x2, 3x3), written out in the transforms below:
//   B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]   (4x4 inputs)
//   G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]     (3x3 kernel)
//   A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]                                (2x2 outputs)

// The tiles of a batch: 2x2 output blocks, tile t = (image, ty, tx) in row-major order.
struct Tiles {
  int64_t n, h, w, rows, cols;  // rows, cols: tiles per image along H and W
  Tiles(int64_t n_, int64_t h_, int64_t w_)
      : n(n_), h(h_), w(w_), rows((h_ + 1) / 2), cols((w_ + 1) / 2) {}
  int64_t count() const { return n * rows * cols; }
  void locate(int64_t t, int64_t* image, int64_t* ty, int64_t* tx) const {
    *image = t / (rows * cols);
    const int64_t r = t % (rows * cols);
    *ty = r / cols;
    *tx = r % cols;
  }
  // The pixels of tile t's 2x2 output block in `data` [n, h, w, c]: block[0][0] (always
  // inside the image) and its right, lower and diagonal neighbours (null outside).
  template <typename T>
  void OutputBlock(int64_t t, T* data, int64_t c, T* block[2][2]) const {
    int64_t image, ty, tx;
    locate(t, &image, &ty, &tx);
    const int64_t row = 2 * ty, col = 2 * tx;
    const bool down = row + 1 < h, right = col + 1 < w;
    block[0][0] = data + ((image * h + row) * w + col) * c;
    block[0][1] = right ? block[0][0] + c : nullptr;
    block[1][0] = down ? block[0][0] + w * c : nullptr;
    block[1][1] = down && right ? block[1][0] + c : nullptr;
  }
};

// Tiles per chunk: about 2 MiB of transformed inputs and products (16 x tiles x (cin +
// cout) floats, the core's L2 cache) but at least 64 tiles (smaller products run slower:
// 0.85x at 32 tiles, 512 + 256 channels), unless an equal share of the tiles per pool
// thread is smaller (then that share, at least 16 tiles).
int64_t ChunkTiles(const Tiles& tiles, int64_t cin, int64_t cout, int64_t threads) {
  const int64_t cached =
      std::clamp<int64_t>((int64_t{2} << 20) / (64 * (cin + cout)), 64, 256);
  const int64_t t = std::max<int64_t>(threads, 1);
  const int64_t share = (tiles.count() + t - 1) / t;
  return std::max<int64_t>(std::min(cached, share), 16);
}

// The calling thread's buffer `which` (0 or 1), at least `items` floats, kept for its
// next calls.
float* ThreadBuffer(int which, size_t items) {
  thread_local std::vector<float> buffers[2];
  if (buffers[which].size() < items) buffers[which].resize(items);
  return buffers[which].data();
}

void Check(dnnl_status_t status) {
  if (status != dnnl_success) {
    throw std::runtime_error("oneDNN sgemm failed with status " +
                             std::to_string(static_cast<int>(status)));
  }
}

// Element ranges of a [.., plane] array for ParallelFor: blocks of 4096 elements.
constexpr int64_t kPlaneBlock = 4096;

// U[xi] = sum_{a, b} G[i][a] G[j][b] k[a', b'] for xi = 4 i + j, [16, cin, cout] from the
// HWIO kernel [3, 3, cin, cout]; (a', b') = (2 - a, 2 - b) if `turned` (the kernel turned
// by 180 degrees, for the input gradient), else (a, b). One pass over k and U.
void KernelTransform(ffi::ThreadPool& pool, const float* k, int64_t cin, int64_t cout,
                     bool turned, float* u) {
  const int64_t plane = cin * cout;
  ParallelFor(pool, (plane + kPlaneBlock - 1) / kPlaneBlock, [&](int64_t block) {
    const int64_t begin = block * kPlaneBlock, end = std::min(plane, begin + kPlaneBlock);
    const float* g[3][3];
    for (int a = 0; a < 3; ++a) {
      for (int b = 0; b < 3; ++b) {
        g[a][b] = k + ((turned ? 2 - a : a) * 3 + (turned ? 2 - b : b)) * plane;
      }
    }
#pragma omp simd
    for (int64_t e = begin; e < end; ++e) {
      float r[4][3];  // G g
      for (int b = 0; b < 3; ++b) {
        const float g0 = g[0][b][e], g1 = g[1][b][e], g2 = g[2][b][e];
        r[0][b] = g0;
        r[1][b] = .5f * (g0 + g1 + g2);
        r[2][b] = .5f * (g0 - g1 + g2);
        r[3][b] = g2;
      }
      for (int i = 0; i < 4; ++i) {  // (G g) G^T
        u[(4 * i + 0) * plane + e] = r[i][0];
        u[(4 * i + 1) * plane + e] = .5f * (r[i][0] + r[i][1] + r[i][2]);
        u[(4 * i + 2) * plane + e] = .5f * (r[i][0] - r[i][1] + r[i][2]);
        u[(4 * i + 3) * plane + e] = r[i][2];
      }
    }
  });
}

// v[xi][t][c] = (B^T d B)[xi] for the chunk's tiles t = 0..count-1 (tiles first + t),
// d the 4x4 block of x [n, h, w, c] around the tile (zero outside the image); v holds
// `stride` tiles per xi.
void InputTransform(const Tiles& tiles, const float* x, int64_t c, const float* zeros,
                    int64_t first, int64_t count, int64_t stride, float* v) {
  const int64_t plane = stride * c;
  for (int64_t t = 0; t < count; ++t) {
    int64_t image, ty, tx;
    tiles.locate(first + t, &image, &ty, &tx);
    const float* d[4][4];
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < 4; ++b) {
        const int64_t row = 2 * ty - 1 + a, col = 2 * tx - 1 + b;
        d[a][b] = row < 0 || row >= tiles.h || col < 0 || col >= tiles.w
                      ? zeros
                      : x + ((image * tiles.h + row) * tiles.w + col) * c;
      }
    }
    float* out = v + t * c;
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) {
      float e[4][4];  // B^T d
      for (int b = 0; b < 4; ++b) {
        const float d0 = d[0][b][ch], d1 = d[1][b][ch], d2 = d[2][b][ch], d3 = d[3][b][ch];
        e[0][b] = d0 - d2;
        e[1][b] = d1 + d2;
        e[2][b] = d2 - d1;
        e[3][b] = d1 - d3;
      }
      for (int a = 0; a < 4; ++a) {  // (B^T d) B
        out[(4 * a + 0) * plane + ch] = e[a][0] - e[a][2];
        out[(4 * a + 1) * plane + ch] = e[a][1] + e[a][2];
        out[(4 * a + 2) * plane + ch] = e[a][2] - e[a][1];
        out[(4 * a + 3) * plane + ch] = e[a][1] - e[a][3];
      }
    }
  }
}

// y's 2x2 block of each chunk tile = A^T m[.][t] A (+ bias b, if not null); m holds
// `stride` tiles per xi, c channels; outputs outside the image are not written.
void OutputTransform(const Tiles& tiles, const float* m, int64_t c, const float* b,
                     int64_t first, int64_t count, int64_t stride, float* y) {
  const int64_t plane = stride * c;
  for (int64_t t = 0; t < count; ++t) {
    float* block[2][2];
    tiles.OutputBlock(first + t, y, c, block);
    float *y00 = block[0][0], *y01 = block[0][1], *y10 = block[1][0], *y11 = block[1][1];
    const float* in = m + t * c;
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) {
      float e[2][4];  // A^T m
      for (int b = 0; b < 4; ++b) {
        const float m0 = in[(0 + b) * plane + ch], m1 = in[(4 + b) * plane + ch],
                    m2 = in[(8 + b) * plane + ch], m3 = in[(12 + b) * plane + ch];
        e[0][b] = m0 + m1 + m2;
        e[1][b] = m1 - m2 - m3;
      }
      const float bias = b == nullptr ? 0.f : b[ch];
      y00[ch] = e[0][0] + e[0][1] + e[0][2] + bias;
      if (y01) y01[ch] = e[0][1] - e[0][2] - e[0][3] + bias;
      if (y10) y10[ch] = e[1][0] + e[1][1] + e[1][2] + bias;
      if (y11) y11[ch] = e[1][1] - e[1][2] - e[1][3] + bias;
    }
  }
}

// dm[xi][t][c] = (A dY A^T)[xi] for the chunk's tiles, dY the tile's 2x2 block of dy
// (zero outside the image); sums the block into db_sum [c].
void GradTransform(const Tiles& tiles, const float* dy, int64_t c, int64_t first,
                   int64_t count, int64_t stride, float* dm, float* db_sum) {
  const int64_t plane = stride * c;
  for (int64_t t = 0; t < count; ++t) {
    const float* block[2][2];
    tiles.OutputBlock(first + t, dy, c, block);
    const float *g00 = block[0][0], *g01 = block[0][1], *g10 = block[1][0],
                *g11 = block[1][1];
    float* out = dm + t * c;
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) {
      const float d[2][2] = {{g00[ch], g01 ? g01[ch] : 0.f},
                             {g10 ? g10[ch] : 0.f, g11 ? g11[ch] : 0.f}};
      db_sum[ch] += (d[0][0] + d[0][1]) + (d[1][0] + d[1][1]);
      float r[4][2];  // A dY
      for (int b = 0; b < 2; ++b) {
        r[0][b] = d[0][b];
        r[1][b] = d[0][b] + d[1][b];
        r[2][b] = d[0][b] - d[1][b];
        r[3][b] = -d[1][b];
      }
      for (int a = 0; a < 4; ++a) {  // (A dY) A^T
        out[(4 * a + 0) * plane + ch] = r[a][0];
        out[(4 * a + 1) * plane + ch] = r[a][0] + r[a][1];
        out[(4 * a + 2) * plane + ch] = r[a][0] - r[a][1];
        out[(4 * a + 3) * plane + ch] = -r[a][1];
      }
    }
  }
}

// Worker count for `chunks` chunks: one per pool thread, at most one per chunk.
int64_t Workers(ffi::ThreadPool& pool, int64_t chunks) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), chunks));
}

// out = conv(in, kernel) (+ b): in [n, h, w, cin] -> out [n, h, w, cout], the kernel as
// its transform u: [16, cin, cout], or [16, cout, cin] if `transposed`.
void Apply(ffi::ThreadPool& pool, const Tiles& tiles, int64_t cin, int64_t cout,
           const float* in, const float* u, bool transposed, const float* b, float* out) {
  const int64_t chunk = ChunkTiles(tiles, cin, cout, pool.num_threads());
  const int64_t chunks = (tiles.count() + chunk - 1) / chunk;
  const std::vector<float> zeros(cin, 0.f);
  std::atomic<int64_t> next{0};
  ParallelFor(pool, Workers(pool, chunks), [&](int64_t) {
    OmpThreads single(1);
    float* v = ThreadBuffer(0, 16 * chunk * cin);
    float* m = ThreadBuffer(1, 16 * chunk * cout);
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      const int64_t first = c * chunk, count = std::min(chunk, tiles.count() - first);
      InputTransform(tiles, in, cin, zeros.data(), first, count, chunk, v);
      for (int64_t xi = 0; xi < 16; ++xi) {
        Check(dnnl_sgemm('N', transposed ? 'T' : 'N', count, cout, cin, 1.f,
                         v + xi * chunk * cin, cin, u + xi * cin * cout,
                         transposed ? cin : cout, 0.f, m + xi * chunk * cout, cout));
      }
      OutputTransform(tiles, m, cout, b, first, count, chunk, out);
    }
  });
}

// dk [3, 3, ci, co] and db [co] from x and dy (see winograd.h).
void KernelGrad(ffi::ThreadPool& pool, const Tiles& tiles, int64_t ci, int64_t co,
                const float* x, const float* dy, float* dk, float* db) {
  const int64_t chunk = ChunkTiles(tiles, ci, co, pool.num_threads());
  const int64_t chunks = (tiles.count() + chunk - 1) / chunk;
  const int64_t plane = ci * co;
  // Each worker's partial gradient is 16 ci co floats: at most 256 MiB of them in all.
  const int64_t workers = std::min<int64_t>(
      Workers(pool, chunks), std::max<int64_t>(1, (int64_t{64} << 20) / (16 * plane)));
  const std::vector<float> zeros(ci, 0.f);
  // Worker w's transformed kernel gradient [16, ci, co] and bias gradient [co].
  std::vector<std::unique_ptr<float[]>> partial(workers);
  for (auto& p : partial) p.reset(new float[16 * plane + co]);
  ParallelFor(pool, workers, [&](int64_t worker) {
    OmpThreads single(1);
    float* v = ThreadBuffer(0, 16 * chunk * ci);
    float* dm = ThreadBuffer(1, 16 * chunk * co);
    float* du = partial[worker].get();
    float* db_sum = du + 16 * plane;
    std::fill(db_sum, db_sum + co, 0.f);
    const int64_t begin = chunks * worker / workers, end = chunks * (worker + 1) / workers;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * chunk, count = std::min(chunk, tiles.count() - first);
      InputTransform(tiles, x, ci, zeros.data(), first, count, chunk, v);
      GradTransform(tiles, dy, co, first, count, chunk, dm, db_sum);
      for (int64_t xi = 0; xi < 16; ++xi) {
        Check(dnnl_sgemm('T', 'N', ci, co, count, 1.f, v + xi * chunk * ci, ci,
                         dm + xi * chunk * co, co, c == begin ? 0.f : 1.f,
                         du + xi * plane, co));
      }
    }
    if (begin == end) std::fill(du, du + 16 * plane, 0.f);
  });
  // dk[a][b] = sum_{i, j} G[i][a] G[j][b] du[4 i + j], du summed over the workers in
  // worker order. One pass over the partial gradients and dk.
  ParallelFor(pool, (plane + kPlaneBlock - 1) / kPlaneBlock, [&](int64_t block) {
    const int64_t begin = block * kPlaneBlock, end = std::min(plane, begin + kPlaneBlock);
    for (int64_t e0 = begin; e0 < end; e0 += 256) {
      const int64_t e1 = std::min(end, e0 + 256);
      float sum[16][256];
      for (int xi = 0; xi < 16; ++xi) {
        const float* in = partial[0].get() + xi * plane;
        for (int64_t e = e0; e < e1; ++e) sum[xi][e - e0] = in[e];
        for (int64_t worker = 1; worker < workers; ++worker) {
          const float* more = partial[worker].get() + xi * plane;
          for (int64_t e = e0; e < e1; ++e) sum[xi][e - e0] += more[e];
        }
      }
#pragma omp simd
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t q = e - e0;
        float r[3][4];  // G^T du
        for (int j = 0; j < 4; ++j) {
          const float d0 = sum[j][q], d1 = sum[4 + j][q], d2 = sum[8 + j][q],
                      d3 = sum[12 + j][q];
          r[0][j] = d0 + .5f * (d1 + d2);
          r[1][j] = .5f * (d1 - d2);
          r[2][j] = .5f * (d1 + d2) + d3;
        }
        for (int a = 0; a < 3; ++a) {  // (G^T du) G
          dk[(3 * a + 0) * plane + e] = r[a][0] + .5f * (r[a][1] + r[a][2]);
          dk[(3 * a + 1) * plane + e] = .5f * (r[a][1] - r[a][2]);
          dk[(3 * a + 2) * plane + e] = .5f * (r[a][1] + r[a][2]) + r[a][3];
        }
      }
    }
  });
  std::fill(db, db + co, 0.f);
  for (int64_t worker = 0; worker < workers; ++worker) {
    const float* part = partial[worker].get() + 16 * plane;
    for (int64_t ch = 0; ch < co; ++ch) db[ch] += part[ch];
  }
}

}  // namespace

bool Applies(int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
             int64_t pl, int64_t pr) {
  return kh == 3 && kw == 3 && sh == 1 && sw == 1 && pt == 1 && pb == 1 && pl == 1 &&
         pr == 1;
}

void Forward(ffi::ThreadPool& pool, int64_t n, int64_t h, int64_t w, int64_t ci,
             int64_t co, const float* x, const float* k, const float* b, float* y) {
  std::unique_ptr<float[]> u(new float[16 * ci * co]);
  KernelTransform(pool, k, ci, co, /*turned=*/false, u.get());
  Apply(pool, Tiles(n, h, w), ci, co, x, u.get(), /*transposed=*/false, b, y);
}

void Backward(ffi::ThreadPool& pool, int64_t n, int64_t h, int64_t w, int64_t ci,
              int64_t co, const float* x, const float* k, const float* dy, float* dx,
              float* dk, float* db) {
  const Tiles tiles(n, h, w);
  {
    std::unique_ptr<float[]> u(new float[16 * ci * co]);
    KernelTransform(pool, k, ci, co, /*turned=*/true, u.get());
    Apply(pool, tiles, co, ci, dy, u.get(), /*transposed=*/true, nullptr, dx);
  }
  KernelGrad(pool, tiles, ci, co, x, dy, dk, db);
}

}  // namespace diffusion_jax::winograd
