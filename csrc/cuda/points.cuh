// How the CUDA kernels see their inputs, on the device: a feature map with its strides, the points
// of a call (sparse rows or box grids), a point's bilinear taps, and the gather and atomic scatter
// of one channel. The coordinate and weight formulas themselves live in ../hypercolumn_math.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/Atomic.cuh>

#include <cstdint>
#include <type_traits>

#include "hypercolumn_math.h"
#include "launch.h"

namespace hypercolumn_ops {
namespace cuda {

// A (B, C, H, W) map as a kernel reads it: element (b, c, y, x) sits at
// data[b * stride_b + c * stride_c + y * stride_y + x * stride_x], any strides.
template <typename ptr_t>
struct MapView {
  ptr_t data;
  int64_t channels, height, width;
  int64_t stride_b, stride_c, stride_y, stride_x;
};

template <typename scalar_t>
MapView<scalar_t*> map_view(const at::Tensor& t) {
  return {t.data_ptr<scalar_t>(), t.size(1), t.size(2), t.size(3),
          t.stride(0),            t.stride(1), t.stride(2), t.stride(3)};
}

template <typename scalar_t>
MapView<const scalar_t*> const_map_view(const at::Tensor& t) {
  return {t.data_ptr<scalar_t>(), t.size(1), t.size(2), t.size(3),
          t.stride(0),            t.stride(1), t.stride(2), t.stride(3)};
}

// Strides of an output or output gradient (rows, columns) or (rows, columns, oh, ow): element
// (row, column, i, j) sits at row * row + column * column + i * i + j * j (i = j = 0 for points).
struct OutputStrides {
  int64_t row, column, i, j;
};

inline OutputStrides output_strides(const at::Tensor& t) {
  if (t.dim() == 2) return {t.stride(0), t.stride(1), 0, 0};
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// The points of a call: rows (batch_index, x, y) of a sparse call, or the oh x ow grid of every
// box row (batch_index, x1, y1, x2, y2), box-major then row-major. Point p of a box call is grid
// place (i, j) of box row p / (oh * ow), which averages ny x nx samples (docs/semantics.md, "Box
// grids"): one at its grid point with the defaults (sampling_ratio 1, aligned).
template <typename acc_t>
struct PointSource {
  const acc_t* rows;       // (N, 3) or (R, 5), contiguous
  const acc_t* locations;  // (N, 2) rows (u, v), or null: then u = v = 0.5, the only cell when K = 1
  const int64_t* labels;   // one per row, or null (class 0)
  int64_t grid_h, grid_w;  // box grid; 0 for sparse points
  int64_t batch, classes;
  int64_t sampling_ratio;  // box grids: roi_align's sampling_ratio and aligned
  bool aligned;

  // Whether a box grid's cells take other samples than the one at their grid point: then each
  // kernel loops over them (for_each_sample), launch-uniformly.
  __host__ __device__ __forceinline__ bool sampled() const {
    return grid_h > 0 && !(sampling_ratio == 1 && aligned);
  }
};

template <typename acc_t>
struct Point {
  int64_t row, i, j;  // output row (point or box) and grid place (0, 0 for sparse points)
  int64_t b, label;   // 0 where the point is not valid
  // The point in image pixels: a sparse point, or the grid point of a box grid's cell of one
  // sample. A sampled cell's box instead: corners (x, y) and (x2, y2).
  acc_t x, y;
  acc_t x2, y2;
  acc_t u, v;
  bool valid;  // batch index and label in range, coordinates (a box's extents) finite: otherwise NaN, no read
};

// Whether row `row` (a point or a box) may be read: its batch index (`batch_value`) names an image,
// and its label, where there are labels, a class. Sets the image *b and the label *label (0 where
// not valid).
template <typename acc_t>
__device__ __forceinline__ bool row_valid(const PointSource<acc_t>& src, int64_t row, acc_t batch_value, int64_t* b,
                                          int64_t* label) {
  *b = 0;
  bool valid = batch_index<acc_t>(batch_value, src.batch, b);
  *label = 0;
  if (src.labels != nullptr) {
    const int64_t value = src.labels[row];
    if (value >= 0 && value < src.classes) {
      *label = value;
    } else {
      valid = false;
    }
  }
  return valid;
}

template <typename acc_t>
__device__ __forceinline__ Point<acc_t> point_at(const PointSource<acc_t>& src, int64_t p) {
  Point<acc_t> pt;
  acc_t batch_value;
  bool finite;
  if (src.grid_h == 0) {
    pt.row = p;
    pt.i = 0;
    pt.j = 0;
    const acc_t* r = src.rows + 3 * p;
    batch_value = r[0];
    pt.x = r[1];
    pt.y = r[2];
    pt.x2 = pt.x;
    pt.y2 = pt.y;
    pt.u = src.locations != nullptr ? src.locations[2 * p] : acc_t(0.5);
    pt.v = src.locations != nullptr ? src.locations[2 * p + 1] : acc_t(0.5);
    finite = is_finite(pt.x) && is_finite(pt.y) && is_finite(pt.u) && is_finite(pt.v);
  } else {
    const int64_t cells = src.grid_h * src.grid_w;
    pt.row = p / cells;
    const int64_t s = p - pt.row * cells;
    pt.i = s / src.grid_w;
    pt.j = s - pt.i * src.grid_w;
    const acc_t* r = src.rows + 5 * pt.row;
    batch_value = r[0];
    finite = box_extents_finite<acc_t>(r[1], r[2], r[3], r[4]);
    // A box whose extents are not finite is not valid: its coordinates are those of an empty box
    // at 0, so that no loop bound comes from them.
    const acc_t x1 = finite ? r[1] : acc_t(0), y1 = finite ? r[2] : acc_t(0);
    const acc_t x2 = finite ? r[3] : acc_t(0), y2 = finite ? r[4] : acc_t(0);
    if (src.sampled()) {
      pt.x = x1;
      pt.y = y1;
      pt.x2 = x2;
      pt.y2 = y2;
    } else {
      pt.x = box_coordinate<acc_t>(x1, x2, acc_t(pt.j) + acc_t(0.5), src.grid_w);
      pt.y = box_coordinate<acc_t>(y1, y2, acc_t(pt.i) + acc_t(0.5), src.grid_h);
      pt.x2 = pt.x;
      pt.y2 = pt.y;
    }
    cell_place<acc_t>(pt.i, pt.j, src.grid_h, src.grid_w, &pt.u, &pt.v);
  }
  const bool valid = row_valid(src, pt.row, batch_value, &pt.b, &pt.label) && finite;
  if (!valid) pt.b = 0;
  pt.valid = valid;
  return pt;
}

template <typename acc_t>
__device__ __forceinline__ int64_t output_offset(const OutputStrides& s, const Point<acc_t>& pt) {
  return pt.row * s.row + pt.i * s.i + pt.j * s.j;
}

// A point's taps on one layer, computed once per block and shared by its channel threads: its
// bilinear taps, or, where its box grid's cells average several samples, the cell's two axes,
// whose samples for_each_sample visits (a sample's taps are recomputed where used).
//
// Whether a launch's cells take several samples (PointSource::sampled) is a template parameter,
// kSampled, of every kernel that reads taps: compiled in, the sample loops would take registers on
// the default path too, which never runs them (fused_scores_kernel: 32 registers -> 80, with
// spills).

// What a sampled cell's taps add: its axes and how their samples read the map. Empty otherwise, so
// that the default path's taps (in shared memory, one per point of a tile) stay four taps.
template <typename acc_t, bool kSampled>
struct CellSamples {
  CellAxis<acc_t> along_y, along_x;
  int64_t padding;
  bool aligned;
};

template <typename acc_t>
struct CellSamples<acc_t, false> {};

template <typename acc_t, bool kSampled>
struct PointTaps : CellSamples<acc_t, kSampled> {
  BilinearTaps<acc_t> taps;  // the one sample (!kSampled)
  int64_t b;
  bool valid;
};

// Point pt of src on a (height, width) map with scales (scale_y, scale_x).
template <bool kSampled, typename acc_t>
__device__ __forceinline__ PointTaps<acc_t, kSampled> point_taps(const PointSource<acc_t>& src, const Point<acc_t>& pt,
                                                                 int64_t height, int64_t width, acc_t scale_y,
                                                                 acc_t scale_x, int64_t padding) {
  PointTaps<acc_t, kSampled> t;
  t.b = pt.b;
  t.valid = pt.valid;
  if constexpr (kSampled) {
    t.along_y = cell_axis<acc_t>(pt.y, pt.y2, scale_y, pt.i, src.grid_h, src.sampling_ratio, src.aligned);
    t.along_x = cell_axis<acc_t>(pt.x, pt.x2, scale_x, pt.j, src.grid_w, src.sampling_ratio, src.aligned);
    t.padding = padding;
    t.aligned = src.aligned;
  } else {
    // A point, or a grid point (whose coordinate may be infinite where (j + 0.5) * (x2 - x1)
    // overflows: it clamps; a sparse point's is finite, or the point is not valid).
    int64_t y0, y1, x0, x1;
    acc_t wy0, wy1, wx0, wx1;
    axis_taps<acc_t>(pt.y * scale_y - acc_t(0.5), height, padding, &y0, &y1, &wy0, &wy1);
    axis_taps<acc_t>(pt.x * scale_x - acc_t(0.5), width, padding, &x0, &x1, &wx0, &wx1);
    t.taps = combine_taps<acc_t>(y0, y1, wy0, wy1, x0, x1, wx0, wx1);
  }
  return t;
}

// Calls fn(taps) with the taps of each sample of a sampled cell on a (height, width) map, the
// cell's share folded into their weights.
template <typename acc_t, typename Fn>
__device__ __forceinline__ void for_each_sample(const PointTaps<acc_t, true>& t, int64_t height, int64_t width,
                                                Fn fn) {
  for (int64_t sy = 0; sy < t.along_y.count; ++sy) {
    int64_t y0, y1;
    acc_t wy0, wy1;
    cell_sample_taps<acc_t>(t.along_y, sy, height, t.padding, t.aligned, &y0, &y1, &wy0, &wy1);
    for (int64_t sx = 0; sx < t.along_x.count; ++sx) {
      int64_t x0, x1;
      acc_t wx0, wx1;
      cell_sample_taps<acc_t>(t.along_x, sx, width, t.padding, t.aligned, &x0, &x1, &wx0, &wx1);
      fn(combine_taps<acc_t>(y0, y1, wy0, wy1, x0, x1, wx0, wx1));
    }
  }
}

// The weight with which a point's sample reaches pixel (y, x) of a (height, width) map: the sum
// of its taps there (of a sampled cell: the product of its axes' sums).
template <bool kSampled, typename acc_t>
__device__ __forceinline__ acc_t tap_weight(const PointTaps<acc_t, kSampled>& t, int64_t y, int64_t x, int64_t height,
                                            int64_t width) {
  if constexpr (kSampled) {
    const auto axis_sum = [&](const CellAxis<acc_t>& axis, int64_t index, int64_t size) {
      acc_t w = 0;
      for (int64_t s = 0; s < axis.count; ++s) {
        int64_t lo, hi;
        acc_t w_lo, w_hi;
        cell_sample_taps<acc_t>(axis, s, size, t.padding, t.aligned, &lo, &hi, &w_lo, &w_hi);
        if (lo == index) w += w_lo;
        if (hi == index) w += w_hi;
      }
      return w;
    };
    return axis_sum(t.along_y, y, height) * axis_sum(t.along_x, x, width);
  } else {
    const BilinearTaps<acc_t>& q = t.taps;
    acc_t w = 0;
    if (q.y0 == y && q.x0 == x) w += q.w00;
    if (q.y0 == y && q.x1 == x) w += q.w01;
    if (q.y1 == y && q.x0 == x) w += q.w10;
    if (q.y1 == y && q.x1 == x) w += q.w11;
    return w;
  }
}

// One sample's four taps of channel c (at `base`) blended.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t blend(const scalar_t* base, const MapView<const scalar_t*>& map,
                                       const BilinearTaps<acc_t>& q) {
  return q.w00 * static_cast<acc_t>(base[q.y0 * map.stride_y + q.x0 * map.stride_x]) +
         q.w01 * static_cast<acc_t>(base[q.y0 * map.stride_y + q.x1 * map.stride_x]) +
         q.w10 * static_cast<acc_t>(base[q.y1 * map.stride_y + q.x0 * map.stride_x]) +
         q.w11 * static_cast<acc_t>(base[q.y1 * map.stride_y + q.x1 * map.stride_x]);
}

// The bilinear sample of channel c (its four taps blended; a sampled cell's samples summed).
template <bool kSampled, typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t gather(const MapView<const scalar_t*>& map, const PointTaps<acc_t, kSampled>& t,
                                        int64_t c) {
  const scalar_t* base = map.data + t.b * map.stride_b + c * map.stride_c;
  if constexpr (kSampled) {
    acc_t sum = 0;
    for_each_sample(t, map.height, map.width, [&](const BilinearTaps<acc_t>& q) { sum += blend(base, map, q); });
    return sum;
  } else {
    return blend(base, map, t.taps);
  }
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// The four taps of channels c .. c + VEC - 1, one load per tap: VEC > 1 needs unit channel stride
// and aligned addresses (the caller checked wide_loads_allowed). Loading is kept apart from
// blending (blend_taps) so that a thread can issue the loads of several points first.
template <int VEC, typename acc_t, typename scalar_t>
__device__ __forceinline__ void load_taps(const MapView<const scalar_t*>& map, const PointTaps<acc_t, false>& t, int64_t c,
                                          Pack<scalar_t, VEC> (&out)[4]) {
  const scalar_t* base = map.data + t.b * map.stride_b + c * map.stride_c;
  const BilinearTaps<acc_t>& q = t.taps;
  out[0] = *reinterpret_cast<const Pack<scalar_t, VEC>*>(base + q.y0 * map.stride_y + q.x0 * map.stride_x);
  out[1] = *reinterpret_cast<const Pack<scalar_t, VEC>*>(base + q.y0 * map.stride_y + q.x1 * map.stride_x);
  out[2] = *reinterpret_cast<const Pack<scalar_t, VEC>*>(base + q.y1 * map.stride_y + q.x0 * map.stride_x);
  out[3] = *reinterpret_cast<const Pack<scalar_t, VEC>*>(base + q.y1 * map.stride_y + q.x1 * map.stride_x);
}

template <int VEC, typename acc_t, typename scalar_t>
__device__ __forceinline__ void blend_taps(const PointTaps<acc_t, false>& t, const Pack<scalar_t, VEC> (&p)[4],
                                           acc_t (&out)[VEC]) {
  const BilinearTaps<acc_t>& q = t.taps;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    out[v] = q.w00 * static_cast<acc_t>(p[0].v[v]) + q.w01 * static_cast<acc_t>(p[1].v[v]) +
             q.w10 * static_cast<acc_t>(p[2].v[v]) + q.w11 * static_cast<acc_t>(p[3].v[v]);
  }
}

// Adds gradient g of channel c's sample onto one sample's four taps, with atomics.
template <typename acc_t>
__device__ __forceinline__ void scatter_taps(acc_t* base, const MapView<acc_t*>& grad, const BilinearTaps<acc_t>& q,
                                             acc_t g) {
  if (q.w00 != acc_t(0)) gpuAtomicAdd(base + q.y0 * grad.stride_y + q.x0 * grad.stride_x, q.w00 * g);
  if (q.w01 != acc_t(0)) gpuAtomicAdd(base + q.y0 * grad.stride_y + q.x1 * grad.stride_x, q.w01 * g);
  if (q.w10 != acc_t(0)) gpuAtomicAdd(base + q.y1 * grad.stride_y + q.x0 * grad.stride_x, q.w10 * g);
  if (q.w11 != acc_t(0)) gpuAtomicAdd(base + q.y1 * grad.stride_y + q.x1 * grad.stride_x, q.w11 * g);
}

// Spreads gradient g of channel c's sample back onto its taps (each sample's four), with atomics.
template <bool kSampled, typename acc_t>
__device__ __forceinline__ void scatter(const MapView<acc_t*>& grad, const PointTaps<acc_t, kSampled>& t, int64_t c,
                                        acc_t g) {
  acc_t* base = grad.data + t.b * grad.stride_b + c * grad.stride_c;
  if constexpr (kSampled) {
    for_each_sample(t, grad.height, grad.width,
                    [&](const BilinearTaps<acc_t>& q) { scatter_taps(base, grad, q, g); });
  } else {
    scatter_taps(base, grad, t.taps, g);
  }
}

// Calls fn(kSampled) with std::true_type where a launch's box grid cells take several samples
// (PointSource::sampled), else std::false_type: the kernels' kSampled.
template <typename Fn>
void with_sampling(bool sampled, const Fn& fn) {
  if (sampled) {
    fn(std::true_type());
  } else {
    fn(std::false_type());
  }
}

}  // namespace cuda
}  // namespace hypercolumn_ops
