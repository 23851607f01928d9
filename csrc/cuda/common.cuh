// Pieces shared by the CUDA kernels of hypercolumn_ops: how a kernel sees a feature map, the
// points of a call (sparse rows or box grids), the bilinear gather and scatter, and the host-side
// argument checks. The coordinate and weight formulas themselves live in ../hypercolumn_math.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "hypercolumn_math.h"
#include "poison.h"

namespace hypercolumn_ops {
namespace cuda {

// Points per block in the sampling kernels: their taps are computed once into shared memory and
// reused by every channel thread of the block.
constexpr int kTilePoints = 32;
// Channel threads per block (at most; fewer for thin layers).
constexpr int kChannelThreads = 128;

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
// place (i, j) of box row p / (oh * ow).
template <typename acc_t>
struct PointSource {
  const acc_t* rows;       // (N, 3) or (R, 5), contiguous
  const acc_t* locations;  // (N, 2) rows (u, v), or null: then u = v = 0.5, the only cell when K = 1
  const int64_t* labels;   // one per row, or null (class 0)
  int64_t grid_h, grid_w;  // box grid; 0 for sparse points
  int64_t batch, classes;
};

template <typename acc_t>
struct Point {
  int64_t row, i, j;  // output row (point or box) and grid place (0, 0 for sparse points)
  int64_t b, label;   // 0 where the point is not valid
  acc_t x, y, u, v;
  bool valid;  // batch index and label in range, coordinates finite: otherwise NaN output, no read
};

template <typename acc_t>
__device__ __forceinline__ bool is_finite(acc_t a) {
  return a == a && a - a == acc_t(0);
}

template <typename acc_t>
__device__ __forceinline__ Point<acc_t> point_at(const PointSource<acc_t>& src, int64_t p) {
  Point<acc_t> pt;
  acc_t batch_value;
  if (src.grid_h == 0) {
    pt.row = p;
    pt.i = 0;
    pt.j = 0;
    const acc_t* r = src.rows + 3 * p;
    batch_value = r[0];
    pt.x = r[1];
    pt.y = r[2];
    pt.u = src.locations != nullptr ? src.locations[2 * p] : acc_t(0.5);
    pt.v = src.locations != nullptr ? src.locations[2 * p + 1] : acc_t(0.5);
  } else {
    const int64_t cells = src.grid_h * src.grid_w;
    pt.row = p / cells;
    const int64_t s = p - pt.row * cells;
    pt.i = s / src.grid_w;
    pt.j = s - pt.i * src.grid_w;
    const acc_t* r = src.rows + 5 * pt.row;
    batch_value = r[0];
    box_grid_point<acc_t>(r[1], r[2], r[3], r[4], pt.i, pt.j, src.grid_h, src.grid_w, &pt.x, &pt.y,
                          &pt.u, &pt.v);
  }
  pt.b = 0;
  bool valid = batch_index<acc_t>(batch_value, src.batch, &pt.b);
  pt.label = 0;
  if (src.labels != nullptr) {
    const int64_t label = src.labels[pt.row];
    if (label >= 0 && label < src.classes) {
      pt.label = label;
    } else {
      valid = false;
    }
  }
  valid = valid && is_finite(pt.x) && is_finite(pt.y) && is_finite(pt.u) && is_finite(pt.v);
  if (!valid) pt.b = 0;
  pt.valid = valid;
  return pt;
}

template <typename acc_t>
__device__ __forceinline__ int64_t output_offset(const OutputStrides& s, const Point<acc_t>& pt) {
  return pt.row * s.row + pt.i * s.i + pt.j * s.j;
}

// A point's bilinear taps on one layer, computed once per block and shared by its channel threads.
template <typename acc_t>
struct PointTaps {
  BilinearTaps<acc_t> taps;
  int64_t b;
  bool valid;
};

template <typename acc_t, typename ptr_t>
__device__ __forceinline__ PointTaps<acc_t> point_taps(const Point<acc_t>& pt, const MapView<ptr_t>& map,
                                                       acc_t scale_y, acc_t scale_x, int64_t padding) {
  PointTaps<acc_t> t;
  t.taps = bilinear_taps<acc_t>(pt.x, pt.y, scale_y, scale_x, map.height, map.width, padding);
  t.b = pt.b;
  t.valid = pt.valid;
  return t;
}

// The bilinear sample of channel c (its four taps blended).
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t gather(const MapView<const scalar_t*>& map, const PointTaps<acc_t>& t,
                                        int64_t c) {
  const scalar_t* base = map.data + t.b * map.stride_b + c * map.stride_c;
  const BilinearTaps<acc_t>& q = t.taps;
  return q.w00 * static_cast<acc_t>(base[q.y0 * map.stride_y + q.x0 * map.stride_x]) +
         q.w01 * static_cast<acc_t>(base[q.y0 * map.stride_y + q.x1 * map.stride_x]) +
         q.w10 * static_cast<acc_t>(base[q.y1 * map.stride_y + q.x0 * map.stride_x]) +
         q.w11 * static_cast<acc_t>(base[q.y1 * map.stride_y + q.x1 * map.stride_x]);
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// Channels c .. c + VEC - 1 in one aligned load per tap (the caller checked wide_loads_allowed).
template <int VEC, typename acc_t, typename scalar_t>
__device__ __forceinline__ void gather_wide(const MapView<const scalar_t*>& map, const PointTaps<acc_t>& t,
                                            int64_t c, acc_t (&out)[VEC]) {
  if (VEC == 1) {
    out[0] = gather(map, t, c);
    return;
  }
  const scalar_t* base = map.data + t.b * map.stride_b + c;
  const BilinearTaps<acc_t>& q = t.taps;
  const Pack<scalar_t, VEC> p00 = *reinterpret_cast<const Pack<scalar_t, VEC>*>(
      base + q.y0 * map.stride_y + q.x0 * map.stride_x);
  const Pack<scalar_t, VEC> p01 = *reinterpret_cast<const Pack<scalar_t, VEC>*>(
      base + q.y0 * map.stride_y + q.x1 * map.stride_x);
  const Pack<scalar_t, VEC> p10 = *reinterpret_cast<const Pack<scalar_t, VEC>*>(
      base + q.y1 * map.stride_y + q.x0 * map.stride_x);
  const Pack<scalar_t, VEC> p11 = *reinterpret_cast<const Pack<scalar_t, VEC>*>(
      base + q.y1 * map.stride_y + q.x1 * map.stride_x);
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    out[v] = q.w00 * static_cast<acc_t>(p00.v[v]) + q.w01 * static_cast<acc_t>(p01.v[v]) +
             q.w10 * static_cast<acc_t>(p10.v[v]) + q.w11 * static_cast<acc_t>(p11.v[v]);
  }
}

// Spreads gradient g of channel c's sample back onto its four taps, with atomics.
template <typename acc_t>
__device__ __forceinline__ void scatter(const MapView<acc_t*>& grad, const PointTaps<acc_t>& t, int64_t c, acc_t g) {
  acc_t* base = grad.data + t.b * grad.stride_b + c * grad.stride_c;
  const BilinearTaps<acc_t>& q = t.taps;
  if (q.w00 != acc_t(0)) gpuAtomicAdd(base + q.y0 * grad.stride_y + q.x0 * grad.stride_x, q.w00 * g);
  if (q.w01 != acc_t(0)) gpuAtomicAdd(base + q.y0 * grad.stride_y + q.x1 * grad.stride_x, q.w01 * g);
  if (q.w10 != acc_t(0)) gpuAtomicAdd(base + q.y1 * grad.stride_y + q.x0 * grad.stride_x, q.w10 * g);
  if (q.w11 != acc_t(0)) gpuAtomicAdd(base + q.y1 * grad.stride_y + q.x1 * grad.stride_x, q.w11 * g);
}

// ----------------------------------------------------------------------------- backward scatter
//
// A backward pass adds each point's per-channel gradient, times a tap's bilinear weight, into its
// four taps of an accumulation-type buffer. `Grads` says what that gradient is (SampleGrads
// below; CellFeatureGrads in fused_kernels.cu): `stage` reads once per point what every channel
// thread needs (kept in shared memory), `at` gives channel c's gradient.
//
// By default scatter_taps_kernel adds with atomics. Under torch.use_deterministic_algorithms(True)
// the taps of all points become entries (key = the pixel, b * H * W + y * W + x), sorted stably by
// key and cut into one segment per pixel; scatter_segments_kernel gives each (pixel, channel) to
// one thread, which sums the pixel's entries in entry order and writes once: no atomics, the same
// bits on every run.

// The output gradient of sparse_hypercolumn / box_hypercolumn at a point's channel.
template <typename scalar_t, typename acc_t>
struct SampleGrads {
  const scalar_t* grad_out;
  OutputStrides strides;
  int64_t column_offset;  // the layer's first channel in the output

  struct Staged {
    int64_t base;
  };
  __device__ __forceinline__ Staged stage(const Point<acc_t>& pt, int64_t) const {
    return {output_offset(strides, pt) + column_offset * strides.column};
  }
  __device__ __forceinline__ acc_t at(const Staged& s, int64_t c) const {
    return static_cast<acc_t>(grad_out[s.base + c * strides.column]);
  }
};

// Block x: a tile of kTilePoints points; block y: a chunk of channels (thread = channel).
template <typename acc_t, typename Grads>
__global__ void __launch_bounds__(kChannelThreads)
    scatter_taps_kernel(MapView<acc_t*> target, PointSource<acc_t> src, int64_t num_points, acc_t scale_y,
                        acc_t scale_x, int64_t padding, Grads grads) {
  __shared__ PointTaps<acc_t> taps[kTilePoints];
  __shared__ typename Grads::Staged staged[kTilePoints];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTilePoints;
  const int count = static_cast<int>(min(static_cast<int64_t>(kTilePoints), num_points - first));
  for (int t = threadIdx.x; t < count; t += blockDim.x) {
    const Point<acc_t> pt = point_at(src, first + t);
    taps[t] = point_taps(pt, target, scale_y, scale_x, padding);
    staged[t] = grads.stage(pt, first + t);
  }
  __syncthreads();
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= target.channels) return;
  for (int t = 0; t < count; ++t) {
    if (!taps[t].valid) continue;
    const acc_t g = grads.at(staged[t], c);
    if (g != acc_t(0)) scatter(target, taps[t], c, g);
  }
}

// Entry 4 * p + t is tap t (00, 01, 10, 11) of point p on a (height, width) map: its key
// b * height * width + y * width + x, or src.batch * height * width (the sentinel, sorted last)
// where it takes no gradient (invalid point, zero weight); and its bilinear weight.
template <typename acc_t, typename key_t>
__global__ void tap_entries_kernel(PointSource<acc_t> src, int64_t num_points, int64_t height, int64_t width,
                                   acc_t scale_y, acc_t scale_x, int64_t padding, key_t* keys, acc_t* weights) {
  const int64_t sentinel = src.batch * height * width;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < num_points;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Point<acc_t> pt = point_at(src, p);
    const BilinearTaps<acc_t> q = bilinear_taps<acc_t>(pt.x, pt.y, scale_y, scale_x, height, width, padding);
    const int64_t image = pt.b * height * width;
    const int64_t key[4] = {image + q.y0 * width + q.x0, image + q.y0 * width + q.x1, image + q.y1 * width + q.x0,
                            image + q.y1 * width + q.x1};
    const acc_t weight[4] = {q.w00, q.w01, q.w10, q.w11};
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      keys[4 * p + t] = static_cast<key_t>((pt.valid && weight[t] != acc_t(0)) ? key[t] : sentinel);
      weights[4 * p + t] = weight[t];
    }
  }
}

// Sorted tap entries cut into segments of one key: segment s holds entries
// order[starts[s] .. starts[s] + counts[s]) of key keys[s].
struct SegmentView {
  const int64_t* keys;
  const int64_t* starts;
  const int64_t* counts;
  const int64_t* order;
  int64_t sentinel;
};

// Block x: one segment (a pixel); block y: a chunk of channels (thread = channel), which the thread
// alone writes for that pixel.
template <typename acc_t, typename Grads>
__global__ void __launch_bounds__(kChannelThreads)
    scatter_segments_kernel(MapView<acc_t*> target, SegmentView segments, const acc_t* entry_weights,
                            PointSource<acc_t> src, Grads grads) {
  __shared__ acc_t weight[kTilePoints];
  __shared__ typename Grads::Staged staged[kTilePoints];
  const int64_t key = segments.keys[blockIdx.x];
  if (key >= segments.sentinel) return;  // the whole block: entries that take no gradient
  const int64_t start = segments.starts[blockIdx.x], count = segments.counts[blockIdx.x];
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  acc_t sum = 0;
  for (int64_t done = 0; done < count; done += kTilePoints) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kTilePoints), count - done));
    __syncthreads();  // the previous tile's readers are done with the shared entries
    for (int t = threadIdx.x; t < n; t += blockDim.x) {
      const int64_t entry = segments.order[start + done + t];
      const int64_t p = entry / 4;
      weight[t] = entry_weights[entry];
      staged[t] = grads.stage(point_at(src, p), p);
    }
    __syncthreads();
    if (c < target.channels) {
      for (int t = 0; t < n; ++t) sum += weight[t] * grads.at(staged[t], c);
    }
  }
  if (c >= target.channels) return;
  const int64_t pixels = target.height * target.width;
  const int64_t b = key / pixels, pixel = key - b * pixels;
  const int64_t y = pixel / target.width, x = pixel - y * target.width;
  target.data[b * target.stride_b + c * target.stride_c + y * target.stride_y + x * target.stride_x] = sum;
}

// ----------------------------------------------------------------------------- host helpers

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Channel threads per block for a layer of `columns` thread columns: a whole number of warps.
inline int channel_threads(int64_t columns) {
  return static_cast<int>(std::min<int64_t>(kChannelThreads, std::max<int64_t>(32, ceil_div(columns, 32) * 32)));
}

// Whether every tap of channels c .. c + vec - 1 (c a multiple of vec) is one aligned vector load:
// channels contiguous (channels_last), all other strides and the base address aligned.
inline bool wide_loads_allowed(const at::Tensor& feature, int64_t vec) {
  if (vec <= 1) return false;
  const int64_t bytes = vec * static_cast<int64_t>(feature.element_size());
  return feature.stride(1) == 1 && feature.size(1) % vec == 0 && feature.stride(0) % vec == 0 &&
         feature.stride(2) % vec == 0 && feature.stride(3) % vec == 0 &&
         reinterpret_cast<std::uintptr_t>(feature.data_ptr()) % bytes == 0;
}

inline at::ScalarType coordinate_type(at::ScalarType feature_type) {
  return feature_type == at::kDouble ? at::kDouble : at::kFloat;
}

// Features: L >= 1 CUDA tensors (B, C_l, H_l, W_l) of one floating dtype, non-empty maps.
inline void check_features(at::TensorList features) {
  TORCH_CHECK(!features.empty(), "features: expected at least one feature map, got none");
  const at::Tensor& first = features[0];
  TORCH_CHECK(first.is_cuda(), "features[0]: expected a CUDA tensor, got device ", first.device());
  const auto dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
              "features[0]: expected float16, bfloat16, float32 or float64, got ", dtype);
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor& f = features[l];
    TORCH_CHECK(f.dim() == 4, "features[", l, "]: expected a 4-D tensor (B, C, H, W), got ", f.sizes());
    TORCH_CHECK(f.scalar_type() == dtype, "features[", l, "]: dtype ", f.scalar_type(),
                " differs from features[0]'s ", dtype);
    TORCH_CHECK(f.device() == first.device(), "features[", l, "]: device ", f.device(),
                " differs from features[0]'s ", first.device());
    TORCH_CHECK(f.size(0) == first.size(0), "features[", l, "]: batch size ", f.size(0),
                " differs from features[0]'s ", first.size(0));
    TORCH_CHECK(f.size(2) >= 1 && f.size(3) >= 1, "features[", l, "]: expected a non-empty map, got ",
                f.sizes());
  }
}

inline void check_scales(at::TensorList features, at::ArrayRef<double> scale_y, at::ArrayRef<double> scale_x) {
  TORCH_CHECK(scale_y.size() == features.size() && scale_x.size() == features.size(),
              "scale_y, scale_x: expected one scale per layer (", features.size(), "), got ", scale_y.size(),
              " and ", scale_x.size());
  for (size_t l = 0; l < features.size(); ++l) {
    TORCH_CHECK(scale_y[l] > 0 && scale_x[l] > 0 && std::isfinite(scale_y[l]) && std::isfinite(scale_x[l]),
                "scale_y, scale_x: expected positive finite scales, got ", scale_y[l], " and ", scale_x[l],
                " for layer ", l);
  }
}

inline void check_padding(int64_t padding) {
  TORCH_CHECK(padding == kPaddingBorder || padding == kPaddingZeros,
              "padding: expected 0 (border) or 1 (zeros), got ", padding);
}

// Coordinate rows (count, columns) on the features' device, as the contiguous accumulation-type
// tensor the kernels read (float64 for float64 features, float32 otherwise).
inline at::Tensor coordinate_rows(const at::Tensor& rows, int64_t columns, const char* name,
                                  const at::Tensor& feature) {
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) == columns, name, ": expected shape (rows, ", columns, "), got ",
              rows.sizes());
  TORCH_CHECK(rows.is_floating_point(), name, ": expected a floating dtype, got ", rows.scalar_type());
  TORCH_CHECK(rows.device() == feature.device(), name, ": device ", rows.device(), " differs from the features' ",
              feature.device());
  return rows.to(coordinate_type(feature.scalar_type())).contiguous();
}

// A kernel's launch configuration exceeds no CUDA limit: gridDim.y and .z are at most 65535.
inline void check_grid_y(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= 65535, what, ": too many channel or output blocks (", blocks, ") for one launch");
}


// ----------------------------------------------------------------------------- backward, host side

// A zero-filled accumulation-type (float32, or float64 for float64 features) gradient buffer for
// `feature`, channels_last so that the channel threads of a warp add to consecutive addresses.
inline at::Tensor accumulation_buffer(const at::Tensor& feature) {
  return at::empty(feature.sizes(), feature.options().dtype(coordinate_type(feature.scalar_type())),
                   at::MemoryFormat::ChannelsLast)
      .zero_();
}

// The gradient of `feature` from its accumulation buffer, with at::empty_like(feature)'s dtype and
// strides (what the fake kernels promise); the buffer itself where it already is that.
inline at::Tensor feature_grad(const at::Tensor& feature, const at::Tensor& buffer) {
  if (buffer.scalar_type() == feature.scalar_type() && feature.is_non_overlapping_and_dense() &&
      buffer.strides() == feature.strides()) {
    return buffer;
  }
  return at::empty_like(feature).copy_(buffer);
}

// The tap entries of one layer, sorted by key (stable: equal keys keep entry order, so each sum
// runs in one fixed order) and cut into segments of one key.
struct TapSegments {
  at::Tensor weights, keys, starts, counts, order;
  int64_t sentinel = 0;

  SegmentView view() const {
    return {keys.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
            order.data_ptr<int64_t>(), sentinel};
  }
};

template <typename acc_t, typename key_t>
at::Tensor tap_keys(const PointSource<acc_t>& src, int64_t num_points, int64_t height, int64_t width, acc_t scale_y,
                    acc_t scale_x, int64_t padding, const at::Tensor& weights) {
  const at::Tensor keys =
      at::empty({4 * num_points}, weights.options().dtype(c10::CppTypeToScalarType<key_t>::value));
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(num_points, 256), 65535));
  tap_entries_kernel<acc_t, key_t><<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      src, num_points, height, width, scale_y, scale_x, padding, keys.data_ptr<key_t>(), weights.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keys;
}

// The tap entries of `map`'s layer (B, C, H, W), sorted and cut into segments. Keys are sorted as
// int32 where they fit (half the radix-sort passes of int64).
template <typename acc_t>
TapSegments tap_segments(const PointSource<acc_t>& src, int64_t num_points, const at::Tensor& map, acc_t scale_y,
                         acc_t scale_x, int64_t padding) {
  const int64_t height = map.size(2), width = map.size(3);
  TapSegments s;
  s.sentinel = src.batch * height * width;
  s.weights = at::empty({4 * num_points}, map.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const at::Tensor keys =
      s.sentinel <= std::numeric_limits<int32_t>::max()
          ? tap_keys<acc_t, int32_t>(src, num_points, height, width, scale_y, scale_x, padding, s.weights)
          : tap_keys<acc_t, int64_t>(src, num_points, height, width, scale_y, scale_x, padding, s.weights);
  at::Tensor sorted, segment_keys;
  std::tie(sorted, s.order) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  std::tie(segment_keys, std::ignore, s.counts) =
      at::unique_consecutive(sorted, /*return_inverse=*/false, /*return_counts=*/true);
  s.keys = segment_keys.to(at::kLong);
  s.starts = at::cumsum(s.counts, 0) - s.counts;
  TORCH_CHECK(s.keys.size(0) <= std::numeric_limits<int32_t>::max(), "too many gradient pixels for one launch");
  return s;
}

// Adds every point's `grads` (times each tap's weight) into `buffer` (B, C, H, W, any strides;
// zero-filled): with atomics, or when `deterministic` by sorted per-pixel segments, each (pixel,
// channel) summed by one thread in entry order.
template <typename acc_t, typename Grads>
void scatter_to_taps(const at::Tensor& buffer, const PointSource<acc_t>& src, int64_t num_points, acc_t scale_y,
                     acc_t scale_x, int64_t padding, const Grads& grads, bool deterministic) {
  const int64_t channels = buffer.size(1);
  if (num_points == 0 || channels == 0 || buffer.size(0) == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int threads = channel_threads(channels);
  const int64_t chunks = ceil_div(channels, threads);
  check_grid_y(chunks, "features");
  const MapView<acc_t*> target = map_view<acc_t>(buffer);
  if (deterministic) {
    const TapSegments segments = tap_segments<acc_t>(src, num_points, buffer, scale_y, scale_x, padding);
    const dim3 grid(static_cast<unsigned>(segments.keys.size(0)), static_cast<unsigned>(chunks));
    scatter_segments_kernel<acc_t, Grads><<<grid, threads, 0, stream>>>(
        target, segments.view(), segments.weights.data_ptr<acc_t>(), src, grads);
  } else {
    const dim3 grid(static_cast<unsigned>(ceil_div(num_points, kTilePoints)), static_cast<unsigned>(chunks));
    scatter_taps_kernel<acc_t, Grads><<<grid, threads, 0, stream>>>(target, src, num_points, scale_y, scale_x,
                                                                     padding, grads);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace hypercolumn_ops
