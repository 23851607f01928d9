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
#include <cub/device/device_radix_sort.cuh>

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
  bool valid = row_valid(src, pt.row, batch_value, &pt.b, &pt.label);
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

// The four taps of channels c .. c + VEC - 1, one load per tap: VEC > 1 needs unit channel stride
// and aligned addresses (the caller checked wide_loads_allowed). Loading is kept apart from
// blending (blend_taps) so that a thread can issue the loads of several points first.
template <int VEC, typename acc_t, typename scalar_t>
__device__ __forceinline__ void load_taps(const MapView<const scalar_t*>& map, const PointTaps<acc_t>& t, int64_t c,
                                          Pack<scalar_t, VEC> (&out)[4]) {
  const scalar_t* base = map.data + t.b * map.stride_b + c * map.stride_c;
  const BilinearTaps<acc_t>& q = t.taps;
  out[0] = *reinterpret_cast<const Pack<scalar_t, VEC>*>(base + q.y0 * map.stride_y + q.x0 * map.stride_x);
  out[1] = *reinterpret_cast<const Pack<scalar_t, VEC>*>(base + q.y0 * map.stride_y + q.x1 * map.stride_x);
  out[2] = *reinterpret_cast<const Pack<scalar_t, VEC>*>(base + q.y1 * map.stride_y + q.x0 * map.stride_x);
  out[3] = *reinterpret_cast<const Pack<scalar_t, VEC>*>(base + q.y1 * map.stride_y + q.x1 * map.stride_x);
}

template <int VEC, typename acc_t, typename scalar_t>
__device__ __forceinline__ void blend_taps(const PointTaps<acc_t>& t, const Pack<scalar_t, VEC> (&p)[4],
                                           acc_t (&out)[VEC]) {
  const BilinearTaps<acc_t>& q = t.taps;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    out[v] = q.w00 * static_cast<acc_t>(p[0].v[v]) + q.w01 * static_cast<acc_t>(p[1].v[v]) +
             q.w10 * static_cast<acc_t>(p[2].v[v]) + q.w11 * static_cast<acc_t>(p[3].v[v]);
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
// below; CellFeatureGrads and ScoreMapGrads in fused_kernels.cu): `stage` reads once per point
// what every channel thread needs (kept in shared memory), `at` gives channel c's gradient, and
// `Sums` how a deterministic block adds them.
//
// By default scatter_taps_kernel adds with atomics. Under torch.use_deterministic_algorithms(True)
// (gather_to_taps) box grids are gathered per pixel (gather_box_taps_kernel, below); other points'
// taps become entries (key = the pixel, b * H * W + y * W + x), radix-sorted stably by key (cub,
// over the key's bits only); segment_bounds_kernel finds where each pixel's entries begin and end,
// and scatter_segments_kernel gives each pixel a block, which sums the pixel's entries in entry
// order and writes once: no atomics, no host synchronisation, the same bits on every run.

template <typename acc_t>
struct ChannelSums;  // how a deterministic block adds channel gradients (below)

// The output gradient of sparse_hypercolumn / box_hypercolumn at a point's channel.
template <typename scalar_t, typename acc_t>
struct SampleGrads {
  const scalar_t* grad_out;
  OutputStrides strides;
  int64_t column_offset;  // the layer's first channel in the output

  using Sums = ChannelSums<acc_t>;
  static constexpr int kLoadBatch = 8;  // entries whose gradient a deterministic lane loads at once
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

// Entry e = 4 * p + t is tap t (00, 01, 10, 11) of point p on a (height, width) map: its key
// b * height * width + y * width + x, or src.batch * height * width (the sentinel, sorted last)
// where it takes no gradient (invalid point, zero weight); its bilinear weight; and e itself, the
// value the sort carries.
template <typename acc_t, typename index_t>
__global__ void tap_entries_kernel(PointSource<acc_t> src, int64_t num_points, int64_t height, int64_t width,
                                   acc_t scale_y, acc_t scale_x, int64_t padding, index_t* keys, index_t* entries,
                                   acc_t* weights) {
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
      keys[4 * p + t] = static_cast<index_t>((pt.valid && weight[t] != acc_t(0)) ? key[t] : sentinel);
      entries[4 * p + t] = static_cast<index_t>(4 * p + t);
      weights[4 * p + t] = weight[t];
    }
  }
}

// Keys sorted (`count` of them): pixel k's entries are sorted positions begin[k] .. end[k] - 1.
// begin and end stay 0 (as zero-filled) for a pixel that no tap reaches.
template <typename index_t>
__global__ void segment_bounds_kernel(const index_t* sorted, int64_t count, int64_t sentinel, index_t* begin,
                                      index_t* end) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < count;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const index_t key = sorted[k];
    if (key >= sentinel) continue;
    if (k == 0 || sorted[k - 1] != key) begin[key] = static_cast<index_t>(k);
    if (k == count - 1 || sorted[k + 1] != key) end[key] = static_cast<index_t>(k + 1);
  }
}

// The sorted tap entries of a layer: pixel k's are order[begin[k] .. end[k]).
template <typename index_t>
struct SegmentView {
  const index_t* begin;
  const index_t* end;
  const index_t* order;  // entry indices 4 * p + t, sorted stably by key
};

// The deterministic blocks (one pixel at a time): threadIdx.y is one of blockDim.y groups that
// share each staged tile of entries (group g takes entries g, g + blockDim.y, ... in order), so
// that a pixel reached by thousands of taps (a coarse layer) is summed by many threads even when
// it has few channels; threadIdx.x is a lane of the group. `Grads::Sums` says how the lanes add:
// ChannelSums below (lane = channel) or ScoreBins (fused_kernels.cu). Each thread adds its share
// in order, then the groups' sums are added in group order: the same bits every run.
constexpr int kPixelThreads = 256;  // threads of a deterministic block (lanes x groups), at most

// A Sums type's split of the channels into chunks (blockIdx.y), where it needs more than a count.
struct SumsLayout {
  int64_t keys = 0;           // ScoreBins: cell keys per chunk
  int64_t outputs = 0;        // ScoreBins: outputs per chunk
  int64_t output_chunks = 1;  // ScoreBins: chunks along the outputs
};

// A deterministic launch: blocks of `block` threads for every pixel and each of `chunks` chunks,
// `sums` accumulation elements of shared memory per block (a Sums type's plan); then the grid and
// the dynamic shared memory in bytes (pixel_launch).
struct PixelLaunch {
  dim3 block;
  int64_t chunks;
  int64_t sums;
  SumsLayout layout;
  dim3 grid;
  size_t shared = 0;
};

// The dynamic shared memory of a launch (its third launch parameter), 16-byte aligned.
#ifndef HC_DYNAMIC_SHARED
#define HC_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// A deterministic block's shared arrays, sized by its `threads` threads (so that small blocks
// leave room for many per SM): one staged tile of `threads` entries (`Staged` each, and their
// weights), the `sums` elements of its Sums and, for the box gather, the scan of its chunk of
// `threads` boxes. Every array's size is rounded up to a multiple of 16 bytes, so each starts
// aligned whatever the thread count.
template <typename acc_t, typename Staged>
struct PixelShared {
  Staged* staged;
  acc_t* weight;
  acc_t* sums;
  int64_t *offset, *first_i, *first_j, *span_j;  // box gather only: threads + 1, then threads each

  __host__ __device__ static size_t rounded(size_t bytes) { return (bytes + 15) / 16 * 16; }

  static size_t bytes(int threads, int64_t sums, bool boxes) {
    return rounded(threads * sizeof(Staged)) + rounded(threads * sizeof(acc_t)) + rounded(sums * sizeof(acc_t)) +
           (boxes ? (4 * threads + 1) * sizeof(int64_t) : 0);
  }

  __device__ __forceinline__ static PixelShared carve(unsigned char* memory, int threads, int64_t sums) {
    PixelShared s;
    s.staged = reinterpret_cast<Staged*>(memory);
    memory += rounded(threads * sizeof(Staged));
    s.weight = reinterpret_cast<acc_t*>(memory);
    memory += rounded(threads * sizeof(acc_t));
    s.sums = reinterpret_cast<acc_t*>(memory);
    memory += rounded(sums * sizeof(acc_t));
    s.offset = reinterpret_cast<int64_t*>(memory);
    s.first_i = s.offset + threads + 1;
    s.first_j = s.first_i + threads;
    s.span_j = s.first_j + threads;
    return s;
  }
};

// Channel lanes: thread (x, group) sums channel c = blockIdx.y * blockDim.x + x of its group's
// entries in a register (`Grads::at` gives a staged entry's gradient of channel c); store adds the
// groups' sums through `partial` (shared, one per thread). A lane reads the gradients of
// Grads::kLoadBatch entries before it adds the first, in entry order: the loads wait together,
// not one after another, and the sum is the same.
template <typename acc_t>
struct ChannelSums {
  acc_t* partial;
  int64_t c;
  acc_t sum = 0;

  template <typename Grads>
  __device__ __forceinline__ ChannelSums(acc_t* shared, const SumsLayout&, const Grads&)
      : partial(shared), c(static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) {}

  template <typename Grads>
  static PixelLaunch plan(const Grads&, int64_t channels, int64_t num_points, int64_t pixels);

  __device__ __forceinline__ void clear() { sum = 0; }

  template <typename Grads>
  __device__ __forceinline__ void add(const acc_t* weight, const typename Grads::Staged* staged, int n,
                                      const Grads& grads, const MapView<acc_t*>& target) {
    if (c >= target.channels) return;
    constexpr int kBatch = Grads::kLoadBatch;
    const int step = blockDim.y;
    for (int t = threadIdx.y; t < n; t += kBatch * step) {
      acc_t w[kBatch], g[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int e = t + i * step;
        w[i] = e < n ? weight[e] : acc_t(0);
        g[i] = w[i] != acc_t(0) ? grads.at(staged[e], c) : acc_t(0);
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        if (w[i] != acc_t(0)) sum += w[i] * g[i];
      }
    }
  }

  // Called by every thread of the block: where `write`, stores the groups' total at (b, y, x).
  __device__ __forceinline__ void store(bool write, const MapView<acc_t*>& target, int64_t b, int64_t y, int64_t x) {
    __syncthreads();  // the previous pixel's readers are done with `partial`
    partial[threadIdx.y * blockDim.x + threadIdx.x] = sum;
    __syncthreads();
    if (!write || threadIdx.y != 0 || c >= target.channels) return;
    acc_t total = 0;
    for (unsigned g = 0; g < blockDim.y; ++g) total += partial[g * blockDim.x + threadIdx.x];
    target.data[b * target.stride_b + c * target.stride_c + y * target.stride_y + x * target.stride_x] = total;
  }
};

// Block x: pixels blockIdx.x, + gridDim.x, ... (b * H * W + y * W + x); block y: a chunk of
// channels. The pixel's sorted entries, staged one per thread at a time.
template <typename acc_t, typename index_t, typename Grads>
__global__ void __launch_bounds__(kPixelThreads)
    scatter_segments_kernel(MapView<acc_t*> target, int64_t pixels, SegmentView<index_t> segments,
                            const acc_t* entry_weights, PointSource<acc_t> src, Grads grads, int64_t sum_elements,
                            SumsLayout layout) {
  HC_DYNAMIC_SHARED(memory);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, threads = blockDim.x * blockDim.y;
  const auto shared = PixelShared<acc_t, typename Grads::Staged>::carve(memory, threads, sum_elements);
  typename Grads::Staged* staged = shared.staged;
  acc_t* weight = shared.weight;
  typename Grads::Sums sums(shared.sums, layout, grads);
  const int64_t per_image = target.height * target.width;
  for (int64_t key = blockIdx.x; key < pixels; key += gridDim.x) {
    // Block-uniform: a pixel no tap reaches keeps its zero.
    const int64_t start = segments.begin[key], count = segments.end[key] - start;
    sums.clear();
    for (int64_t done = 0; done < count; done += threads) {
      const int n = static_cast<int>(min(static_cast<int64_t>(threads), count - done));
      __syncthreads();  // the previous tile's readers are done with the shared entries
      for (int t = tid; t < n; t += threads) {
        const int64_t entry = segments.order[start + done + t];
        const int64_t p = entry / 4;
        weight[t] = entry_weights[entry];
        staged[t] = grads.stage(point_at(src, p), p);
      }
      __syncthreads();
      sums.add(weight, staged, n, grads, target);
    }
    const int64_t b = key / per_image, pixel = key - b * per_image;
    sums.store(count > 0, target, b, pixel / target.width, pixel % target.width);
  }
}

// Box grids (box_hypercolumn, fused_hypercolumn) need no sort: the points that tap a pixel follow
// from the boxes. Grid row i of a box taps map row y only where y is one of its two y taps, and
// likewise for columns; box_ranges_kernel lists, for every (box, map row), the first and last grid
// row that does (and for every (box, map column) the grid columns), by trying each grid row. Then
// gather_box_taps_kernel gives each pixel a block, which walks the boxes in order and, in each, the
// grid points of its (row range) x (column range) row-major: the order of the entries, unsorted.
// It recomputes each point's taps and sums those that reach the pixel.
struct BoxRanges {
  const int64_t* batch;    // (R): the box's image, or -1 where its batch index or label is not valid
  const int64_t* rows;     // (R, H, 2): first and last grid row tapping each map row; first > last: none
  const int64_t* columns;  // (R, W, 2): the same for grid columns and map columns
};

// Thread (box r, k): k < height finds the grid rows tapping map row k, k >= height the grid columns
// tapping map column k - height.
template <typename acc_t>
__global__ void box_ranges_kernel(PointSource<acc_t> src, int64_t num_rows, int64_t height, int64_t width,
                                  acc_t scale_y, acc_t scale_x, int64_t padding, int64_t* batch, int64_t* rows,
                                  int64_t* columns) {
  const int64_t per_box = height + width;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < num_rows * per_box;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = index / per_box, k = index - r * per_box;
    const acc_t* box = src.rows + 5 * r;
    int64_t b, label;
    const bool valid = row_valid(src, r, box[0], &b, &label);
    if (k == 0) batch[r] = valid ? b : -1;
    const bool along_y = k < height;
    const int64_t target = along_y ? k : k - height, steps = along_y ? src.grid_h : src.grid_w;
    int64_t first = steps, last = -1;
    for (int64_t s = 0; valid && s < steps; ++s) {
      acc_t x, y, u, v;
      box_grid_point<acc_t>(box[1], box[2], box[3], box[4], along_y ? s : 0, along_y ? 0 : s, src.grid_h,
                            src.grid_w, &x, &y, &u, &v);
      const acc_t coord = along_y ? y : x;
      if (!is_finite(coord)) continue;  // no valid point on this grid row (column)
      int64_t lo, hi;
      acc_t frac;
      feature_axis<acc_t>(coord, along_y ? scale_y : scale_x, along_y ? height : width, padding, &lo, &hi, &frac);
      if (lo == target || hi == target) {
        first = min(first, s);
        last = s;
      }
    }
    int64_t* range = along_y ? rows + 2 * (r * height + target) : columns + 2 * (r * width + target);
    range[0] = first;
    range[1] = last;
  }
}

// Block x: pixels blockIdx.x, + gridDim.x, ...; block y: a chunk of channels. The block takes the
// boxes one per thread at a time: each thread counts one box's candidate points for the pixel, a
// scan turns the counts into offsets, then the candidates are staged one per thread at a time (taps
// recomputed, the weight reaching this pixel) and summed in order.
template <typename acc_t, typename Grads>
__global__ void __launch_bounds__(kPixelThreads)
    gather_box_taps_kernel(MapView<acc_t*> target, int64_t pixels, int64_t num_rows, BoxRanges ranges,
                           PointSource<acc_t> src, acc_t scale_y, acc_t scale_x, int64_t padding, Grads grads,
                           int64_t sum_elements, SumsLayout layout) {
  HC_DYNAMIC_SHARED(memory);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, threads = blockDim.x * blockDim.y;
  const auto shared = PixelShared<acc_t, typename Grads::Staged>::carve(memory, threads, sum_elements);
  typename Grads::Staged* staged = shared.staged;
  acc_t* weight = shared.weight;
  typename Grads::Sums sums(shared.sums, layout, grads);
  // offset[k]: candidates before box k of the chunk, offset[boxes] the total.
  int64_t *offset = shared.offset, *first_i = shared.first_i, *first_j = shared.first_j, *span_j = shared.span_j;
  const int64_t per_image = target.height * target.width, cells = src.grid_h * src.grid_w;
  for (int64_t key = blockIdx.x; key < pixels; key += gridDim.x) {
    const int64_t b = key / per_image, pixel = key - b * per_image;
    const int64_t y = pixel / target.width, x = pixel - y * target.width;
    sums.clear();
    bool reached = false;  // block-uniform: some candidate point exists
    for (int64_t r0 = 0; r0 < num_rows; r0 += threads) {
      const int boxes = static_cast<int>(min(static_cast<int64_t>(threads), num_rows - r0));
      __syncthreads();  // the previous chunk's readers are done with the shared arrays
      int64_t count = 0;
      if (tid < boxes && ranges.batch[r0 + tid] == b) {
        const int64_t* rows = ranges.rows + 2 * ((r0 + tid) * target.height + y);
        const int64_t* columns = ranges.columns + 2 * ((r0 + tid) * target.width + x);
        if (rows[0] <= rows[1] && columns[0] <= columns[1]) {
          first_i[tid] = rows[0];
          first_j[tid] = columns[0];
          span_j[tid] = columns[1] - columns[0] + 1;
          count = (rows[1] - rows[0] + 1) * span_j[tid];
        }
      }
      offset[tid + 1] = count;
      if (tid == 0) offset[0] = 0;
      for (int stride = 1; stride < threads; stride *= 2) {  // inclusive scan of offset[1 ..]
        __syncthreads();
        const int64_t before = tid >= stride ? offset[tid + 1 - stride] : 0;
        __syncthreads();
        offset[tid + 1] += before;
      }
      __syncthreads();
      const int64_t total = offset[boxes];
      reached = reached || total > 0;
      for (int64_t done = 0; done < total; done += threads) {
        const int n = static_cast<int>(min(static_cast<int64_t>(threads), total - done));
        __syncthreads();  // the previous tile's readers are done with the shared entries
        for (int t = tid; t < n; t += threads) {
          const int64_t e = done + t;
          int lo = 0, hi = boxes;  // the box k with offset[k] <= e < offset[k + 1]
          while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if (offset[mid + 1] <= e) {
              lo = mid + 1;
            } else {
              hi = mid;
            }
          }
          const int64_t local = e - offset[lo];
          const int64_t i = first_i[lo] + local / span_j[lo], j = first_j[lo] + local % span_j[lo];
          const int64_t p = (r0 + lo) * cells + i * src.grid_w + j;
          const Point<acc_t> pt = point_at(src, p);
          acc_t w = 0;
          if (pt.valid) {
            const BilinearTaps<acc_t> q =
                bilinear_taps<acc_t>(pt.x, pt.y, scale_y, scale_x, target.height, target.width, padding);
            if (q.y0 == y && q.x0 == x) w += q.w00;
            if (q.y0 == y && q.x1 == x) w += q.w01;
            if (q.y1 == y && q.x0 == x) w += q.w10;
            if (q.y1 == y && q.x1 == x) w += q.w11;
          }
          weight[t] = w;
          staged[t] = grads.stage(pt, p);
        }
        __syncthreads();
        sums.add(weight, staged, n, grads, target);
      }
    }
    sums.store(reached, target, b, y, x);
  }
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

// A deterministic launch: a block per pixel (grid-stride past 2^31 - 1) and chunk.
inline dim3 pixel_grid(int64_t pixels, int64_t chunks) {
  check_grid_y(chunks, "features");
  return dim3(static_cast<unsigned>(std::min<int64_t>(pixels, std::numeric_limits<int32_t>::max())),
              static_cast<unsigned>(chunks));
}

// Taps a pixel takes on average.
inline int64_t taps_per_pixel(int64_t num_points, int64_t pixels) {
  return ceil_div(4 * num_points, std::max<int64_t>(pixels, 1));
}

// Channel lanes: chunks of channel_threads(channels) channels, times a power of two of entry
// groups: about one group per 32 taps a pixel takes on average, at most kPixelThreads threads.
// Fine layers get small blocks, many per SM; coarse ones, whose pixels take thousands of taps,
// get 256 threads.
template <typename acc_t>
template <typename Grads>
PixelLaunch ChannelSums<acc_t>::plan(const Grads&, int64_t channels, int64_t num_points, int64_t pixels) {
  const int threads = channel_threads(channels);
  const int64_t taps = taps_per_pixel(num_points, pixels);
  int groups = 1;
  while (2 * groups * threads <= kPixelThreads && 32 * groups < taps) groups *= 2;
  return {dim3(threads, groups), ceil_div(channels, threads), int64_t(threads) * groups, SumsLayout()};
}

// The launch of a deterministic kernel for Grads: Grads::Sums' plan, a block per pixel and chunk,
// and the dynamic shared memory (with the box gather's scan arrays where `boxes`).
template <typename acc_t, typename Grads>
PixelLaunch pixel_launch(const Grads& grads, int64_t channels, int64_t num_points, int64_t pixels, bool boxes) {
  PixelLaunch launch = Grads::Sums::plan(grads, channels, num_points, pixels);
  launch.grid = pixel_grid(pixels, launch.chunks);
  launch.shared =
      PixelShared<acc_t, typename Grads::Staged>::bytes(launch.block.x * launch.block.y, launch.sums, boxes);
  return launch;
}

// Sorts `count` (key, value) pairs by the low `bits` bits of the key, stably (cub's radix sort: as
// many passes as the bits need, about two for a feature map of up to 2^16 pixels).
template <typename index_t>
void radix_sort_pairs(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& sorted_keys,
                      const at::Tensor& sorted_values, int64_t count, int bits) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys.data_ptr<index_t>(),
                                                 sorted_keys.data_ptr<index_t>(), values.data_ptr<index_t>(),
                                                 sorted_values.data_ptr<index_t>(), count, 0, bits, stream));
  const at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, keys.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data_ptr(), temp_bytes, keys.data_ptr<index_t>(),
                                                 sorted_keys.data_ptr<index_t>(), values.data_ptr<index_t>(),
                                                 sorted_values.data_ptr<index_t>(), count, 0, bits, stream));
}

// The deterministic scatter: the taps of every point become entries, sorted stably by pixel; each
// (pixel, channel) is one thread's ordered sum. No host synchronisation: segment bounds are found
// on the device and every pixel gets a block (one without taps returns at once).
template <typename acc_t, typename index_t, typename Grads>
void scatter_sorted_taps(const MapView<acc_t*>& target, const at::Tensor& buffer, const PointSource<acc_t>& src,
                         int64_t num_points, acc_t scale_y, acc_t scale_x, int64_t padding, const Grads& grads) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t count = 4 * num_points, pixels = src.batch * target.height * target.width;
  const auto index_options = buffer.options().dtype(c10::CppTypeToScalarType<index_t>::value);
  const at::Tensor keys = at::empty({count}, index_options), entries = at::empty({count}, index_options);
  const at::Tensor weights = at::empty({count}, buffer.options());
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(num_points, 256), 65535));
  tap_entries_kernel<acc_t, index_t><<<blocks, 256, 0, stream>>>(
      src, num_points, target.height, target.width, scale_y, scale_x, padding, keys.data_ptr<index_t>(),
      entries.data_ptr<index_t>(), weights.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor sorted_keys = at::empty({count}, index_options), order = at::empty({count}, index_options);
  int bits = 1;  // of the largest key, the sentinel `pixels`
  while (bits < 63 && (pixels >> bits) != 0) ++bits;
  radix_sort_pairs<index_t>(keys, entries, sorted_keys, order, count, bits);
  const at::Tensor begin = at::zeros({pixels}, index_options), end = at::zeros({pixels}, index_options);
  const int bound_blocks = static_cast<int>(std::min<int64_t>(ceil_div(count, 256), 65535));
  segment_bounds_kernel<index_t><<<bound_blocks, 256, 0, stream>>>(
      sorted_keys.data_ptr<index_t>(), count, pixels, begin.data_ptr<index_t>(), end.data_ptr<index_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const SegmentView<index_t> segments{begin.data_ptr<index_t>(), end.data_ptr<index_t>(), order.data_ptr<index_t>()};
  const PixelLaunch launch = pixel_launch<acc_t>(grads, target.channels, num_points, pixels, false);
  scatter_segments_kernel<acc_t, index_t, Grads><<<launch.grid, launch.block, launch.shared, stream>>>(
      target, pixels, segments, weights.data_ptr<acc_t>(), src, grads, launch.sums, launch.layout);
}

// The deterministic scatter of a box grid: box_ranges_kernel, then one gather per pixel.
template <typename acc_t, typename Grads>
void gather_box_taps(const MapView<acc_t*>& target, const at::Tensor& buffer, const PointSource<acc_t>& src,
                     int64_t num_points, acc_t scale_y, acc_t scale_x, int64_t padding, const Grads& grads) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t num_rows = num_points / (src.grid_h * src.grid_w);
  const int64_t pixels = src.batch * target.height * target.width;
  const auto options = buffer.options().dtype(at::kLong);
  const at::Tensor batch = at::empty({num_rows}, options);
  const at::Tensor rows = at::empty({num_rows, target.height, 2}, options);
  const at::Tensor columns = at::empty({num_rows, target.width, 2}, options);
  const int64_t range_threads = num_rows * (target.height + target.width);
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(range_threads, 256), 65535));
  box_ranges_kernel<acc_t><<<blocks, 256, 0, stream>>>(src, num_rows, target.height, target.width, scale_y, scale_x,
                                                       padding, batch.data_ptr<int64_t>(), rows.data_ptr<int64_t>(),
                                                       columns.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const BoxRanges ranges{batch.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), columns.data_ptr<int64_t>()};
  const PixelLaunch launch = pixel_launch<acc_t>(grads, target.channels, num_points, pixels, true);
  gather_box_taps_kernel<acc_t, Grads><<<launch.grid, launch.block, launch.shared, stream>>>(
      target, pixels, num_rows, ranges, src, scale_y, scale_x, padding, grads, launch.sums, launch.layout);
}

// A box grid's deterministic backward gathers per pixel while the map has at most this many pixels
// per grid point of one box (B * H * W <= 64 * oh * ow): its blocks look at every box for every
// pixel (B * H * W * R box tests), where the sort moves 4 * R * oh * ow entries a few times. Not
// yet measured on a GPU: a count of the work, to be checked by benchmarks/gpu_check.sh.
constexpr int64_t kGatherPixelsPerGridPoint = 64;

// Adds every point's `grads` (times each tap's weight) into `buffer` (B, C, H, W, any strides;
// zero-filled) per pixel, in a fixed order: box grids gathered, other points' tap entries sorted.
template <typename acc_t, typename Grads>
void gather_to_taps(const at::Tensor& buffer, const PointSource<acc_t>& src, int64_t num_points, acc_t scale_y,
                    acc_t scale_x, int64_t padding, const Grads& grads) {
  if (num_points == 0 || buffer.size(1) == 0 || buffer.size(0) == 0) return;
  const MapView<acc_t*> target = map_view<acc_t>(buffer);
  const int64_t pixels = src.batch * buffer.size(2) * buffer.size(3);
  if (src.grid_h > 0 && pixels <= kGatherPixelsPerGridPoint * src.grid_h * src.grid_w) {
    gather_box_taps<acc_t>(target, buffer, src, num_points, scale_y, scale_x, padding, grads);
  } else if (4 * num_points <= std::numeric_limits<int32_t>::max() && pixels <= std::numeric_limits<int32_t>::max()) {
    // int32 keys and entry indices where they fit: half the bytes the sort moves.
    scatter_sorted_taps<acc_t, int32_t>(target, buffer, src, num_points, scale_y, scale_x, padding, grads);
  } else {
    scatter_sorted_taps<acc_t, int64_t>(target, buffer, src, num_points, scale_y, scale_x, padding, grads);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The same sums with atomics, or when `deterministic` with gather_to_taps: each (pixel, channel)
// summed by one thread in entry order.
template <typename acc_t, typename Grads>
void scatter_to_taps(const at::Tensor& buffer, const PointSource<acc_t>& src, int64_t num_points, acc_t scale_y,
                     acc_t scale_x, int64_t padding, const Grads& grads, bool deterministic) {
  if (deterministic) return gather_to_taps<acc_t>(buffer, src, num_points, scale_y, scale_x, padding, grads);
  const int64_t channels = buffer.size(1);
  if (num_points == 0 || channels == 0 || buffer.size(0) == 0) return;
  const int threads = channel_threads(channels);
  const int64_t chunks = ceil_div(channels, threads);
  check_grid_y(chunks, "features");
  const dim3 grid(static_cast<unsigned>(ceil_div(num_points, kTilePoints)), static_cast<unsigned>(chunks));
  scatter_taps_kernel<acc_t, Grads><<<grid, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      map_view<acc_t>(buffer), src, num_points, scale_y, scale_x, padding, grads);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace hypercolumn_ops
