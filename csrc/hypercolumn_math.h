// The coordinate and weight math of ../shared/CONTRACT.md, written once for the C++ and CUDA
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

constexpr int64_t kPaddingBorder = 0;
constexpr int64_t kPaddingZeros = 1;
constexpr int64_t kActivationNone = 0;
constexpr int64_t kActivationSigmoid = 1;
constexpr int64_t kOrderSampleFeatures = 0;
constexpr int64_t kOrderProjectScores = 1;

// The four taps of one bilinear sample along both axes of a (H, W) map: corner offsets
// y0, y1, x0, x1 are always in range, so a caller can read them without checks; weights are
// zero where padding="zeros" puts the point outside, NaN where the coordinate is not finite.
template <typename acc_t>
struct BilinearTaps {
  int64_t y0, y1, x0, x1;
  acc_t w00, w01, w10, w11;  // w{dy}{dx}
};

// One axis: image coordinate -> clamped feature coordinate, lower index, upper index and the
// weight of the upper index. Returns false where padding="zeros" puts the point outside the map
// (fx < -1 or fx > size). A non-finite coordinate yields index 0 and a NaN weight.
template <typename acc_t>
HC_HOST_DEVICE bool feature_axis(acc_t coord, acc_t scale, int64_t size, int64_t padding,
                                 int64_t* lo, int64_t* hi, acc_t* frac) {
  acc_t f = coord * scale - acc_t(0.5);
  if (!(f == f) || f - f != acc_t(0)) {  // NaN or +-inf, without relying on fast-math isfinite
    *lo = 0;
    *hi = 0;
    *frac = f - f;  // NaN
    return true;
  }
  bool inside = !(padding == kPaddingZeros && (f < acc_t(-1) || f > acc_t(size)));
  if (f < acc_t(0)) f = acc_t(0);
  if (f > acc_t(size - 1)) f = acc_t(size - 1);
  int64_t i0 = static_cast<int64_t>(f);  // f >= 0, so truncation is floor
  if (i0 > size - 1) i0 = size - 1;
  *lo = i0;
  *hi = i0 + 1 < size ? i0 + 1 : size - 1;
  *frac = f - acc_t(i0);
  return inside;
}

// Bilinear taps of image point (x, y) on a (height, width) map with scales (sy, sx).
template <typename acc_t>
HC_HOST_DEVICE BilinearTaps<acc_t> bilinear_taps(acc_t x, acc_t y, acc_t sy, acc_t sx,
                                                 int64_t height, int64_t width, int64_t padding) {
  BilinearTaps<acc_t> t;
  acc_t ly, lx;
  bool in_y = feature_axis<acc_t>(y, sy, height, padding, &t.y0, &t.y1, &ly);
  bool in_x = feature_axis<acc_t>(x, sx, width, padding, &t.x0, &t.x1, &lx);
  acc_t keep = (in_y && in_x) ? acc_t(1) : acc_t(0);
  acc_t hy = acc_t(1) - ly, hx = acc_t(1) - lx;
  t.w00 = keep * hy * hx;
  t.w01 = keep * hy * lx;
  t.w10 = keep * ly * hx;
  t.w11 = keep * ly * lx;
  return t;
}

// Grid point (i, j) of a box (x1, y1, x2, y2) with an (oh, ow) grid: its image coordinates
// and its relative place (u, v) in the box.
template <typename acc_t>
HC_HOST_DEVICE void box_grid_point(acc_t x1, acc_t y1, acc_t x2, acc_t y2, int64_t i, int64_t j,
                                   int64_t oh, int64_t ow, acc_t* x, acc_t* y, acc_t* u,
                                   acc_t* v) {
  *u = (acc_t(j) + acc_t(0.5)) / acc_t(ow);
  *v = (acc_t(i) + acc_t(0.5)) / acc_t(oh);
  *x = x1 + (acc_t(j) + acc_t(0.5)) * (x2 - x1) / acc_t(ow);
  *y = y1 + (acc_t(i) + acc_t(0.5)) * (y2 - y1) / acc_t(oh);
}

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
  acc_t lu, lv;
  // The K x K grid spans the box: relative place u sits at K-grid coordinate u * K - 0.5,
  // exactly feature_axis with scale K and border padding.
  feature_axis<acc_t>(u, acc_t(K), K, kPaddingBorder, &ku0, &ku1, &lu);
  feature_axis<acc_t>(v, acc_t(K), K, kPaddingBorder, &kv0, &kv1, &lv);
  w.cell[0] = kv0 * K + ku0;
  w.cell[1] = kv0 * K + ku1;
  w.cell[2] = kv1 * K + ku0;
  w.cell[3] = kv1 * K + ku1;
  w.alpha[0] = (acc_t(1) - lv) * (acc_t(1) - lu);
  w.alpha[1] = (acc_t(1) - lv) * lu;
  w.alpha[2] = lv * (acc_t(1) - lu);
  w.alpha[3] = lv * lu;
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
