// The backward scatter of the CUDA kernels, on the device: adding each point's per-channel
// gradient into its four taps of a gradient map (each sample's, for a box grid's cells of several
// samples), with atomics, or per pixel in a fixed order (sorted tap entries, or box grids
// gathered). Their launches are in tap_scatter_launch.cuh.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "hypercolumn_math.h"
#include "launch.h"
#include "points.cuh"

namespace hypercolumn_ops {
namespace cuda {

// A backward pass adds each point's per-channel gradient, times a tap's bilinear weight, into its
// four taps of an accumulation-type buffer. `Grads` says what that gradient is (SampleGrads
// below; CellFeatureGrads and ScoreMapGrads in fused_grads.cuh): `stage` reads once per point
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
template <typename acc_t, typename Grads, bool kSampled>
__global__ void __launch_bounds__(kChannelThreads)
    scatter_taps_kernel(MapView<acc_t*> target, PointSource<acc_t> src, int64_t num_points, acc_t scale_y,
                        acc_t scale_x, int64_t padding, Grads grads) {
  __shared__ PointTaps<acc_t, kSampled> taps[kTilePoints];
  __shared__ typename Grads::Staged staged[kTilePoints];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTilePoints;
  const int count = static_cast<int>(min(static_cast<int64_t>(kTilePoints), num_points - first));
  for (int t = threadIdx.x; t < count; t += blockDim.x) {
    const Point<acc_t> pt = point_at(src, first + t);
    taps[t] = point_taps<kSampled>(src, pt, target.height, target.width, scale_y, scale_x, padding);
    staged[t] = grads.stage(pt, first + t);
  }
  __syncthreads();
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= target.channels) return;
  for (int t = 0; t < count; ++t) {
    if (!taps[t].valid) continue;
    const acc_t g = grads.at(staged[t], c);
    if (g != acc_t(0)) scatter<kSampled>(target, taps[t], c, g);
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
    const BilinearTaps<acc_t> q = point_taps<false>(src, pt, height, width, scale_y, scale_x, padding).taps;
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
// ChannelSums below (lane = channel) or ScoreBins (fused_grads.cuh). Each thread adds its share
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
// from the boxes. Grid row i of a box taps map rows within the span of its samples' taps (a
// sample's coordinate moves monotonically with the sample, so the span runs from the first
// sample's taps to the last's), and likewise for columns; box_ranges_kernel lists, for every
// (box, map row), the first and last grid row whose span holds it (and for every (box, map column)
// the grid columns), by trying each grid row. Then gather_box_taps_kernel gives each pixel a
// block, which walks the boxes in order and, in each, the grid points of its (row range) x (column
// range) row-major: the order of the entries, unsorted. It recomputes each point's taps and sums
// the weight that reaches the pixel (tap_weight; 0 for a point whose span holds the pixel but whose
// samples skip it).
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
    const bool valid = row_valid(src, r, box[0], &b, &label) && box_extents_finite<acc_t>(box[1], box[2], box[3], box[4]);
    if (k == 0) batch[r] = valid ? b : -1;
    const bool along_y = k < height;
    const int64_t target = along_y ? k : k - height, steps = along_y ? src.grid_h : src.grid_w;
    const int64_t size = along_y ? height : width;
    int64_t first = steps, last = -1;
    for (int64_t s = 0; valid && s < steps; ++s) {
      const CellAxis<acc_t> axis =
          along_y ? cell_axis<acc_t>(box[2], box[4], scale_y, s, steps, src.sampling_ratio, src.aligned)
                  : cell_axis<acc_t>(box[1], box[3], scale_x, s, steps, src.sampling_ratio, src.aligned);
      if (axis.count <= 0) continue;  // no sample
      int64_t lo, hi, last_lo, last_hi;
      acc_t w_lo, w_hi;
      cell_sample_taps<acc_t>(axis, 0, size, padding, src.aligned, &lo, &hi, &w_lo, &w_hi);
      cell_sample_taps<acc_t>(axis, axis.count - 1, size, padding, src.aligned, &last_lo, &last_hi, &w_lo, &w_hi);
      if (min(lo, last_lo) <= target && target <= max(hi, last_hi)) {
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
template <typename acc_t, typename Grads, bool kSampled>
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
          weight[t] = pt.valid ? tap_weight<kSampled>(point_taps<kSampled>(src, pt, target.height, target.width,
                                                                           scale_y, scale_x, padding),
                                                      y, x, target.height, target.width)
                               : acc_t(0);
          staged[t] = grads.stage(pt, p);
        }
        __syncthreads();
        sums.add(weight, staged, n, grads, target);
      }
    }
    sums.store(reached, target, b, y, x);
  }
}

}  // namespace cuda
}  // namespace hypercolumn_ops
