// The points a CPU kernel samples: a list of points, or the grids of a list of boxes, and where
// each point's values go in an output (or come from in its gradient).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "hypercolumn_math.h"

namespace hypercolumn_ops {
namespace cpu {

// float32 sums for float16/bfloat16/float32 features, float64 for float64
// (accumulation_dtype in checks.h names the same dtype at run time).
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

template <typename T>
constexpr T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

// A point as the kernels classify it: its batch value, its coordinates (points only: a box grid's
// taps come from its box, BoxTaps), whether those are finite, and its relative place in the object
// box.
template <typename acc_t>
struct ImagePoint {
  acc_t batch_value, x, y;  // image pixels
  acc_t u, v;               // relative place in the object box
  bool finite;              // points: x and y finite; box grids: the box's extents finite
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
  // Whether every point's taps are one group of four (PointTapper::single).
  bool one_group() const { return true; }

  ImagePoint<acc_t> operator()(int64_t p) const {
    const acc_t* row = points + 3 * p;
    ImagePoint<acc_t> point{row[0], row[1], row[2], acc_t(0.5), acc_t(0.5), is_finite(row[1]) && is_finite(row[2])};
    if (locations != nullptr) {
      point.u = locations[2 * p];
      point.v = locations[2 * p + 1];
    }
    return point;
  }
};

// How a box operator samples its grid cells (csrc/ops.cpp): padding, sampling_ratio, aligned.
struct BoxSampling {
  int64_t padding, sampling_ratio;
  bool aligned;

  // One bilinear sample per cell, at its grid point (the defaults): two taps per grid line.
  bool single() const { return sampling_ratio == 1 && aligned; }
};

// The (oh, ow) grid of every box (R, 5) rows (batch_index, x1, y1, x2, y2): point p is box
// p / (oh * ow), grid row and column in row-major order.
template <typename acc_t>
struct BoxGrid {
  const acc_t* boxes;
  int64_t count, output_height, output_width;
  BoxSampling sampling;

  int64_t size() const { return count * output_height * output_width; }
  int64_t rows() const { return count; }
  int64_t points_per_row() const { return output_height * output_width; }
  bool one_group() const { return sampling.single(); }

  // Whether box r's extents are finite (its batch index aside).
  bool extents_finite(int64_t r) const {
    const acc_t* box = boxes + 5 * r;
    return box_extents_finite<acc_t>(box[1], box[2], box[3], box[4]);
  }

  ImagePoint<acc_t> operator()(int64_t p) const {
    const int64_t cells = output_height * output_width;
    const int64_t r = p / cells;
    const int64_t i = (p - r * cells) / output_width;
    const int64_t j = p - r * cells - i * output_width;
    ImagePoint<acc_t> point{boxes[5 * r], acc_t(0), acc_t(0), acc_t(0), acc_t(0), extents_finite(r)};
    cell_place<acc_t>(i, j, output_height, output_width, &point.u, &point.v);
    return point;
  }

  // A box grid is separable: grid column j has one u, grid row i one v (the same for every box).
  void places(std::vector<acc_t>* us, std::vector<acc_t>* vs) const {
    us->resize(output_width);
    vs->resize(output_height);
    acc_t other;
    for (int64_t j = 0; j < output_width; ++j) cell_place<acc_t>(0, j, output_height, output_width, &(*us)[j], &other);
    for (int64_t i = 0; i < output_height; ++i) cell_place<acc_t>(i, 0, output_height, output_width, &other, &(*vs)[i]);
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

}  // namespace cpu
}  // namespace hypercolumn_ops
