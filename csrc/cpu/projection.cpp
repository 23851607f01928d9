// The score-map products of the CPU fused kernels (csrc/cpu/projection.h).
#include "cpu/projection.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/work.h"

namespace hypercolumn_ops {
namespace cpu {
namespace {

// GEMM tiles: pixels x output columns per product.
constexpr int64_t kGemmPixels = 256;
constexpr int64_t kGemmColumns = 512;
// grad_weights: channels per item, pixels per run of its reduction (whose tiles, 64 KiB of
// float32 features, stay in L2 while the run's rows are summed), and rows of the product per
// register block.
constexpr int64_t kWeightColumns = 64;
constexpr int64_t kReductionPixels = 256;
constexpr int64_t kWeightRows = 4;
// Planes are read in place (planar_weight_run) up to this many padded rows: a run's transposed
// grad_scores (rows x kReductionPixels, 32 KiB of float32) then stay in L1 while every channel of
// the block reads them. More rows (keypoints: 428) amortise a tile's copy over more products.
constexpr int64_t kPlanarRows = 32;

// A run of pixels of a (B, C, H, W) tensor that one (pixels, C) matrix with a single pixel
// stride covers: whole images where the rows are evenly strided (contiguous, channels_last),
// else single rows; at most max_pixels each.
struct PixelRun {
  int64_t b, y, x, count;
};

std::vector<PixelRun> pixel_runs(const at::Tensor& t, int64_t max_pixels) {
  const int64_t batch = t.size(0), height = t.size(2), width = t.size(3);
  const bool whole = height == 1 || width == 1 || t.stride(2) == width * t.stride(3);
  std::vector<PixelRun> runs;
  for (int64_t b = 0; b < batch; ++b) {
    if (whole) {
      for (int64_t s = 0; s < height * width; s += max_pixels)
        runs.push_back(PixelRun{b, s / width, s % width, std::min(max_pixels, height * width - s)});
    } else {
      for (int64_t y = 0; y < height; ++y)
        for (int64_t x = 0; x < width; x += max_pixels)
          runs.push_back(PixelRun{b, y, x, std::min(max_pixels, width - x)});
    }
  }
  return runs;
}

// Channels [c0, c1) of a run's pixels as a (pixels, channels) view of `t` (no copy).
at::Tensor run_matrix(const at::Tensor& t, const PixelRun& run, int64_t c0, int64_t c1) {
  const int64_t pixel_stride = t.size(3) == 1 ? t.stride(2) : t.stride(3);
  return t.as_strided({run.count, c1 - c0}, {pixel_stride, t.stride(1)},
                      t.storage_offset() + run.b * t.stride(0) + c0 * t.stride(1) +
                          run.y * t.stride(2) + run.x * t.stride(3));
}

// The run's rows of a (B * H * W, Q) matrix of a map (B, H, W, Q).
at::Tensor run_rows(const at::Tensor& map_rows, const at::Tensor& feature, const PixelRun& run) {
  const int64_t first = (run.b * feature.size(2) + run.y) * feature.size(3) + run.x;
  return map_rows.narrow(0, first, run.count);
}

at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// A vector of `lanes` elements, in GCC's vector extension: one source for every target clone
// below.
template <typename T, int lanes>
struct Lanes {
  typedef T type __attribute__((vector_size(lanes * sizeof(T))));
};

// One vector of 64 bytes (an AVX-512 register; narrower targets split it).
template <typename T>
struct Vector {
  typedef typename Lanes<T, 64 / sizeof(T)>::type type;
};

// weight_run and planar_weight_run are compiled for AVX-512, AVX2 and the baseline, the best
// picked when the library loads. Each adds its terms in an order fixed by the shapes alone, so a
// machine gives the same bits at any thread count (clones for other instruction sets may fuse a
// product and a sum where another does not: bits may differ between machines).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HC_VECTOR_TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HC_VECTOR_TARGETS
#endif

// out (rows, kWeightColumns) += g.T @ f over one run of `pixels` pixels: g (pixels, rows), f
// (pixels, kWeightColumns), all contiguous, rows a multiple of kWeightRows. Each element is the
// sum of its run's terms in pixel order, added to out once. kWeightRows rows x kVectors vectors of
// columns per register block: 16 independent sums (4 kept an AVX-512 core's FMA units waiting on
// their latency), each vector of f loaded once for kWeightRows rows.
template <typename acc_t>
__attribute__((always_inline)) inline void weight_run_body(const acc_t* g, const acc_t* f, int64_t pixels,
                                                           int64_t rows, acc_t* out) {
  using V = typename Vector<acc_t>::type;
  constexpr int64_t lanes = static_cast<int64_t>(sizeof(V) / sizeof(acc_t));
  constexpr int64_t kVectors = 4;
  static_assert(kWeightColumns % (kVectors * lanes) == 0, "a block of columns is whole register blocks");
  for (int64_t v0 = 0; v0 < kWeightColumns; v0 += kVectors * lanes) {
    for (int64_t q0 = 0; q0 < rows; q0 += kWeightRows) {
      V sum[kWeightRows][kVectors] = {};
      for (int64_t p = 0; p < pixels; ++p) {
        V x[kVectors];
        for (int64_t j = 0; j < kVectors; ++j) std::memcpy(&x[j], f + p * kWeightColumns + v0 + j * lanes, sizeof(V));
        const acc_t* gp = g + p * rows + q0;
        for (int64_t k = 0; k < kWeightRows; ++k) {
          const acc_t scale = gp[k];
          for (int64_t j = 0; j < kVectors; ++j) sum[k][j] += scale * x[j];
        }
      }
      for (int64_t k = 0; k < kWeightRows; ++k) {
        for (int64_t j = 0; j < kVectors; ++j) {
          V before;
          acc_t* to = out + (q0 + k) * kWeightColumns + v0 + j * lanes;
          std::memcpy(&before, to, sizeof(V));
          before += sum[k][j];
          std::memcpy(to, &before, sizeof(V));
        }
      }
    }
  }
}

HC_VECTOR_TARGETS void weight_run(const float* g, const float* f, int64_t pixels, int64_t rows, float* out) {
  weight_run_body(g, f, pixels, rows, out);
}

HC_VECTOR_TARGETS void weight_run(const double* g, const double* f, int64_t pixels, int64_t rows, double* out) {
  weight_run_body(g, f, pixels, rows, out);
}

// The sum of a vector's lanes, halving it until two lanes are left: log2(lanes) vector adds
// instead of a chain of lanes - 1 scalar ones.
template <typename acc_t, int kLanes>
__attribute__((always_inline)) inline acc_t lane_sum(const typename Lanes<acc_t, kLanes>::type& v) {
  if constexpr (kLanes == 2) {
    return v[0] + v[1];
  } else {
    using Half = typename Lanes<acc_t, kLanes / 2>::type;
    Half low, high;
    std::memcpy(&low, &v, sizeof(Half));
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    return lane_sum<acc_t, kLanes / 2>(low + high);
  }
}

// The same product where the features are planes (NCHW, a run contiguous in each plane, already
// in acc_t): out (rows, kWeightColumns) += gt @ planes.T over one run, gt (rows, pixels) the
// run's grad_scores transposed (row q at gt + q * gt_stride), plane c at f + c * channel_stride,
// `channels` of them. Read in place, without a tile: each element is a sum over the pixels in
// vector lanes, the lanes then summed (lane_sum), then the pixels past the last whole vector (the
// same order whichever block of channels computes it). kChannels planes x kWeightRows rows per
// register block: 16 independent sums, and each vector of gt loaded once for kChannels planes.
template <int kChannels, typename acc_t>
__attribute__((always_inline)) inline void planar_block(const acc_t* gt, int64_t gt_stride, const acc_t* f,
                                                        int64_t channel_stride, int64_t pixels, int64_t q0,
                                                        acc_t* out) {
  using V = typename Vector<acc_t>::type;
  constexpr int lanes = static_cast<int>(sizeof(V) / sizeof(acc_t));
  const int64_t whole = pixels / lanes * lanes;
  V sum[kChannels][kWeightRows] = {};
  for (int64_t p = 0; p < whole; p += lanes) {
    V x[kChannels];
    for (int j = 0; j < kChannels; ++j) std::memcpy(&x[j], f + j * channel_stride + p, sizeof(V));
    for (int64_t k = 0; k < kWeightRows; ++k) {
      V g;
      std::memcpy(&g, gt + (q0 + k) * gt_stride + p, sizeof(V));
      for (int j = 0; j < kChannels; ++j) sum[j][k] += g * x[j];
    }
  }
  for (int j = 0; j < kChannels; ++j) {
    const acc_t* plane = f + j * channel_stride;
    for (int64_t k = 0; k < kWeightRows; ++k) {
      acc_t total = lane_sum<acc_t, lanes>(sum[j][k]);
      for (int64_t p = whole; p < pixels; ++p) total += gt[(q0 + k) * gt_stride + p] * plane[p];
      out[(q0 + k) * kWeightColumns + j] += total;
    }
  }
}

template <typename acc_t>
__attribute__((always_inline)) inline void planar_weight_run_body(const acc_t* gt, int64_t gt_stride, const acc_t* f,
                                                                  int64_t channel_stride, int64_t channels,
                                                                  int64_t pixels, int64_t rows, acc_t* out) {
  constexpr int kChannels = 4;
  int64_t c = 0;
  for (; c + kChannels <= channels; c += kChannels)
    for (int64_t q0 = 0; q0 < rows; q0 += kWeightRows)
      planar_block<kChannels>(gt, gt_stride, f + c * channel_stride, channel_stride, pixels, q0, out + c);
  for (; c < channels; ++c)
    for (int64_t q0 = 0; q0 < rows; q0 += kWeightRows)
      planar_block<1>(gt, gt_stride, f + c * channel_stride, channel_stride, pixels, q0, out + c);
}

HC_VECTOR_TARGETS void planar_weight_run(const float* gt, int64_t gt_stride, const float* f, int64_t channel_stride,
                                         int64_t channels, int64_t pixels, int64_t rows, float* out) {
  planar_weight_run_body(gt, gt_stride, f, channel_stride, channels, pixels, rows, out);
}

HC_VECTOR_TARGETS void planar_weight_run(const double* gt, int64_t gt_stride, const double* f,
                                         int64_t channel_stride, int64_t channels, int64_t pixels, int64_t rows,
                                         double* out) {
  planar_weight_run_body(gt, gt_stride, f, channel_stride, channels, pixels, rows, out);
}

// grad_weight_rows (Q, C) from grad_scores (B, H, W, Q) and feature (B, C, H, W, any strides) of
// scalar_t: items own blocks of kWeightColumns channels, and add the product of each run of pixels
// in order, the rows padded to kWeightRows with zeros. Planes of acc_t whose runs are contiguous
// (NCHW float and double maps) are read in place (planar_weight_run, from grad_scores transposed
// once for every item) where there are at most kPlanarRows rows; otherwise each run is copied into
// a tile of pixels x channels in acc_t, pixel by pixel where a pixel's channels are contiguous
// (channels_last), and multiplied by weight_run.
template <typename scalar_t, typename acc_t>
void weight_grad_blocks(const at::Tensor& grad_scores, const at::Tensor& feature, const at::Tensor& grad_weight_rows) {
  const int64_t height = feature.size(2), width = feature.size(3), channels = feature.size(1);
  const int64_t rows = grad_weight_rows.size(0), pixel_count = feature.size(0) * height * width;
  const int64_t padded = (rows + kWeightRows - 1) / kWeightRows * kWeightRows;
  const acc_t* scores = grad_scores.const_data_ptr<acc_t>();
  const scalar_t* data = feature.const_data_ptr<scalar_t>();
  const int64_t pixel_stride = width == 1 ? feature.stride(2) : feature.stride(3);
  const int64_t channel_stride = feature.stride(1);
  const bool planar = std::is_same_v<scalar_t, acc_t> && pixel_stride == 1 && padded <= kPlanarRows;
  // planar: (padded, pixels), the rows past Q zero.
  at::Tensor transposed;
  if (planar) {
    transposed = at::empty({padded, pixel_count}, grad_scores.options());
    transposed.narrow(0, 0, rows).copy_(grad_scores.view({pixel_count, rows}).t());
    transposed.narrow(0, rows, padded - rows).zero_();
  }
  const std::vector<PixelRun> runs = pixel_runs(feature, kReductionPixels);
  run_items((channels + kWeightColumns - 1) / kWeightColumns, [&](int64_t item) {
    const int64_t c0 = item * kWeightColumns, block = std::min(kWeightColumns, channels - c0);
    std::vector<acc_t> out(padded * kWeightColumns, acc_t(0));
    std::vector<acc_t> g(planar ? 0 : kReductionPixels * padded, acc_t(0));
    std::vector<acc_t> f(planar ? 0 : kReductionPixels * kWeightColumns, acc_t(0));
    for (const PixelRun& run : runs) {
      const int64_t first = (run.b * height + run.y) * width + run.x;
      const scalar_t* pixels = data + run.b * feature.stride(0) + c0 * channel_stride + run.y * feature.stride(2) +
                               run.x * feature.stride(3);
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (planar) {
          planar_weight_run(transposed.const_data_ptr<acc_t>() + first, pixel_count, pixels, channel_stride, block,
                            run.count, padded, out.data());
          continue;
        }
      }
      for (int64_t p = 0; p < run.count; ++p)
        for (int64_t q = 0; q < rows; ++q) g[p * padded + q] = scores[(first + p) * rows + q];
      if (channel_stride == 1) {
        for (int64_t p = 0; p < run.count; ++p)
          for (int64_t c = 0; c < block; ++c) f[p * kWeightColumns + c] = acc_t(pixels[p * pixel_stride + c]);
      } else {
        for (int64_t c = 0; c < block; ++c) {
          const scalar_t* plane = pixels + c * channel_stride;
          for (int64_t p = 0; p < run.count; ++p) f[p * kWeightColumns + c] = acc_t(plane[p * pixel_stride]);
        }
      }
      weight_run(g.data(), f.data(), run.count, padded, out.data());
    }
    acc_t* result = grad_weight_rows.data_ptr<acc_t>();
    const int64_t result_stride = grad_weight_rows.stride(0);
    for (int64_t q = 0; q < rows; ++q)
      for (int64_t c = 0; c < block; ++c) result[q * result_stride + c0 + c] = out[q * kWeightColumns + c];
  });
}

}  // namespace

// Score maps (B, H, W, Q) = features (as pixels x C) @ weight_rows.T (C x Q), in the
// accumulation dtype; float16/bfloat16 features are converted one tile at a time.
at::Tensor project_scores(const at::Tensor& feature, const at::Tensor& weight_rows) {
  const int64_t batch = feature.size(0), height = feature.size(2), width = feature.size(3);
  const int64_t channels = weight_rows.size(0);
  at::Tensor scores = at::empty({batch, height, width, channels}, weight_rows.options());
  const at::Tensor rows = scores.view({batch * height * width, channels});
  const std::vector<PixelRun> runs = pixel_runs(feature, kGemmPixels);
  const int64_t column_blocks = (channels + kGemmColumns - 1) / kGemmColumns;
  // With channel planes far apart (NCHW) and few score channels next to the feature channels,
  // weight_rows @ features (Q x pixels) is the product MKL runs fastest (1.8x on the sds layers:
  // it does not repack the features), transposed into the map afterwards. The transposition
  // costs pixels x Q, the repacking pixels x C: with Q above C / 4 (one tile of 256 pixels, one
  // thread: 0.75-0.87x at C = 128-256, Q = 128-512) and with channels contiguous
  // (channels_last), features @ weight_rows.T.
  const bool planar = feature.stride(1) > (feature.size(3) == 1 ? feature.stride(2) : feature.stride(3));
  run_items(static_cast<int64_t>(runs.size()) * column_blocks, [&](int64_t item) {
    const PixelRun& run = runs[item / column_blocks];
    const int64_t q0 = (item % column_blocks) * kGemmColumns;
    const int64_t q1 = std::min(q0 + kGemmColumns, channels);
    at::Tensor out = run_rows(rows, feature, run).narrow(1, q0, q1 - q0);
    const at::Tensor pixels = as_dtype(run_matrix(feature, run, 0, feature.size(1)), scores.scalar_type());
    const at::Tensor columns = weight_rows.narrow(0, q0, q1 - q0);
    if (planar && 4 * (q1 - q0) <= feature.size(1)) {
      out.copy_(at::mm(columns, pixels.t()).t());
    } else {
      at::mm_out(out, pixels, columns.t());
    }
  });
  return scores;
}

// grad_features (B, C, H, W) = grad_scores (as pixels x Q) @ weight_rows (Q x C).
void project_grad_features(const at::Tensor& grad_scores, const at::Tensor& weight_rows,
                           const at::Tensor& grad_feature) {
  const int64_t batch = grad_feature.size(0), height = grad_feature.size(2);
  const int64_t width = grad_feature.size(3), channels = grad_feature.size(1);
  const at::Tensor rows = grad_scores.view({batch * height * width, weight_rows.size(0)});
  const std::vector<PixelRun> runs = pixel_runs(grad_feature, kGemmPixels);
  const int64_t column_blocks = std::max<int64_t>((channels + kGemmColumns - 1) / kGemmColumns, 1);
  run_items(static_cast<int64_t>(runs.size()) * column_blocks, [&](int64_t item) {
    const PixelRun& run = runs[item / column_blocks];
    const int64_t c0 = (item % column_blocks) * kGemmColumns;
    const int64_t c1 = std::min(c0 + kGemmColumns, channels);
    at::Tensor out = run_matrix(grad_feature, run, c0, c1);
    const at::Tensor a = run_rows(rows, grad_feature, run);
    const at::Tensor b = weight_rows.narrow(1, c0, c1 - c0);
    if (out.scalar_type() == rows.scalar_type()) {
      at::mm_out(out, a, b);
    } else {
      out.copy_(at::mm(a, b));
    }
  });
}

// grad_weight_rows (Q, C) = grad_scores.T (Q x pixels) @ features (pixels x C), summed over
// fixed runs of pixels in order by the package's own product (weight_grad_blocks): a library
// GEMM splits its reduction by the threads it finds (MKL's sgemm gives other last bits inside a
// parallel region than outside), and the reduction here is over every pixel of the map.
void project_grad_weights(const at::Tensor& grad_scores, const at::Tensor& feature,
                          const at::Tensor& grad_weight_rows) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feature.scalar_type(), "project_grad_weights", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    weight_grad_blocks<scalar_t, acc_t>(grad_scores.contiguous(), feature, grad_weight_rows);
  });
}

}  // namespace cpu
}  // namespace hypercolumn_ops
