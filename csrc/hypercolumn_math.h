// The coordinate and weight math of docs/semantics.md, written once for the C++ and CUDA
// kernels. hypercolumn_ops/reference.py and hypercolumn_ops/triton_backend/ follow the same names and
// steps.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HC_HOST_DEVICE inline
#endif

namespace hypercolumn_ops {

// The enum codes of the operators' integer arguments (csrc/ops.cpp), defined here only.
// padding: "border" clamps to the map; "zeros" gives 0 more than one pixel outside it (roi_align);
// "zeros per tap" (grid_sample's padding_mode="zeros") gives each bilinear tap outside the map 0.
constexpr int64_t kPaddingBorder = 0;
constexpr int64_t kPaddingZeros = 1;
constexpr int64_t kPaddingZerosPerTap = 2;
constexpr int64_t kActivationNone = 0;
constexpr int64_t kActivationSigmoid = 1;
constexpr int64_t kOrderSampleFeatures = 0;
constexpr int64_t kOrderProjectScores = 1;

// The most samples per axis of a box grid's output cell (reference.MAX_ADAPTIVE_SAMPLES): a larger
// sampling_ratio is refused (checks.h), and adaptive sampling takes at most this many.
constexpr int64_t kMaxSamples = 1024;

// NaN and +-inf fail, without relying on a fast-math isfinite.
template <typename acc_t>
HC_HOST_DEVICE bool is_finite(acc_t a) {
  return a == a && a - a == acc_t(0);
}

// The four taps of one bilinear sample along both axes of a (H, W) map: corner offsets
// y0, y1, x0, x1 are always in range, so a caller can read them without checks; weights are
// zero where the padding puts a tap outside, NaN where the coordinate is not finite.
template <typename acc_t>
struct BilinearTaps {
  int64_t y0, y1, x0, x1;
  acc_t w00, w01, w10, w11;  // w{dy}{dx}
};

// One axis of a bilinear sample at feature coordinate f (pixel i's centre at i) on an axis of
// `size` pixels: the lower and upper index (always in range) and their weights.
//   border:        f clamped to [0, size - 1];
//   zeros:         as border, but both weights 0 where f < -1 or f > size (roi_align);
//   zeros per tap: f not clamped; a tap outside [0, size - 1] weighs 0 (grid_sample's "zeros").
// f = +-inf (a finite coordinate times a large scale) clamps or falls outside like any far
// coordinate; NaN gives index 0 and NaN weights.
template <typename acc_t>
HC_HOST_DEVICE void axis_taps(acc_t f, int64_t size, int64_t padding, int64_t* lo, int64_t* hi, acc_t* w_lo,
                              acc_t* w_hi) {
  if (!(f == f)) {
    *lo = 0;
    *hi = 0;
    *w_lo = f;
    *w_hi = f;
    return;
  }
  if (padding == kPaddingZerosPerTap) {
    // Far coordinates clamp to just outside the map, where both taps are outside too; then the
    // integer conversion is exact, and truncation is floor once corrected below zero.
    if (f < acc_t(-2)) f = acc_t(-2);
    if (f > acc_t(size + 1)) f = acc_t(size + 1);
    int64_t below = static_cast<int64_t>(f);
    if (acc_t(below) > f) --below;
    const acc_t frac = f - acc_t(below);
    *w_lo = below >= 0 && below <= size - 1 ? acc_t(1) - frac : acc_t(0);
    *w_hi = below >= -1 && below <= size - 2 ? frac : acc_t(0);
    *lo = below < 0 ? 0 : (below > size - 1 ? size - 1 : below);
    *hi = below + 1 < 0 ? 0 : (below + 1 > size - 1 ? size - 1 : below + 1);
    return;
  }
  const acc_t keep = padding == kPaddingZeros && (f < acc_t(-1) || f > acc_t(size)) ? acc_t(0) : acc_t(1);
  if (f < acc_t(0)) f = acc_t(0);
  if (f > acc_t(size - 1)) f = acc_t(size - 1);
  int64_t i0 = static_cast<int64_t>(f);  // f >= 0, so truncation is floor
  if (i0 > size - 1) i0 = size - 1;
  const acc_t frac = f - acc_t(i0);
  *lo = i0;
  *hi = i0 + 1 < size ? i0 + 1 : size - 1;
  *w_lo = keep * (acc_t(1) - frac);
  *w_hi = keep * frac;
}

// One axis of a point: image coordinate -> axis_taps at feature coordinate coord * scale - 0.5.
// A coordinate that is not finite gives index 0 and NaN weights (its point samples nothing); a
// finite one whose feature coordinate overflows clamps like any far point.
template <typename acc_t>
HC_HOST_DEVICE void feature_axis(acc_t coord, acc_t scale, int64_t size, int64_t padding, int64_t* lo,
                                 int64_t* hi, acc_t* w_lo, acc_t* w_hi) {
  if (!is_finite(coord)) {
    *lo = 0;
    *hi = 0;
    *w_lo = coord - coord;  // NaN
    *w_hi = *w_lo;
    return;
  }
  axis_taps<acc_t>(coord * scale - acc_t(0.5), size, padding, lo, hi, w_lo, w_hi);
}

// The taps of both axes combined: the four weights are the products of the axes' weights.
template <typename acc_t>
HC_HOST_DEVICE BilinearTaps<acc_t> combine_taps(int64_t y0, int64_t y1, acc_t wy0, acc_t wy1, int64_t x0, int64_t x1,
                                                acc_t wx0, acc_t wx1) {
  return BilinearTaps<acc_t>{y0, y1, x0, x1, wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1};
}

// Bilinear taps of image point (x, y) on a (height, width) map with scales (sy, sx).
template <typename acc_t>
HC_HOST_DEVICE BilinearTaps<acc_t> bilinear_taps(acc_t x, acc_t y, acc_t sy, acc_t sx,
                                                 int64_t height, int64_t width, int64_t padding) {
  int64_t y0, y1, x0, x1;
  acc_t wy0, wy1, wx0, wx1;
  feature_axis<acc_t>(y, sy, height, padding, &y0, &y1, &wy0, &wy1);
  feature_axis<acc_t>(x, sx, width, padding, &x0, &x1, &wx0, &wx1);
  return combine_taps<acc_t>(y0, y1, wy0, wy1, x0, x1, wx0, wx1);
}

// ----------------------------------------------------------------------------- box grids
//
// Output cell (i, j) of a box's (oh, ow) grid averages ny x nx bilinear samples
// (torchvision.ops.roi_align's rule, docs/semantics.md "Box grids"); along each axis the samples
// depend on the box's side along that axis only, so a cell's taps are the products of its grid
// row's and its grid column's. With the defaults (sampling_ratio = 1, aligned) a cell is one
// sample at the grid point x1 + (j + 0.5) * (x2 - x1) / ow.

// Whether a box (x1, y1, x2, y2) is valid beyond its batch index: its extents x2 - x1 and y2 - y1
// are finite, which corners that are not finite fail too, and so do corners whose difference
// overflows (every grid point would be at infinity).
template <typename acc_t>
HC_HOST_DEVICE bool box_extents_finite(acc_t x1, acc_t y1, acc_t x2, acc_t y2) {
  return is_finite(x2 - x1) && is_finite(y2 - y1);
}

// Samples per output cell along one axis whose box side spans `extent` feature pixels over
// `cells` cells: sampling_ratio when positive; otherwise (adaptive) ceil(extent / cells), the
// extent at least one pixel without `aligned`, at most kMaxSamples, and 0 for an empty or
// reversed box, which then samples nothing (its cells are 0).
template <typename acc_t>
HC_HOST_DEVICE int64_t sample_count(acc_t extent, int64_t cells, int64_t sampling_ratio, bool aligned) {
  if (sampling_ratio > 0) return sampling_ratio;
  if (!aligned && extent < acc_t(1)) extent = acc_t(1);
  const acc_t per_cell = extent / acc_t(cells);
  if (!(per_cell > acc_t(0))) return 0;  // also NaN
  if (per_cell >= acc_t(kMaxSamples)) return kMaxSamples;  // also +inf: never converted
  int64_t count = static_cast<int64_t>(per_cell);
  if (acc_t(count) < per_cell) ++count;  // ceil
  return count;
}

// Image coordinate at `place` (in cells) along a box side [start, end] split into `cells` cells:
// start + place * (end - start) / cells. Grid point j is at place j + 0.5.
template <typename acc_t>
HC_HOST_DEVICE acc_t box_coordinate(acc_t start, acc_t end, acc_t place, int64_t cells) {
  return start + place * (end - start) / acc_t(cells);
}

// Feature coordinate of sample s of `count` of output cell `cell` along one axis of a box side
// [start, end] (image pixels) split into `cells` cells, on a map of scale `scale`: image coordinate
// box_coordinate at place cell + (s + 0.5) / count, times the scale, minus 0.5 where `aligned`
// (one sample: the grid point's feature coordinate). Without `aligned` a side under one feature
// pixel is one pixel long: start * scale + (cell + (s + 0.5) / count) / cells, as
// roi_align(aligned=False).
template <typename acc_t>
HC_HOST_DEVICE acc_t sample_coordinate(acc_t start, acc_t end, acc_t scale, int64_t cell, int64_t s, int64_t count,
                                       int64_t cells, bool aligned) {
  const acc_t place = acc_t(cell) + (acc_t(s) + acc_t(0.5)) / acc_t(count > 1 ? count : 1);
  if (aligned) return box_coordinate<acc_t>(start, end, place, cells) * scale - acc_t(0.5);
  if ((end - start) * scale < acc_t(1)) return start * scale + place / acc_t(cells);
  return box_coordinate<acc_t>(start, end, place, cells) * scale;
}

// One axis of an output cell on one map: its box side [start, end], the map's scale, the cell and
// the grid's cells along the axis, and its samples (sample_count).
template <typename acc_t>
struct CellAxis {
  acc_t start, end, scale;
  int64_t cell, cells, count;
};

template <typename acc_t>
HC_HOST_DEVICE CellAxis<acc_t> cell_axis(acc_t start, acc_t end, acc_t scale, int64_t cell, int64_t cells,
                                         int64_t sampling_ratio, bool aligned) {
  return CellAxis<acc_t>{start, end, scale, cell, cells,
                         sample_count<acc_t>((end - start) * scale, cells, sampling_ratio, aligned)};
}

// Sample s's two taps on a map axis of `size` pixels, each weight divided by the sample count
// (the cell's share).
template <typename acc_t>
HC_HOST_DEVICE void cell_sample_taps(const CellAxis<acc_t>& axis, int64_t s, int64_t size, int64_t padding,
                                     bool aligned, int64_t* lo, int64_t* hi, acc_t* w_lo, acc_t* w_hi) {
  axis_taps<acc_t>(sample_coordinate<acc_t>(axis.start, axis.end, axis.scale, axis.cell, s, axis.count, axis.cells,
                                            aligned),
                   size, padding, lo, hi, w_lo, w_hi);
  const acc_t count = acc_t(axis.count);
  *w_lo /= count;
  *w_hi /= count;
}

// Grid place (i, j) of an (oh, ow) grid: its relative place (u, v) in the box, which gives the
// cell's location weights whatever the sampling.
template <typename acc_t>
HC_HOST_DEVICE void cell_place(int64_t i, int64_t j, int64_t oh, int64_t ow, acc_t* u, acc_t* v) {
  *u = (acc_t(j) + acc_t(0.5)) / acc_t(ow);
  *v = (acc_t(i) + acc_t(0.5)) / acc_t(oh);
}

// ----------------------------------------------------------------------------- classifier

// The at most four classifier cells around relative place (u, v) in a K x K grid and their
// bilinear weights alpha (they sum to 1; NaN where u or v is not finite). Cells are
// k = kv * K + ku; repeated cells (at the grid's edges or K == 1) carry their share separately.
template <typename acc_t>
struct LocationWeights {
  int64_t cell[4];
  acc_t alpha[4];
};

template <typename acc_t>
HC_HOST_DEVICE LocationWeights<acc_t> location_weights(acc_t u, acc_t v, int64_t K) {
  LocationWeights<acc_t> w;
  int64_t ku0, ku1, kv0, kv1;
  acc_t wu0, wu1, wv0, wv1;
  // The K x K grid spans the box: relative place u sits at K-grid coordinate u * K - 0.5,
  // exactly feature_axis with scale K and border padding.
  feature_axis<acc_t>(u, acc_t(K), K, kPaddingBorder, &ku0, &ku1, &wu0, &wu1);
  feature_axis<acc_t>(v, acc_t(K), K, kPaddingBorder, &kv0, &kv1, &wv0, &wv1);
  w.cell[0] = kv0 * K + ku0;
  w.cell[1] = kv0 * K + ku1;
  w.cell[2] = kv1 * K + ku0;
  w.cell[3] = kv1 * K + ku1;
  w.alpha[0] = wv0 * wu0;
  w.alpha[1] = wv0 * wu1;
  w.alpha[2] = wv1 * wu0;
  w.alpha[3] = wv1 * wu1;
  return w;
}

// A batch index read from a coordinate tensor: valid only when it is an integer value in [0, B).
template <typename acc_t>
HC_HOST_DEVICE bool batch_index(acc_t value, int64_t batch, int64_t* b) {
  if (!(value >= acc_t(0) && value < acc_t(batch))) return false;  // also rejects NaN
  int64_t i = static_cast<int64_t>(value);
  if (acc_t(i) != value) return false;
  *b = i;
  return true;
}

template <typename acc_t>
HC_HOST_DEVICE acc_t sigmoid(acc_t s) {
  return acc_t(1) / (acc_t(1) + exp(-s));
}

}  // namespace hypercolumn_ops
