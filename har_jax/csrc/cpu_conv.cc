// float32 NHWC convolutions for XLA's CPU backend, called through the XLA FFI.
//
// XLA CPU runs the weight gradient of a convolution as a convolution over the
// batch dimension, which it can only do after transposing both operands (and
// re-running the fused BatchNorm/ReLU producers inside those transposes); on a
// CIFAR ResNet that is over half of the training step. These kernels read NHWC
// directly instead:
//
//   har_conv_forward      y[n,oh,ow,k]  = sum x[n, oh*s+i, ow*s+j, c] * w[i,j,c,k]
//   har_conv_filter_grad  dw[i,j,c,k]   = sum x[n, oh*s+i, ow*s+j, c] * dy[n,oh,ow,k]
//
// `x` arrives already padded (the caller pads with XLA), so both are "valid"
// convolutions with stride s. The input gradient of a stride-1 convolution is
// har_conv_forward over the padded output gradient with flipped, transposed
// weights (see har_jax/cpu_conv.py). K must be a multiple of 16: the output
// channels are the vector lanes (16 floats, one AVX-512 register; the compiler
// splits it where the CPU has narrower vectors). Work is split over XLA's own
// intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float vf __attribute__((vector_size(64)));
typedef float vf_unaligned __attribute__((vector_size(64), aligned(4)));
constexpr int64_t kLanes = 16;

inline vf Load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void Store(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }

// Runs body(begin, end) over [0, n) in chunks of `grain`, on the calling thread
// and on up to pool.num_threads() threads of XLA's pool. The body lives on the
// caller's stack: a helper calls it only after claiming a chunk, and the caller
// returns only once every chunk has finished, so a helper that starts late finds
// nothing and touches nothing.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  int64_t n = 0, grain = 1, chunks = 0;
  std::function<void(int64_t, int64_t)> body;
};

void RunChunks(Work& work) {
  for (int64_t c; (c = work.next.fetch_add(1)) < work.chunks;) {
    work.body(c * work.grain, std::min(work.n, (c + 1) * work.grain));
    work.finished.fetch_add(1, std::memory_order_release);
  }
}

template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t grain, const Body& body) {
  auto work = std::make_shared<Work>();
  work->n = n;
  work->grain = grain;
  work->chunks = (n + grain - 1) / grain;
  work->body = [&body](int64_t begin, int64_t end) { body(begin, end); };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->chunks - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work]() { RunChunks(*work); });
  RunChunks(*work);
  while (work->finished.load(std::memory_order_acquire) < work->chunks)
    std::this_thread::yield();
}

// The sum over batch slots that the reductions below keep apart for
// reproducibility: out = partial[0] + partial[1] + ..., in slot order.
void SumSlots(const std::vector<float>& partial, int64_t slots, int64_t size, float* out) {
  std::memset(out, 0, size * sizeof(float));
  for (int64_t slot = 0; slot < slots; ++slot) {
    const float* src = partial.data() + slot * size;
    for (int64_t e = 0; e < size; ++e) out[e] += src[e];
  }
}

struct Geometry {
  int64_t n, h, w, c;     // input
  int64_t kh, kw, k;      // kernel
  int64_t oh, ow;         // output
  int64_t s, pt, pl;      // stride; zero padding above and left (may be negative)
  // Input row and column of output (oh, ow) at tap (0, 0).
  int64_t Row(int64_t oh_) const { return oh_ * s - pt; }
  int64_t Col(int64_t ow_) const { return ow_ * s - pl; }
  // Taps [first, last) of a kernel of `taps` that land inside [0, size) from `at`.
  static int64_t First(int64_t at) { return std::max<int64_t>(0, -at); }
  static int64_t Last(int64_t at, int64_t taps, int64_t size) {
    return std::min<int64_t>(taps, size - at);
  }
  // Outputs [lo, hi) of `outs` whose whole kernel row lies inside [0, size).
  static void Inside(int64_t outs, int64_t stride, int64_t pad, int64_t taps, int64_t size,
                     int64_t* lo, int64_t* hi) {
    *lo = pad > 0 ? (pad + stride - 1) / stride : 0;
    const int64_t room = size - taps + pad;  // o * stride <= room
    *hi = room < 0 ? 0 : std::min<int64_t>(outs, room / stride + 1);
    *lo = std::min(*lo, *hi);
  }
};

// ---------------------------------------------------------------- forward

// T output pixels x KV vectors of output channels, accumulated in registers.
// The T pixels' kernel columns all lie inside the input; rows are clipped.
template <int KV, int T>
inline void ForwardTile(const Geometry& g, const float* x_image, const float* w,
                        float* y_pixel, int64_t oh, int64_t ow0, int64_t k0) {
  vf acc[T][KV];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < KV; ++v) acc[t][v] = vf{};
  const int64_t step = g.s * g.c;
  const int64_t row = g.Row(oh);
  const int64_t i_end = Geometry::Last(row, g.kh, g.h);
  for (int64_t i = Geometry::First(row); i < i_end; ++i) {
    const float* x_row = x_image + ((row + i) * g.w + g.Col(ow0)) * g.c;
    for (int64_t j = 0; j < g.kw; ++j) {
      const float* xp = x_row + j * g.c;
      const float* wp = w + (i * g.kw + j) * g.c * g.k + k0;
#pragma GCC unroll 4
      for (int64_t c = 0; c < g.c; ++c) {
        vf wv[KV];
#pragma GCC unroll 4
        for (int v = 0; v < KV; ++v) wv[v] = Load(wp + c * g.k + v * kLanes);
#pragma GCC unroll 16
        for (int t = 0; t < T; ++t) {
          const float xs = xp[t * step + c];
#pragma GCC unroll 4
          for (int v = 0; v < KV; ++v) acc[t][v] += xs * wv[v];
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < KV; ++v) Store(y_pixel + t * g.k + k0 + v * kLanes, acc[t][v]);
}

// One output pixel near the left or right edge: kernel columns clipped too.
// Four partial sums over the input channels keep four FMA chains in flight.
template <int KV>
inline void ForwardEdgePixel(const Geometry& g, const float* x_image, const float* w,
                             float* y_pixel, int64_t oh, int64_t ow, int64_t k0) {
  constexpr int kChains = 4;
  vf acc[kChains][KV];
#pragma GCC unroll 4
  for (int p = 0; p < kChains; ++p)
#pragma GCC unroll 4
    for (int v = 0; v < KV; ++v) acc[p][v] = vf{};
  const int64_t row = g.Row(oh), col = g.Col(ow);
  const int64_t i_end = Geometry::Last(row, g.kh, g.h);
  const int64_t j_end = Geometry::Last(col, g.kw, g.w);
  for (int64_t i = Geometry::First(row); i < i_end; ++i) {
    for (int64_t j = Geometry::First(col); j < j_end; ++j) {
      const float* xp = x_image + ((row + i) * g.w + col + j) * g.c;
      const float* wp = w + (i * g.kw + j) * g.c * g.k + k0;
      int64_t c = 0;
      for (; c + kChains <= g.c; c += kChains) {
#pragma GCC unroll 4
        for (int p = 0; p < kChains; ++p)
#pragma GCC unroll 4
          for (int v = 0; v < KV; ++v)
            acc[p][v] += xp[c + p] * Load(wp + (c + p) * g.k + v * kLanes);
      }
      for (; c < g.c; ++c) {
#pragma GCC unroll 4
        for (int v = 0; v < KV; ++v) acc[0][v] += xp[c] * Load(wp + c * g.k + v * kLanes);
      }
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < KV; ++v)
    Store(y_pixel + k0 + v * kLanes, (acc[0][v] + acc[1][v]) + (acc[2][v] + acc[3][v]));
}

// Tiles of T = 1..kMaxT pixels, chosen at run time.
template <int KV, int T>
inline void ForwardTileOf(int64_t t, const Geometry& g, const float* x_image, const float* w,
                          float* y_pixel, int64_t oh, int64_t ow0, int64_t k0) {
  if constexpr (T > 1) {
    if (t < T) return ForwardTileOf<KV, T - 1>(t, g, x_image, w, y_pixel, oh, ow0, k0);
  }
  ForwardTile<KV, T>(g, x_image, w, y_pixel, oh, ow0, k0);
}

// A row of outputs: edge pixels one by one, the interior in equal tiles of at
// most kMaxT pixels (30 interior pixels: three tiles of 10, not 12 + 12 + 6).
template <int KV, int kMaxT>
inline void ForwardRow(const Geometry& g, const float* x_image, const float* w,
                       float* y_row, int64_t oh, int64_t k0) {
  int64_t lo, hi;
  Geometry::Inside(g.ow, g.s, g.pl, g.kw, g.w, &lo, &hi);
  for (int64_t ow = 0; ow < lo; ++ow)
    ForwardEdgePixel<KV>(g, x_image, w, y_row + ow * g.k, oh, ow, k0);
  const int64_t interior = hi - lo;
  if (interior > 0) {
    const int64_t tiles = (interior + kMaxT - 1) / kMaxT;
    const int64_t base = interior / tiles, longer = interior % tiles;
    for (int64_t tile = 0, ow = lo; tile < tiles; ++tile) {
      const int64_t t = base + (tile < longer ? 1 : 0);
      ForwardTileOf<KV, kMaxT>(t, g, x_image, w, y_row + ow * g.k, oh, ow, k0);
      ow += t;
    }
  }
  for (int64_t ow = std::max(lo, hi); ow < g.ow; ++ow)
    ForwardEdgePixel<KV>(g, x_image, w, y_row + ow * g.k, oh, ow, k0);
}

void Forward(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* w,
             float* y) {
  const int64_t rows = g.n * g.oh;
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(16, rows / 64));
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t image = r / g.oh, oh = r % g.oh;
      const float* x_image = x + image * g.h * g.w * g.c;
      float* y_row = y + r * g.ow * g.k;
      for (int64_t k0 = 0; k0 < g.k;) {
        const int64_t vectors = std::min<int64_t>(4, (g.k - k0) / kLanes);
        switch (vectors) {
          case 4: ForwardRow<4, 6>(g, x_image, w, y_row, oh, k0); break;
          case 3: ForwardRow<3, 8>(g, x_image, w, y_row, oh, k0); break;
          case 2: ForwardRow<2, 12>(g, x_image, w, y_row, oh, k0); break;
          default: ForwardRow<1, 16>(g, x_image, w, y_row, oh, k0); break;
        }
        k0 += vectors * kLanes;
      }
    }
  };
  ParallelFor(pool, rows, grain, body);
}

// ---------------------------------------------------------------- filter grad

// CB input channels x KV vectors of output channels of tap (i, j), summed over
// output rows [oh0, oh1) and columns [ow0, ow1) of one image into dw (read, add,
// write back). The caller clips the ranges to outputs whose tap is inside.
template <int KV, int CB>
inline void FilterTile(const Geometry& g, const float* x_image, const float* dy_image,
                       float* dw, int64_t i, int64_t j, int64_t c0, int64_t k0,
                       int64_t oh0, int64_t oh1, int64_t ow0, int64_t ow1) {
  float* dwp = dw + ((i * g.kw + j) * g.c + c0) * g.k + k0;
  vf acc[CB][KV];
#pragma GCC unroll 16
  for (int b = 0; b < CB; ++b)
#pragma GCC unroll 4
    for (int v = 0; v < KV; ++v) acc[b][v] = Load(dwp + b * g.k + v * kLanes);
  const int64_t step = g.s * g.c;
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const float* xp = x_image + ((g.Row(oh) + i) * g.w + g.Col(ow0) + j) * g.c + c0;
    const float* dyp = dy_image + (oh * g.ow + ow0) * g.k + k0;
    for (int64_t ow = ow0; ow < ow1; ++ow, xp += step, dyp += g.k) {
      vf d[KV];
#pragma GCC unroll 4
      for (int v = 0; v < KV; ++v) d[v] = Load(dyp + v * kLanes);
#pragma GCC unroll 16
      for (int b = 0; b < CB; ++b) {
        const float xs = xp[b];
#pragma GCC unroll 4
        for (int v = 0; v < KV; ++v) acc[b][v] += xs * d[v];
      }
    }
  }
#pragma GCC unroll 16
  for (int b = 0; b < CB; ++b)
#pragma GCC unroll 4
    for (int v = 0; v < KV; ++v) Store(dwp + b * g.k + v * kLanes, acc[b][v]);
}

// Outputs [lo, hi) of [begin, end) whose tap `t` lands inside [0, size).
inline void TapOutputs(int64_t begin, int64_t end, int64_t stride, int64_t pad, int64_t t,
                       int64_t size, int64_t* lo, int64_t* hi) {
  // o * stride - pad + t in [0, size)
  const int64_t need = pad - t;  // o * stride >= need
  int64_t first = need > 0 ? (need + stride - 1) / stride : 0;
  const int64_t room = size - 1 + pad - t;  // o * stride <= room
  int64_t last = room < 0 ? -1 : room / stride;
  *lo = std::max(begin, first);
  *hi = std::max(*lo, std::min(end, last + 1));
}

template <int KV, int CB>
inline void FilterTileOf(int64_t cb, const Geometry& g, const float* x_image,
                         const float* dy_image, float* dw, int64_t i, int64_t j, int64_t c0,
                         int64_t k0, int64_t oh0, int64_t oh1, int64_t ow0, int64_t ow1) {
  if constexpr (CB > 1) {
    if (cb < CB)
      return FilterTileOf<KV, CB - 1>(cb, g, x_image, dy_image, dw, i, j, c0, k0, oh0, oh1,
                                      ow0, ow1);
  }
  FilterTile<KV, CB>(g, x_image, dy_image, dw, i, j, c0, k0, oh0, oh1, ow0, ow1);
}

// The input channels in equal blocks of at most kMaxCB.
template <int KV, int kMaxCB>
inline void FilterChannels(const Geometry& g, const float* x_image, const float* dy_image,
                           float* dw, int64_t i, int64_t j, int64_t k0, int64_t oh0,
                           int64_t oh1, int64_t ow0, int64_t ow1) {
  const int64_t blocks = (g.c + kMaxCB - 1) / kMaxCB;
  const int64_t base = g.c / blocks, longer = g.c % blocks;
  for (int64_t block = 0, c = 0; block < blocks; ++block) {
    const int64_t cb = base + (block < longer ? 1 : 0);
    FilterTileOf<KV, kMaxCB>(cb, g, x_image, dy_image, dw, i, j, c, k0, oh0, oh1, ow0, ow1);
    c += cb;
  }
}

// The weight gradient is a sum over the batch. Its blocks are split into a
// number of slots fixed by the shape alone, each summed in order into a buffer
// of its own, and the slots are added in order: the result does not depend on
// the thread count or on which thread took which slot (runs are reproducible).
void FilterGrad(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* dy,
                float* dw) {
  const int64_t size = g.kh * g.kw * g.c * g.k;
  // Rows per block: the x and dy rows of a block stay in cache across the taps.
  const int64_t block_rows =
      std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, g.ow * (g.k + g.s * g.c) * 4));
  const int64_t blocks_per_image = (g.oh + block_rows - 1) / block_rows;
  const int64_t blocks = g.n * blocks_per_image;
  // Up to 16 slots, within 32 MiB of partial sums.
  const int64_t slots = std::max<int64_t>(
      1, std::min<int64_t>({16, blocks, (int64_t{8} << 20) / std::max<int64_t>(1, size)}));
  std::vector<float> partial(slots * size, 0.0f);
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot) {
      float* acc = partial.data() + slot * size;
      for (int64_t b = slot * blocks / slots; b < (slot + 1) * blocks / slots; ++b) {
        const int64_t image = b / blocks_per_image;
        const int64_t first_row = (b % blocks_per_image) * block_rows;
        const int64_t end_row = std::min(g.oh, first_row + block_rows);
        const float* x_image = x + image * g.h * g.w * g.c;
        const float* dy_image = dy + image * g.oh * g.ow * g.k;
        for (int64_t i = 0; i < g.kh; ++i) {
          int64_t oh0, oh1;
          TapOutputs(first_row, end_row, g.s, g.pt, i, g.h, &oh0, &oh1);
          if (oh0 >= oh1) continue;
          for (int64_t j = 0; j < g.kw; ++j) {
            int64_t ow0, ow1;
            TapOutputs(0, g.ow, g.s, g.pl, j, g.w, &ow0, &ow1);
            if (ow0 >= ow1) continue;
            for (int64_t k0 = 0; k0 < g.k;) {
              const int64_t vectors = std::min<int64_t>(4, (g.k - k0) / kLanes);
              switch (vectors) {
                case 4:
                  FilterChannels<4, 6>(g, x_image, dy_image, acc, i, j, k0, oh0, oh1, ow0, ow1);
                  break;
                case 3:
                  FilterChannels<3, 8>(g, x_image, dy_image, acc, i, j, k0, oh0, oh1, ow0, ow1);
                  break;
                case 2:
                  FilterChannels<2, 12>(g, x_image, dy_image, acc, i, j, k0, oh0, oh1, ow0, ow1);
                  break;
                default:
                  FilterChannels<1, 16>(g, x_image, dy_image, acc, i, j, k0, oh0, oh1, ow0, ow1);
                  break;
              }
              k0 += vectors * kLanes;
            }
          }
        }
      }
    }
  };
  ParallelFor(pool, slots, 1, body);
  SumSlots(partial, slots, size, dw);
}

// The geometry of a convolution from its NHWC input, HWIO kernel and NHWC
// output shapes (the kernel is `w` for the forward pass, `dw` for the filter
// gradient; the output is `y` or `dy`), or why they do not fit together.
ffi::Error MakeGeometry(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd,
                        ffi::Span<const int64_t> yd, int64_t stride, int64_t pad_top,
                        int64_t pad_left, Geometry* g) {
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4 || wd[2] != xd[3] ||
      yd[3] != wd[3] || yd[0] != xd[0])
    return ffi::Error::InvalidArgument("har_conv: expects NHWC x, HWIO kernel, NHWC output");
  *g = Geometry{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3],
                yd[1], yd[2], stride, pad_top, pad_left};
  if (g->k % kLanes != 0)
    return ffi::Error::InvalidArgument("har_conv: output channels must be a multiple of 16");
  if (g->s < 1 || g->oh < 1 || g->ow < 1 || g->kh < 1 || g->kw < 1)
    return ffi::Error::InvalidArgument("har_conv: empty output, kernel or stride < 1");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t pad_top,
                       int64_t pad_left) {
  Geometry g;
  if (auto error = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), stride,
                                pad_top, pad_left, &g);
      error.failure())
    return error;
  Forward(pool, g, x.typed_data(), w.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

ffi::Error FilterGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                          int64_t stride, int64_t pad_top, int64_t pad_left) {
  Geometry g;
  if (auto error = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), stride,
                                pad_top, pad_left, &g);
      error.failure())
    return error;
  FilterGrad(pool, g, x.typed_data(), dy.typed_data(), dw->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- BatchNorm

// The two per-channel sums of BatchNorm's gradient, in one pass over dy and x:
// stats[0] = sum(dy), stats[1] = sum(dy * (x - mean)) over all rows of [rows, C].
// Rows are split into slots fixed by the shape (as FilterGrad), so the sums do
// not depend on threads. C must be a multiple of 16.
void BatchNormGradStats(ffi::ThreadPool& pool, int64_t rows, int64_t c, const float* dy,
                        const float* x, const float* mean, float* stats) {
  constexpr int kRows = 4;  // rows in flight: four independent FMA chains
  const int64_t slots = std::max<int64_t>(1, std::min<int64_t>(16, rows / 256));
  std::vector<float> partial(slots * 2 * c, 0.0f);
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot) {
      const int64_t first = slot * rows / slots, last = (slot + 1) * rows / slots;
      float* sum_dy = partial.data() + slot * 2 * c;
      float* sum_dyx = sum_dy + c;
      for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
        const vf m = Load(mean + c0);
        vf a[kRows] = {}, b[kRows] = {};
        int64_t r = first;
        for (; r + kRows <= last; r += kRows) {
#pragma GCC unroll 4
          for (int u = 0; u < kRows; ++u) {
            const vf d = Load(dy + (r + u) * c + c0);
            a[u] += d;
            b[u] += d * (Load(x + (r + u) * c + c0) - m);
          }
        }
        for (; r < last; ++r) {
          const vf d = Load(dy + r * c + c0);
          a[0] += d;
          b[0] += d * (Load(x + r * c + c0) - m);
        }
        Store(sum_dy + c0, (a[0] + a[1]) + (a[2] + a[3]));
        Store(sum_dyx + c0, (b[0] + b[1]) + (b[2] + b[3]));
      }
    }
  };
  ParallelFor(pool, slots, 1, body);
  SumSlots(partial, slots, 2 * c, stats);
}

ffi::Error BatchNormGradStatsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                                  ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean,
                                  ffi::ResultBuffer<ffi::F32> stats) {
  auto dyd = dy.dimensions(), xd = x.dimensions();
  const int64_t c = dyd.size() == 0 ? 0 : dyd[dyd.size() - 1];
  if (dyd.size() != xd.size() || !std::equal(dyd.begin(), dyd.end(), xd.begin()) || c == 0 ||
      c % kLanes != 0 || mean.element_count() != static_cast<size_t>(c) ||
      stats->element_count() != static_cast<size_t>(2 * c))
    return ffi::Error::InvalidArgument(
        "har_batch_norm_grad_stats: expects dy and x of one shape [..., C], C % 16 == 0, "
        "mean [C] and stats [2, C]");
  const int64_t rows = c == 0 ? 0 : static_cast<int64_t>(dy.element_count()) / c;
  BatchNormGradStats(pool, rows, c, dy.typed_data(), x.typed_data(), mean.typed_data(),
                     stats->typed_data());
  return ffi::Error::Success();
}

}  // namespace

// Both convolution handlers: (x, kernel or output gradient) -> result, with
// the stride and the zero padding above and left.
static auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_left");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(HarConvForward, ForwardImpl, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(HarConvFilterGrad, FilterGradImpl, ConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HarBatchNormGradStats, BatchNormGradStatsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
