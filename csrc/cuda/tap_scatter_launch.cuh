// The launches of the backward scatter (tap_scatter.cuh), on the host: atomics by default, per
// pixel in a fixed order under torch.use_deterministic_algorithms(True).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "launch.h"
#include "points.cuh"
#include "tap_scatter.cuh"

namespace hypercolumn_ops {
namespace cuda {

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
  with_sampling(src.sampled(), [&](auto sampled) {
    constexpr bool kSampled = decltype(sampled)::value;
    gather_box_taps_kernel<acc_t, Grads, kSampled><<<launch.grid, launch.block, launch.shared, stream>>>(
        target, pixels, num_rows, ranges, src, scale_y, scale_x, padding, grads, launch.sums, launch.layout);
  });
}

// A box grid's deterministic backward gathers per pixel while the map has at most this many pixels
// per grid point of one box (B * H * W <= 64 * oh * ow): its blocks look at every box for every
// pixel (B * H * W * R box tests), where the sort moves 4 * R * oh * ow entries a few times. Not
// yet measured on a GPU: a count of the work, to be checked by benchmarks/gpu_check.sh.
constexpr int64_t kGatherPixelsPerGridPoint = 64;

// Adds every point's `grads` (times each tap's weight) into `buffer` (B, C, H, W, any strides;
// zero-filled) per pixel, in a fixed order: box grids gathered (always where their cells average
// several samples), other points' tap entries sorted. No host synchronisation either way.
template <typename acc_t, typename Grads>
void gather_to_taps(const at::Tensor& buffer, const PointSource<acc_t>& src, int64_t num_points, acc_t scale_y,
                    acc_t scale_x, int64_t padding, const Grads& grads) {
  if (num_points == 0 || buffer.size(1) == 0 || buffer.size(0) == 0) return;
  const MapView<acc_t*> target = map_view<acc_t>(buffer);
  const int64_t pixels = src.batch * buffer.size(2) * buffer.size(3);
  // Tap entries hold one sample's four taps: a box grid whose cells average several samples gathers.
  if (src.grid_h > 0 && (src.sampled() || pixels <= kGatherPixelsPerGridPoint * src.grid_h * src.grid_w)) {
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
  with_sampling(src.sampled(), [&](auto sampled) {
    constexpr bool kSampled = decltype(sampled)::value;
    scatter_taps_kernel<acc_t, Grads, kSampled><<<grid, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        map_view<acc_t>(buffer), src, num_points, scale_y, scale_x, padding, grads);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace hypercolumn_ops
