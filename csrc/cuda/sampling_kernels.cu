// CUDA kernels of sparse_hypercolumn and box_hypercolumn (forward and backward).
//
// Forward, channels_last features: a block takes a tile of kTilePoints points and a chunk of one
// layer's channels: it computes each point's four taps once (shared memory), then every thread
// walks the tile for its channel(s). A warp reads consecutive channels of one pixel, in 16-byte
// loads where the strides allow. Every kernel reads any strides in place, never copies.
//
// Forward, box grids on maps whose channels are not contiguous (NCHW, as backbones return them):
// a thread per grid place walks a chunk of channels (sample_forward_planar_kernel). A warp's
// neighbouring grid places tap neighbouring pixels of one channel plane and write neighbouring
// outputs of the (R, C, oh, ow) result, where lanes over channels would each touch their own plane
// and their own output sector.
//
// Forward, sparse points on such maps (sample_forward_transposed_kernel): a warp's lanes take 32
// points of one channel plane for the loads, so that points on a small map share its few cache
// lines (a 16 x 16 float plane is 8 lines), where lanes over channels touch 32 planes per load.
// The samples go through a shared tile, and lanes over channels store them: the (N, C) result is
// channel-contiguous.
//
// Box grids whose cells average several samples (sampling_ratio other than 1, or aligned=false;
// PointSource::sampled): each thread loops over its cell's samples where it reads a channel
// (gather and for_each_sample in points.cuh), the samples' taps recomputed there, in the kernels
// above without their wide loads or load groups: per channel over a tile of points
// (channels_last) or per grid place over a chunk of channels (other layouts). No sample count is
// read back: adaptive counts are found per point, in the kernel.
//
// Backward scatters each sample's gradient onto its taps (scatter_to_taps in tap_scatter_launch.cuh: atomics,
// or per-pixel sums in a fixed order under torch.use_deterministic_algorithms(True)) into float32
// (float64) buffers, converted to the features' dtype at the end.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "checks.h"
#include "launch.h"
#include "points.cuh"
#include "poison.h"
#include "tap_scatter.cuh"
#include "tap_scatter_launch.cuh"

namespace hypercolumn_ops {
namespace cuda {
namespace {

// A point's taps for sampling: an invalid point reads image 0 (point_at's b), pixel (0, 0), with
// NaN weights, which gives a NaN sample without a branch among the loads (sampled cells:
// sampled_value).
template <bool kSampled, typename acc_t, typename scalar_t>
__device__ __forceinline__ PointTaps<acc_t, kSampled> sample_taps(const PointSource<acc_t>& src, const Point<acc_t>& pt,
                                                        const MapView<const scalar_t*>& map, acc_t scale_y,
                                                        acc_t scale_x, int64_t padding) {
  PointTaps<acc_t, kSampled> point = point_taps<kSampled>(src, pt, map.height, map.width, scale_y, scale_x, padding);
  if (!point.valid) point.taps = {0, 0, 0, 0, acc_t(NAN), acc_t(NAN), acc_t(NAN), acc_t(NAN)};
  return point;
}

// Channel c of a point of a sampled box grid: its samples summed, NaN for an invalid point.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t sampled_value(const MapView<const scalar_t*>& map, const PointTaps<acc_t, true>& taps,
                                               int64_t c) {
  return taps.valid ? gather<true>(map, taps, c) : acc_t(NAN);
}

// Channels c0 .. c0 + kGroup - 1 below `end` of one point, from a thread: every tap load first
// (4 x kGroup in flight; a short group repeats its last channel), then store(c, sample) each.
template <int kGroup, typename scalar_t, typename acc_t, typename Store>
__device__ __forceinline__ void sample_channel_group(const MapView<const scalar_t*>& map, const PointTaps<acc_t, false>& taps,
                                                     int64_t c0, int64_t end, Store store) {
  Pack<scalar_t, 1> loaded[kGroup][4];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) load_taps<1>(map, taps, min(c0 + g, end - 1), loaded[g]);
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    if (c0 + g < end) {
      acc_t value[1];
      blend_taps<1>(taps, loaded[g], value);
      store(c0 + g, value[0]);
    }
  }
}

template <typename scalar_t, typename acc_t, int VEC, bool kSampled>
__global__ void __launch_bounds__(kChannelThreads)
    sample_forward_kernel(MapView<const scalar_t*> map, PointSource<acc_t> src, int64_t num_points, acc_t scale_y,
                          acc_t scale_x, int64_t padding, scalar_t* out, OutputStrides out_strides,
                          int64_t column_offset) {
  __shared__ PointTaps<acc_t, kSampled> taps[kTilePoints];
  __shared__ int64_t out_base[kTilePoints];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTilePoints;
  const int count = static_cast<int>(min(static_cast<int64_t>(kTilePoints), num_points - first));
  for (int t = threadIdx.x; t < count; t += blockDim.x) {
    const Point<acc_t> pt = point_at(src, first + t);
    taps[t] = sample_taps<kSampled>(src, pt, map, scale_y, scale_x, padding);
    out_base[t] = output_offset(out_strides, pt);
  }
  __syncthreads();
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c >= map.channels) return;
  if constexpr (kSampled) {  // a loop over each cell's samples (launched with VEC = 1)
    static_assert(VEC == 1, "sampled cells load one channel at a time");
    for (int t = 0; t < count; ++t) {
      out[out_base[t] + (column_offset + c) * out_strides.column] =
          static_cast<scalar_t>(sampled_value(map, taps[t], c));
    }
  } else {
    // Points in groups: a thread issues all the tap loads of a group, then blends and stores, so
    // that it has 4 x kGroup loads in flight (a store could alias the map, which keeps the compiler
    // from moving a later point's loads above it). No branch among the loads: invalid points read
    // safe taps with NaN weights, and a short last group repeats its last point.
    constexpr int kGroup = VEC == 1 ? 8 : 2;
    for (int t0 = 0; t0 < count; t0 += kGroup) {
      Pack<scalar_t, VEC> loaded[kGroup][4];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) load_taps<VEC>(map, taps[min(t0 + g, count - 1)], c, loaded[g]);
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        if (t0 + g < count) {
          acc_t value[VEC];
          blend_taps<VEC>(taps[t0 + g], loaded[g], value);
          scalar_t* destination = out + out_base[t0 + g] + (column_offset + c) * out_strides.column;
#pragma unroll
          for (int v = 0; v < VEC; ++v) destination[v * out_strides.column] = static_cast<scalar_t>(value[v]);
        }
      }
    }
  }
}

// Grid places per block of sample_forward_planar_kernel (a thread each), channels per block, and
// channels per sample_channel_group.
constexpr int kPlanarPoints = 128;
constexpr int kPlanarChannels = 16;
constexpr int kPlanarGroup = 4;

template <typename scalar_t, typename acc_t, bool kSampled>
__global__ void __launch_bounds__(kPlanarPoints)
    sample_forward_planar_kernel(MapView<const scalar_t*> map, PointSource<acc_t> src, int64_t num_points,
                                 acc_t scale_y, acc_t scale_x, int64_t padding, scalar_t* out,
                                 OutputStrides out_strides, int64_t column_offset) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= num_points) return;
  const Point<acc_t> pt = point_at(src, p);
  const PointTaps<acc_t, kSampled> taps = sample_taps<kSampled>(src, pt, map, scale_y, scale_x, padding);
  scalar_t* destination = out + output_offset(out_strides, pt) + column_offset * out_strides.column;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * kPlanarChannels;
  const int64_t end = min(first + kPlanarChannels, map.channels);
  if constexpr (kSampled) {
    for (int64_t c = first; c < end; ++c)
      destination[c * out_strides.column] = static_cast<scalar_t>(sampled_value(map, taps, c));
  } else {
    for (int64_t c0 = first; c0 < end; c0 += kPlanarGroup) {
      sample_channel_group<kPlanarGroup>(map, taps, c0, end, [&](int64_t c, acc_t value) {
        destination[c * out_strides.column] = static_cast<scalar_t>(value);
      });
    }
  }
}

// Points per block of sample_forward_transposed_kernel (a warp's lanes), channels per block,
// threads, and channels per sample_channel_group.
constexpr int kTransposePoints = 32;
constexpr int kTransposeChannels = 64;
constexpr int kTransposeThreads = 128;
constexpr int kTransposeGroup = 4;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTransposeThreads)
    sample_forward_transposed_kernel(MapView<const scalar_t*> map, PointSource<acc_t> src, int64_t num_points,
                                     acc_t scale_y, acc_t scale_x, int64_t padding, scalar_t* out,
                                     OutputStrides out_strides, int64_t column_offset) {
  // One padding column: the stores read a column of the tile, 33 elements apart, on distinct banks.
  __shared__ scalar_t tile[kTransposeChannels][kTransposePoints + 1];
  __shared__ int64_t out_base[kTransposePoints];
  constexpr int kWarps = kTransposeThreads / 32;
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTransposePoints;
  const int count = static_cast<int>(min(static_cast<int64_t>(kTransposePoints), num_points - first));
  const int64_t first_channel = static_cast<int64_t>(blockIdx.y) * kTransposeChannels;
  const int channels = static_cast<int>(min(static_cast<int64_t>(kTransposeChannels), map.channels - first_channel));
  // Loads: lane = point (lanes past a short tile repeat its last point and store nothing).
  const Point<acc_t> pt = point_at(src, first + min(lane, count - 1));
  const PointTaps<acc_t, false> taps = sample_taps<false>(src, pt, map, scale_y, scale_x, padding);
  if (warp == 0) out_base[lane] = output_offset(out_strides, pt);
  for (int k0 = warp * kTransposeGroup; k0 < channels; k0 += kWarps * kTransposeGroup) {
    sample_channel_group<kTransposeGroup>(map, taps, first_channel + k0, first_channel + channels,
                                          [&](int64_t c, acc_t value) {
                                            tile[c - first_channel][lane] = static_cast<scalar_t>(value);
                                          });
  }
  __syncthreads();
  // Stores: lane = channel, a warp per point.
  for (int t = warp; t < count; t += kWarps) {
    scalar_t* destination = out + out_base[t] + (column_offset + first_channel) * out_strides.column;
    for (int k = lane; k < channels; k += 32) destination[k * out_strides.column] = tile[k][t];
  }
}

// ----------------------------------------------------------------------------- host side

// How a call samples: its padding and, for box grids, roi_align's sampling_ratio and aligned (1
// and true for points).
struct Sampling {
  int64_t padding, sampling_ratio;
  bool aligned;
};

template <typename acc_t>
PointSource<acc_t> point_source(const at::Tensor& rows, int64_t grid_h, int64_t grid_w, int64_t batch,
                                const Sampling& sampling) {
  return {rows.data_ptr<acc_t>(), nullptr, nullptr, grid_h, grid_w, batch, 1, sampling.sampling_ratio,
          sampling.aligned};
}

// Fills out (rows, sum C_l) or (rows, sum C_l, oh, ow): one launch per layer, each element once.
void sample_forward(at::TensorList features, const at::Tensor& rows, int64_t grid_h, int64_t grid_w,
                    int64_t num_points, const LayerScales& scales, const Sampling& sampling, const at::Tensor& out) {
  if (num_points == 0) return;
  // No image: every row's batch index is invalid, and the maps hold nothing to read.
  if (features[0].size(0) == 0) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
    return;
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  const OutputStrides strides = output_strides(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "sample_forward", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    constexpr int kWide = static_cast<int>(16 / sizeof(scalar_t));
    const auto src = point_source<acc_t>(rows, grid_h, grid_w, features[0].size(0), sampling);
    const int64_t padding = sampling.padding;
    int64_t column_offset = 0;
    for (size_t l = 0; l < features.size(); ++l) {
      const at::Tensor& f = features[l];
      const int64_t channels = f.size(1);
      if (channels == 0) continue;
      // Blocks of `threads` threads, each taking `block_points` points and `block_columns` of the
      // layer's `columns` (channels, or vectors of channels).
      const auto launch = [&](auto kernel, int64_t block_points, int64_t columns, int64_t block_columns, int threads) {
        const int64_t chunks = ceil_div(columns, block_columns);
        check_grid_y(chunks, "features");
        const dim3 grid(static_cast<unsigned>(ceil_div(num_points, block_points)), static_cast<unsigned>(chunks));
        kernel<<<grid, threads, 0, stream>>>(const_map_view<scalar_t>(f), src, num_points,
                                             static_cast<acc_t>(scales.y[l]), static_cast<acc_t>(scales.x[l]), padding,
                                             out.data_ptr<scalar_t>(), strides, column_offset);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (f.stride(1) != 1 && grid_w == 0) {
        launch(sample_forward_transposed_kernel<scalar_t, acc_t>, kTransposePoints, channels, kTransposeChannels,
               kTransposeThreads);
      } else if (src.sampled()) {
        if (f.stride(1) != 1) {
          launch(sample_forward_planar_kernel<scalar_t, acc_t, true>, kPlanarPoints, channels, kPlanarChannels,
                 kPlanarPoints);
        } else {
          const int threads = channel_threads(channels);
          launch(sample_forward_kernel<scalar_t, acc_t, 1, true>, kTilePoints, channels, threads, threads);
        }
      } else if (f.stride(1) != 1) {
        launch(sample_forward_planar_kernel<scalar_t, acc_t, false>, kPlanarPoints, channels, kPlanarChannels,
               kPlanarPoints);
      } else if (wide_loads_allowed(f, kWide)) {
        const int threads = channel_threads(channels / kWide);
        launch(sample_forward_kernel<scalar_t, acc_t, kWide, false>, kTilePoints, channels / kWide, threads, threads);
      } else {
        const int threads = channel_threads(channels);
        launch(sample_forward_kernel<scalar_t, acc_t, 1, false>, kTilePoints, channels, threads, threads);
      }
      column_offset += channels;
    }
  });
}

std::vector<at::Tensor> sample_backward(const at::Tensor& grad_out, at::TensorList features, const at::Tensor& rows,
                                        int64_t grid_h, int64_t grid_w, int64_t num_points, const LayerScales& scales,
                                        const Sampling& sampling) {
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const OutputStrides strides = output_strides(grad_out);
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "sample_backward", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto src = point_source<acc_t>(rows, grid_h, grid_w, features[0].size(0), sampling);
    int64_t column_offset = 0;
    for (size_t l = 0; l < features.size(); ++l) {
      const at::Tensor& f = features[l];
      const at::Tensor buffer = accumulation_buffer(f);
      const SampleGrads<scalar_t, acc_t> sample_grads{grad_out.data_ptr<scalar_t>(), strides, column_offset};
      scatter_to_taps<acc_t>(buffer, src, num_points, static_cast<acc_t>(scales.y[l]), static_cast<acc_t>(scales.x[l]),
                             sampling.padding, sample_grads, deterministic);
      grads.push_back(feature_grad(f, buffer));
      column_offset += f.size(1);
    }
  });
  return grads;
}

at::Tensor sparse_hypercolumn_cuda(at::TensorList features, const at::Tensor& points, at::IntArrayRef image_size,
                                   at::ArrayRef<double> spatial_scale, int64_t padding) {
  const SamplingArguments args =
      check_sampling(features, kDeviceType, "points", points, 3, image_size, spatial_scale, padding);
  const c10::cuda::CUDAGuard guard(features[0].device());
  at::Tensor out = new_output({args.count, args.channels}, features[0].options());
  sample_forward(features, args.rows, 0, 0, args.count, args.scales, Sampling{padding, 1, true}, out);
  return out;
}

std::vector<at::Tensor> sparse_hypercolumn_backward_cuda(const at::Tensor& grad, at::TensorList features,
                                                         const at::Tensor& points, at::IntArrayRef image_size,
                                                         at::ArrayRef<double> spatial_scale, int64_t padding) {
  const SamplingArguments args =
      check_sampling(features, kDeviceType, "points", points, 3, image_size, spatial_scale, padding);
  check_grad(grad, {args.count, args.channels}, features[0]);
  const c10::cuda::CUDAGuard guard(features[0].device());
  return sample_backward(grad, features, args.rows, 0, 0, args.count, args.scales, Sampling{padding, 1, true});
}

at::Tensor box_hypercolumn_cuda(at::TensorList features, const at::Tensor& boxes, int64_t output_height,
                                int64_t output_width, at::IntArrayRef image_size, at::ArrayRef<double> spatial_scale,
                                int64_t padding, int64_t sampling_ratio, bool aligned) {
  const SamplingArguments args =
      check_sampling(features, kDeviceType, "boxes", boxes, 5, image_size, spatial_scale, padding);
  check_output_size(output_height, output_width);
  check_sampling_ratio(sampling_ratio);
  const c10::cuda::CUDAGuard guard(features[0].device());
  at::Tensor out = new_output({args.count, args.channels, output_height, output_width}, features[0].options());
  sample_forward(features, args.rows, output_height, output_width, args.count * output_height * output_width,
                 args.scales, Sampling{padding, sampling_ratio, aligned}, out);
  return out;
}

std::vector<at::Tensor> box_hypercolumn_backward_cuda(const at::Tensor& grad, at::TensorList features,
                                                      const at::Tensor& boxes, int64_t output_height,
                                                      int64_t output_width, at::IntArrayRef image_size,
                                                      at::ArrayRef<double> spatial_scale, int64_t padding,
                                                      int64_t sampling_ratio, bool aligned) {
  const SamplingArguments args =
      check_sampling(features, kDeviceType, "boxes", boxes, 5, image_size, spatial_scale, padding);
  check_output_size(output_height, output_width);
  check_sampling_ratio(sampling_ratio);
  check_grad(grad, {args.count, args.channels, output_height, output_width}, features[0]);
  const c10::cuda::CUDAGuard guard(features[0].device());
  return sample_backward(grad, features, args.rows, output_height, output_width,
                         args.count * output_height * output_width, args.scales,
                         Sampling{padding, sampling_ratio, aligned});
}

}  // namespace

TORCH_LIBRARY_IMPL(hypercolumn_ops, CUDA, m) {
  m.impl("sparse_hypercolumn", &sparse_hypercolumn_cuda);
  m.impl("sparse_hypercolumn_backward", &sparse_hypercolumn_backward_cuda);
  m.impl("box_hypercolumn", &box_hypercolumn_cuda);
  m.impl("box_hypercolumn_backward", &box_hypercolumn_backward_cuda);
}

}  // namespace cuda
}  // namespace hypercolumn_ops
