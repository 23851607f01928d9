// CPU-only helpers shared by the sampling and fused kernels: argument checks, the points of a
// call (a point list or box grids), bilinear taps with a map's strides, channel gathers and
// the channel-block accumulators the backward passes scatter into.
//
// Determinism: every backward writes each gradient element from one work item, which visits
// the points in their order; which thread runs an item never changes a result.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "hypercolumn_math.h"

namespace hypercolumn_ops {
namespace cpu {

// float32 sums for float16/bfloat16/float32 features, float64 for float64.
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

inline at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
constexpr T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

// Points handed to one thread at a time when the work is per point.
constexpr int64_t kPointBlock = 256;
// Elements of a per-item float accumulator (512 KiB of float32): half an L2 of this machine's
// cores, so the scatter of a channel block stays in cache.
constexpr int64_t kAccumulatorElements = int64_t(1) << 17;
// Bytes of channel planes a gather keeps in use at once (half an L2 again).
constexpr int64_t kGatherPlaneBytes = int64_t(1) << 19;

// ----------------------------------------------------------------------------- argument checks

inline void check_features(at::TensorList features) {
  TORCH_CHECK(!features.empty(), "features: expected at least one feature map, got an empty list");
  const at::Tensor& first = features[0];
  for (size_t i = 0; i < features.size(); ++i) {
    const at::Tensor& f = features[i];
    TORCH_CHECK(f.defined(), "features[", i, "]: expected a tensor, got an undefined one");
    TORCH_CHECK(f.dim() == 4, "features[", i, "]: expected a 4-D tensor (B, C, H, W), got shape ",
                f.sizes());
    TORCH_CHECK(f.device().is_cpu(), "features[", i, "]: expected a CPU tensor, got ", f.device());
    const auto dtype = f.scalar_type();
    TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                    dtype == at::kDouble,
                "features[", i, "]: expected float16, bfloat16, float32 or float64, got ", dtype);
    TORCH_CHECK(dtype == first.scalar_type(), "features[", i, "]: dtype ", dtype,
                " differs from features[0]'s ", first.scalar_type());
    TORCH_CHECK(f.size(0) == first.size(0), "features[", i, "]: batch size ", f.size(0),
                " differs from features[0]'s ", first.size(0));
    TORCH_CHECK(f.size(2) >= 1 && f.size(3) >= 1, "features[", i,
                "]: expected a non-empty map, got shape ", f.sizes());
  }
}

// Coordinates (points, boxes, locations) as a contiguous tensor of the accumulation dtype.
inline at::Tensor check_coordinates(const char* name, const at::Tensor& value, int64_t columns,
                                    at::ScalarType features_dtype) {
  TORCH_CHECK(value.defined(), name, ": expected a tensor, got an undefined one");
  TORCH_CHECK(value.dim() == 2 && value.size(1) == columns, name, ": expected shape (rows, ",
              columns, "), got ", value.sizes());
  TORCH_CHECK(value.device().is_cpu(), name, ": expected a CPU tensor, got ", value.device());
  TORCH_CHECK(at::isFloatingType(value.scalar_type()), name, ": expected a floating dtype, got ",
              value.scalar_type());
  return value.to(accumulation_dtype(features_dtype)).contiguous();
}

inline void check_scales(at::ArrayRef<double> scale_y, at::ArrayRef<double> scale_x,
                         size_t layers) {
  TORCH_CHECK(scale_y.size() == layers && scale_x.size() == layers,
              "scale_y, scale_x: expected one scale per layer (", layers, "), got ", scale_y.size(),
              " and ", scale_x.size());
  for (size_t i = 0; i < layers; ++i) {
    TORCH_CHECK(std::isfinite(scale_y[i]) && scale_y[i] > 0 && std::isfinite(scale_x[i]) &&
                    scale_x[i] > 0,
                "scale_y, scale_x: expected positive finite scales, got (", scale_y[i], ", ",
                scale_x[i], ") for layer ", i);
  }
}

inline void check_padding(int64_t padding) {
  TORCH_CHECK(padding == kPaddingBorder || padding == kPaddingZeros,
              "padding: expected 0 (border) or 1 (zeros), got ", padding);
}

inline void check_output_size(int64_t output_height, int64_t output_width) {
  TORCH_CHECK(output_height >= 1 && output_width >= 1,
              "output_height, output_width: expected positive sizes, got (", output_height, ", ",
              output_width, ")");
}

// The gradient of an output: its shape and dtype, on the CPU (any strides).
inline void check_grad(const at::Tensor& grad, at::IntArrayRef sizes, at::ScalarType dtype) {
  TORCH_CHECK(grad.defined(), "grad: expected a tensor, got an undefined one");
  TORCH_CHECK(grad.sizes() == sizes, "grad: expected shape ", sizes, " (the output's), got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == dtype, "grad: expected dtype ", dtype, ", got ",
              grad.scalar_type());
  TORCH_CHECK(grad.device().is_cpu(), "grad: expected a CPU tensor, got ", grad.device());
}

inline int64_t total_channels(at::TensorList features) {
  int64_t channels = 0;
  for (const auto& f : features) channels += f.size(1);
  return channels;
}

// ----------------------------------------------------------------------------- the points

template <typename acc_t>
struct ImagePoint {
  acc_t batch_value, x, y;  // image pixels
  acc_t u, v;               // relative place in the object box
};

// Points (N, 3) rows (batch_index, x, y) and their places (N, 2) rows (u, v), if any. Without
// places K must be 1, where any finite place gives the single cell weight 1.
template <typename acc_t>
struct PointList {
  const acc_t* points;
  const acc_t* locations;  // may be null
  int64_t count;

  int64_t size() const { return count; }
  int64_t rows() const { return count; }
  int64_t points_per_row() const { return 1; }

  ImagePoint<acc_t> operator()(int64_t p) const {
    const acc_t* row = points + 3 * p;
    ImagePoint<acc_t> point{row[0], row[1], row[2], acc_t(0.5), acc_t(0.5)};
    if (locations != nullptr) {
      point.u = locations[2 * p];
      point.v = locations[2 * p + 1];
    }
    return point;
  }
};

// The (oh, ow) grid of every box (R, 5) rows (batch_index, x1, y1, x2, y2): point p is box
// p / (oh * ow), grid row and column in row-major order.
template <typename acc_t>
struct BoxGrid {
  const acc_t* boxes;
  int64_t count, output_height, output_width;

  int64_t size() const { return count * output_height * output_width; }
  int64_t rows() const { return count; }
  int64_t points_per_row() const { return output_height * output_width; }

  ImagePoint<acc_t> operator()(int64_t p) const {
    const int64_t cells = output_height * output_width;
    const int64_t r = p / cells;
    const int64_t i = (p - r * cells) / output_width;
    const int64_t j = p - r * cells - i * output_width;
    const acc_t* box = boxes + 5 * r;
    ImagePoint<acc_t> point;
    point.batch_value = box[0];
    box_grid_point<acc_t>(box[1], box[2], box[3], box[4], i, j, output_height, output_width,
                          &point.x, &point.y, &point.u, &point.v);
    return point;
  }

  // A box grid is separable: grid column j has one x and one u, grid row i one y and one v.
  // Box r's xs[j], us[j] (ow each) and ys[i], vs[i] (oh each), as operator() computes them.
  void axes(int64_t r, std::vector<acc_t>* xs, std::vector<acc_t>* ys, std::vector<acc_t>* us,
            std::vector<acc_t>* vs) const {
    const acc_t* box = boxes + 5 * r;
    xs->resize(output_width);
    us->resize(output_width);
    ys->resize(output_height);
    vs->resize(output_height);
    acc_t x, y, u, v;
    for (int64_t j = 0; j < output_width; ++j) {
      box_grid_point<acc_t>(box[1], box[2], box[3], box[4], 0, j, output_height, output_width,
                            &x, &y, &(*us)[j], &v);
      (*xs)[j] = x;
    }
    for (int64_t i = 0; i < output_height; ++i) {
      box_grid_point<acc_t>(box[1], box[2], box[3], box[4], i, 0, output_height, output_width,
                            &x, &(*ys)[i], &u, &(*vs)[i]);
    }
  }
};

// Where point p's values live in a tensor laid out (rows, channels, oh, ow) or (rows, channels):
// row r = p / (oh * ow), grid cell (i, j); channel c adds c * channel_stride.
struct PointLayout {
  int64_t output_height, output_width;
  int64_t row_stride, i_stride, j_stride, channel_stride;

  int64_t offset(int64_t p) const {
    const int64_t cells = output_height * output_width;
    const int64_t r = p / cells;
    const int64_t i = (p - r * cells) / output_width;
    const int64_t j = p - r * cells - i * output_width;
    return r * row_stride + i * i_stride + j * j_stride;
  }
};

// (N, channels) with the given strides.
inline PointLayout row_layout(int64_t row_stride, int64_t channel_stride) {
  return PointLayout{1, 1, row_stride, 0, 0, channel_stride};
}

// (R, channels, oh, ow) with the strides of `t`.
inline PointLayout grid_layout(const at::Tensor& t) {
  return PointLayout{t.size(2), t.size(3), t.stride(0), t.stride(2), t.stride(3), t.stride(1)};
}

// ----------------------------------------------------------------------------- bilinear taps

template <typename scalar_t>
struct FeatureMap {
  const scalar_t* data;
  int64_t batch, channels, height, width;
  int64_t stride_b, stride_c, stride_h, stride_w;
  double scale_y, scale_x;
};

template <typename scalar_t>
FeatureMap<scalar_t> feature_map(const at::Tensor& f, double scale_y, double scale_x) {
  return FeatureMap<scalar_t>{f.const_data_ptr<scalar_t>(), f.size(0), f.size(1), f.size(2),
                              f.size(3), f.stride(0), f.stride(1), f.stride(2), f.stride(3),
                              scale_y, scale_x};
}

// The four corners of a bilinear sample as element offsets into some (B, H, W) indexed buffer
// (channel 0), and their weights.
template <typename acc_t>
struct SampleTaps {
  int64_t offset[4];
  acc_t weight[4];
};

// A point samples a map only if its batch index is valid and its coordinates finite; the
// others get NaN outputs and no gradient.
template <typename acc_t>
bool sample_batch(const ImagePoint<acc_t>& point, int64_t batch, int64_t* b) {
  return batch_index<acc_t>(point.batch_value, batch, b) && std::isfinite(point.x) &&
         std::isfinite(point.y);
}

// Taps of point (x, y) in batch item b of a (height, width) map, as offsets with strides
// (stride_b, stride_h, stride_w).
template <typename acc_t, typename scalar_t>
SampleTaps<acc_t> sample_taps(const FeatureMap<scalar_t>& map, acc_t x, acc_t y, int64_t padding,
                              int64_t b, int64_t stride_b, int64_t stride_h, int64_t stride_w) {
  const BilinearTaps<acc_t> t =
      bilinear_taps<acc_t>(x, y, acc_t(map.scale_y), acc_t(map.scale_x), map.height, map.width,
                           padding);
  const int64_t base = b * stride_b;
  return SampleTaps<acc_t>{{base + t.y0 * stride_h + t.x0 * stride_w,
                            base + t.y0 * stride_h + t.x1 * stride_w,
                            base + t.y1 * stride_h + t.x0 * stride_w,
                            base + t.y1 * stride_h + t.x1 * stride_w},
                           {t.w00, t.w01, t.w10, t.w11}};
}

// One axis of a box grid on one map: per grid column (or row) its two map indices and their
// weights with the padding folded in, so that bilinear_taps's four weights are the products of
// the two axes' weights.
template <typename acc_t>
struct BoxAxis {
  std::vector<int64_t> index0, index1;
  std::vector<acc_t> weight0, weight1;

  // Image coordinates `coord` (pixels) on a map axis of `size` with `scale`.
  void set(const std::vector<acc_t>& coord, double scale, int64_t size, int64_t padding) {
    const size_t count = coord.size();
    index0.resize(count);
    index1.resize(count);
    weight0.resize(count);
    weight1.resize(count);
    for (size_t k = 0; k < count; ++k) {
      acc_t frac;
      const bool inside =
          feature_axis<acc_t>(coord[k], acc_t(scale), size, padding, &index0[k], &index1[k], &frac);
      const acc_t keep = inside ? acc_t(1) : acc_t(0);
      weight0[k] = keep * (acc_t(1) - frac);
      weight1[k] = keep * frac;
    }
  }
};

// The distinct map indices a box grid's axis reads (`indices`, in [0, size)) and, per grid row
// (or column), where its two map indices are in that list.
template <typename acc_t>
void distinct_indices(const BoxAxis<acc_t>& axis, int64_t size, std::vector<int64_t>* indices,
                      std::vector<int64_t>* slot0, std::vector<int64_t>* slot1) {
  std::vector<int64_t> slot_of_index(size, -1);
  const size_t count = axis.index0.size();
  indices->clear();
  slot0->resize(count);
  slot1->resize(count);
  auto slot = [&](int64_t index) {
    if (slot_of_index[index] < 0) {
      slot_of_index[index] = static_cast<int64_t>(indices->size());
      indices->push_back(index);
    }
    return slot_of_index[index];
  };
  for (size_t k = 0; k < count; ++k) {
    (*slot0)[k] = slot(axis.index0[k]);
    (*slot1)[k] = slot(axis.index1[k]);
  }
}

// Taps of a point that samples nothing: offset 0 (in range of any non-empty map) and NaN weights,
// so branch-free gathers give NaN.
template <typename acc_t>
SampleTaps<acc_t> invalid_taps() {
  const acc_t nan = quiet_nan<acc_t>();
  return SampleTaps<acc_t>{{0, 0, 0, 0}, {nan, nan, nan, nan}};
}

// Bilinear samples of channels [c0, c1) of `map` at `count` points:
// dst[dst_offset[i] + (c - c0) * dst_stride] for point i. Channels are the inner loop, as
// contiguous runs where the map is channels_last; where channels are far apart (NCHW) they go
// in chunks whose planes fit in cache while every point of the block reads them, so each point
// loads its taps once per chunk and writes a run of its channels.
template <typename scalar_t, typename acc_t, typename out_t>
void gather_channels(const FeatureMap<scalar_t>& map, const SampleTaps<acc_t>* taps,
                     const int64_t* dst_offset, int64_t count, int64_t c0, int64_t c1, out_t* dst,
                     int64_t dst_stride) {
  const int64_t channels = c1 - c0;
  if (map.batch == 0) {  // an empty map has no valid point and nothing to read
    for (int64_t i = 0; i < count; ++i)
      for (int64_t c = 0; c < channels; ++c) dst[dst_offset[i] + c * dst_stride] = out_t(quiet_nan<acc_t>());
    return;
  }
  const int64_t sc = map.stride_c;
  const scalar_t* data = map.data + c0 * sc;
  if (sc == 1 && dst_stride == 1) {
    for (int64_t i = 0; i < count; ++i) {
      const SampleTaps<acc_t>& t = taps[i];
      const scalar_t* f0 = data + t.offset[0];
      const scalar_t* f1 = data + t.offset[1];
      const scalar_t* f2 = data + t.offset[2];
      const scalar_t* f3 = data + t.offset[3];
      out_t* out = dst + dst_offset[i];
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        out[c] = out_t(t.weight[0] * acc_t(f0[c]) + t.weight[1] * acc_t(f1[c]) +
                       t.weight[2] * acc_t(f2[c]) + t.weight[3] * acc_t(f3[c]));
      }
    }
    return;
  }
  const int64_t plane_bytes = std::max<int64_t>(sc, 1) * int64_t(sizeof(scalar_t));
  const int64_t chunk = sc < std::max(map.stride_w, map.stride_h)
                            ? std::max<int64_t>(channels, 1)
                            : std::min<int64_t>(std::max<int64_t>(kGatherPlaneBytes / plane_bytes, 1), 64);
  for (int64_t k0 = 0; k0 < channels; k0 += chunk) {
    const int64_t k1 = std::min(k0 + chunk, channels);
    for (int64_t i = 0; i < count; ++i) {
      const SampleTaps<acc_t>& t = taps[i];
      const acc_t w0 = t.weight[0], w1 = t.weight[1], w2 = t.weight[2], w3 = t.weight[3];
      const int64_t o0 = t.offset[0], o1 = t.offset[1], o2 = t.offset[2], o3 = t.offset[3];
      out_t* out = dst + dst_offset[i];
      for (int64_t c = k0; c < k1; ++c) {
        const scalar_t* f = data + c * sc;
        out[c * dst_stride] = out_t(w0 * acc_t(f[o0]) + w1 * acc_t(f[o1]) + w2 * acc_t(f[o2]) +
                                    w3 * acc_t(f[o3]));
      }
    }
  }
}

// ----------------------------------------------------------------------------- work items

// Runs fn(item) for item in [0, count) on at::parallel_for's threads, handing items out as
// threads free up (items may differ in cost). Items must write disjoint outputs. Worker
// threads do not inherit the caller's dispatch state, so ATen calls inside an item (GEMM tiles)
// are explicitly kept below autograd, as the kernel itself is.
template <typename Fn>
void run_items(int64_t count, const Fn& fn) {
  if (count <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t item = next++; item < count; item = next++) fn(item);
  });
}

// A block of channels [c0, c1) of one layer: the unit of work of a backward scatter.
struct ChannelBlock {
  int64_t layer, c0, c1;
};

// Channel blocks of every layer, each small enough that a float accumulator of the block over
// the whole map (B * H * W * channels) fits kAccumulatorElements.
inline std::vector<ChannelBlock> channel_blocks(at::TensorList features,
                                                const std::vector<int64_t>& layers) {
  std::vector<ChannelBlock> blocks;
  for (int64_t l : layers) {
    const at::Tensor& f = features[l];
    const int64_t pixels = std::max<int64_t>(f.size(0) * f.size(2) * f.size(3), 1);
    const int64_t width = std::max<int64_t>(kAccumulatorElements / pixels, 1);
    for (int64_t c0 = 0; c0 < f.size(1); c0 += width)
      blocks.push_back(ChannelBlock{l, c0, std::min(c0 + width, f.size(1))});
  }
  return blocks;
}

// Writes a (B, H, W, c1 - c0) accumulator into channels [c0, c1) of `grad` (B, C, H, W, any
// strides).
template <typename scalar_t, typename acc_t>
void write_channel_block(const std::vector<acc_t>& block, const at::Tensor& grad, int64_t c0,
                         int64_t c1) {
  scalar_t* out = grad.data_ptr<scalar_t>();
  const int64_t batch = grad.size(0), height = grad.size(2), width = grad.size(3);
  const int64_t channels = c1 - c0;
  const int64_t sb = grad.stride(0), sc = grad.stride(1), sh = grad.stride(2), sw = grad.stride(3);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t y = 0; y < height; ++y) {
      for (int64_t x = 0; x < width; ++x) {
        const acc_t* from = block.data() + ((b * height + y) * width + x) * channels;
        scalar_t* to = out + b * sb + c0 * sc + y * sh + x * sw;
        for (int64_t c = 0; c < channels; ++c) to[c * sc] = scalar_t(from[c]);
      }
    }
  }
}

}  // namespace cpu
}  // namespace hypercolumn_ops
