// The small score-map products of the CUDA fused kernels and the projection entry points
// (score_projection.cuh).
//
// Small score maps without cuBLAS. On the H200 one cuBLAS product costs about 53 us of host time
// against 8 us for a plain launch (benchmarks/host_costs.py), several times the device time of a
// product of the sizes below, and a fused forward made three of them. So where a pixel-contiguous
// (NCHW) map has at most kProjectOutputs score channels and at most kProjectElements values, the
// package's kernels make the product. A block takes a tile of kProjectPixels pixels (a lane each,
// so every warp load reads consecutive pixels of one channel) and a chunk of kProjectChunk channels
// (the chunk's weights in shared memory, padded with zeros to kProjectOutputs outputs, so the inner
// loop reads a whole row of weights without a test per output); its warps take every
// kProjectWarps-th channel of the chunk, kProjectUnroll channels of loads in flight at a time, and
// add their sums in warp order in shared memory. Several chunks write float partials that
// project_sum_kernel adds in chunk order: the same bits on every run. Backward does the same for
// the feature gradient. The weight gradient takes tiles of kWeightGradPixels pixels and 32
// channels through shared memory (a lane per channel, a warp per 4 outputs), at most
// kWeightGradBlocks blocks over the pixels, each adding its tiles in order, and the blocks' partials
// in order. (The first version, a thread per pixel over 128 channels with a test per output, ran
// 40-60 us a product on the H200, 4x cuBLAS: four warps an SM waiting on one load or shared read
// at a time.)
#include "score_projection.cuh"

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <type_traits>

#include "checks.h"
#include "launch.h"

namespace hypercolumn_ops {
namespace cuda {
namespace {

constexpr int kProjectOutputs = 32;
constexpr int kProjectPixels = 32;
constexpr int kProjectWarps = 4;
constexpr int kProjectThreads = kProjectPixels * kProjectWarps;
constexpr int kProjectUnroll = 4;
constexpr int64_t kProjectChunk = 128;
constexpr int64_t kProjectElements = int64_t(1) << 22;
// The weight gradient: pixels a tile, channels a block (a lane each), outputs a warp (8 warps).
constexpr int kWeightGradPixels = 64;
constexpr int kWeightGradChannels = 32;
constexpr int kWeightGradOutputs = 4;
constexpr int kWeightGradThreads = 32 * kProjectOutputs / kWeightGradOutputs;
static_assert(kWeightGradThreads % kWeightGradPixels == 0, "a thread loads one pixel of each tile");
// Blocks over the pixels at most (partials that project_sum_kernel adds), and pixels at most: a
// larger map of few channels has too few blocks for its work and goes to cuBLAS.
constexpr int64_t kWeightGradBlocks = 64;
constexpr int64_t kWeightGradMaxPixels = 131072;

// A (B, H*W, C) pixel matrix (pixel_matrix) as the projection kernels see it: pixel p of the
// B * H*W runs over the images in turn, any strides.
template <typename ptr_t>
struct PixelMatrix {
  ptr_t data;
  int64_t stride_b, stride_p, stride_c;
  int64_t image_pixels;
  // Pixel p's channel 0.
  __device__ __forceinline__ ptr_t column(int64_t p) const {
    const int64_t b = p / image_pixels;
    return data + b * stride_b + (p - b * image_pixels) * stride_p;
  }
};

template <typename ptr_t>
PixelMatrix<ptr_t> pixel_matrix_view(const at::Tensor& m) {
  using scalar_t = std::remove_const_t<std::remove_pointer_t<ptr_t>>;
  return {m.data_ptr<scalar_t>(), m.stride(0), m.stride(1), m.stride(2), m.size(1)};
}

// The (outputs, channels) weight matrix of a projection, any strides.
template <typename scalar_t>
struct WeightMatrix {
  const scalar_t* data;
  int64_t stride_o, stride_c;
  int outputs;
};

template <typename scalar_t>
WeightMatrix<scalar_t> weight_matrix_view(const at::Tensor& m) {
  return {m.data_ptr<scalar_t>(), m.stride(0), m.stride(1), static_cast<int>(m.size(0))};
}

// Block y's chunk of kProjectChunk channels (from *first, *count of them) of the weights, into w,
// zeros past the last output. The caller synchronises before reading w.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_weight_chunk(const WeightMatrix<scalar_t>& weight, int64_t channels,
                                                  acc_t (*w)[kProjectOutputs], int64_t* first, int* count) {
  *first = static_cast<int64_t>(blockIdx.y) * kProjectChunk;
  *count = static_cast<int>(min(kProjectChunk, channels - *first));
  for (int k = threadIdx.x; k < *count * kProjectOutputs; k += blockDim.x) {
    const int c = k / kProjectOutputs, o = k - c * kProjectOutputs;
    w[c][o] = o < weight.outputs ? static_cast<acc_t>(weight.data[o * weight.stride_o + (*first + c) * weight.stride_c])
                                 : acc_t(0);
  }
}

// The shared memory of project_scores_kernel: the chunk's weights, then the warps' sums.
template <typename acc_t>
union ProjectShared {
  acc_t weights[kProjectChunk][kProjectOutputs];
  acc_t sums[kProjectWarps][kProjectOutputs][kProjectPixels + 1];  // + 1: a row's pixels on distinct banks
};

template <typename scalar_t, typename acc_t, typename out_t>
__global__ void __launch_bounds__(kProjectThreads)
    project_scores_kernel(PixelMatrix<const scalar_t*> pixels, int64_t num_pixels, int64_t channels,
                          WeightMatrix<scalar_t> weight, out_t* out) {
  __shared__ __align__(16) ProjectShared<acc_t> shared;
  int64_t first;
  int count;
  load_weight_chunk(weight, channels, shared.weights, &first, &count);
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t first_pixel = static_cast<int64_t>(blockIdx.x) * kProjectPixels;
  const int tile_pixels = static_cast<int>(min(static_cast<int64_t>(kProjectPixels), num_pixels - first_pixel));
  const scalar_t* column = pixels.column(first_pixel + min(lane, tile_pixels - 1)) + first * pixels.stride_c;
  acc_t sums[kProjectOutputs];
#pragma unroll
  for (int o = 0; o < kProjectOutputs; ++o) sums[o] = acc_t(0);
  for (int c = warp; c < count; c += kProjectWarps * kProjectUnroll) {
    acc_t values[kProjectUnroll];
#pragma unroll
    for (int u = 0; u < kProjectUnroll; ++u) {
      const int k = c + u * kProjectWarps;
      values[u] = k < count ? static_cast<acc_t>(column[k * pixels.stride_c]) : acc_t(0);
    }
#pragma unroll
    for (int u = 0; u < kProjectUnroll; ++u) {
      const int k = c + u * kProjectWarps;
      if (k < count) {  // the same for the whole warp
#pragma unroll
        for (int o = 0; o < kProjectOutputs; ++o) sums[o] += values[u] * shared.weights[k][o];
      }
    }
  }
  __syncthreads();  // every warp is done with the weights: their memory takes the sums
  const int outputs = weight.outputs;
#pragma unroll
  for (int o = 0; o < kProjectOutputs; ++o) {
    if (o < outputs) shared.sums[warp][o][lane] = sums[o];
  }
  __syncthreads();
  // The tile's outputs are tile_pixels * outputs consecutive values.
  out_t* destination = out + (static_cast<int64_t>(blockIdx.y) * num_pixels + first_pixel) * outputs;
  for (int i = threadIdx.x; i < tile_pixels * outputs; i += kProjectThreads) {
    const int t = i / outputs, o = i - t * outputs;
    acc_t sum = shared.sums[0][o][t];
#pragma unroll
    for (int w = 1; w < kProjectWarps; ++w) sum += shared.sums[w][o][t];
    destination[i] = static_cast<out_t>(sum);
  }
}

// out[i] = the sum over chunks of partial[chunk][i], in chunk order.
template <typename scalar_t, typename acc_t>
__global__ void project_sum_kernel(const acc_t* partial, int64_t chunks, int64_t size, scalar_t* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t sum = partial[i];
    for (int64_t k = 1; k < chunks; ++k) sum += partial[k * size + i];
    out[i] = static_cast<scalar_t>(sum);
  }
}

// out (contiguous, of the size of one chunk) = the sum of partial's chunks (dim 0), in order.
template <typename scalar_t, typename acc_t>
void sum_chunks(const at::Tensor& partial, const at::Tensor& out) {
  const int64_t size = out.numel();
  if (size == 0) return;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(size, 256), 1024));
  project_sum_kernel<scalar_t, acc_t><<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      partial.data_ptr<acc_t>(), partial.size(0), size, out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether project_scores_in_kernels makes the score map of `pixels` (B, H*W, C) and `outputs`
// score channels.
bool small_projection(const at::Tensor& pixels, int64_t outputs) {
  return pixels.stride(1) == 1 && outputs <= kProjectOutputs && pixels.numel() <= kProjectElements &&
         pixels.size(2) <= 65535 * int64_t(kWeightGradChannels);  // the weight gradient's grid y
}

at::Tensor project_scores_in_kernels(const at::Tensor& pixels, const at::Tensor& weight_matrix) {
  const int64_t batch = pixels.size(0), image_pixels = pixels.size(1), channels = pixels.size(2);
  const int64_t num_pixels = batch * image_pixels;
  const int outputs = static_cast<int>(weight_matrix.size(0));
  at::Tensor out = at::empty({batch, image_pixels, outputs}, pixels.options());
  if (num_pixels == 0 || outputs == 0) return out;
  if (channels == 0) return out.zero_();
  const int64_t chunks = ceil_div(channels, kProjectChunk);
  check_grid_y(chunks, "features");
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(ceil_div(num_pixels, kProjectPixels)), static_cast<unsigned>(chunks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pixels.scalar_type(), "project_scores", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto source = pixel_matrix_view<const scalar_t*>(pixels);
    const auto weight = weight_matrix_view<scalar_t>(weight_matrix);
    if (chunks == 1) {
      project_scores_kernel<scalar_t, acc_t, scalar_t><<<grid, kProjectThreads, 0, stream>>>(
          source, num_pixels, channels, weight, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const at::Tensor partial =
        at::empty({chunks, num_pixels, outputs}, pixels.options().dtype(accumulation_dtype(pixels.scalar_type())));
    project_scores_kernel<scalar_t, acc_t, acc_t><<<grid, kProjectThreads, 0, stream>>>(
        source, num_pixels, channels, weight, partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_chunks<scalar_t, acc_t>(partial, out);
  });
  return out;
}

// Gradient of a small projection's pixel matrix (B, H*W, C): grad_pixels[b, p, c] = the sum over
// score channels o of score_grad[b, p, o] W[o, c]. As project_scores_kernel: a lane per pixel of
// the tile holds its score gradients in registers (zeros past the last output), a warp per
// kProjectWarps-th channel of the chunk writes each of its channels once, kProjectUnroll at a time.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kProjectThreads)
    project_grad_pixels_kernel(const acc_t* score_grad, int64_t num_pixels, int64_t channels,
                               WeightMatrix<scalar_t> weight, PixelMatrix<scalar_t*> grad) {
  __shared__ __align__(16) acc_t w[kProjectChunk][kProjectOutputs];
  __shared__ acc_t tile_grads[kProjectOutputs][kProjectPixels + 1];
  int64_t first;
  int count;
  load_weight_chunk(weight, channels, w, &first, &count);
  const int outputs = weight.outputs;
  const int64_t first_pixel = static_cast<int64_t>(blockIdx.x) * kProjectPixels;
  const int tile_pixels = static_cast<int>(min(static_cast<int64_t>(kProjectPixels), num_pixels - first_pixel));
  // The tile's score gradients are tile_pixels * outputs consecutive values.
  for (int i = threadIdx.x; i < tile_pixels * outputs; i += kProjectThreads) {
    const int t = i / outputs, o = i - t * outputs;
    tile_grads[o][t] = score_grad[first_pixel * outputs + i];
  }
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane >= tile_pixels) return;  // no __syncthreads below
  acc_t g[kProjectOutputs];
#pragma unroll
  for (int o = 0; o < kProjectOutputs; ++o) g[o] = o < outputs ? tile_grads[o][lane] : acc_t(0);
  scalar_t* column = grad.column(first_pixel + lane) + first * grad.stride_c;
  for (int c = warp; c < count; c += kProjectWarps * kProjectUnroll) {
#pragma unroll
    for (int u = 0; u < kProjectUnroll; ++u) {
      const int k = c + u * kProjectWarps;
      if (k < count) {
        acc_t sum = 0;
#pragma unroll
        for (int o = 0; o < kProjectOutputs; ++o) sum += g[o] * w[k][o];
        column[k * grad.stride_c] = static_cast<scalar_t>(sum);
      }
    }
  }
}

// Partial weight gradient of a small projection: partial[x, o, c] = the sum over the pixels p of
// block x's tiles (x, x + gridDim.x, ...) of score_grad[p, o] x[p, c]. Each tile of
// kWeightGradPixels pixels and the block's kWeightGradChannels channels goes through shared
// memory, the features read with consecutive threads on consecutive pixels; then a lane per
// channel and a warp per kWeightGradOutputs outputs add the tile's pixels in order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWeightGradThreads)
    project_grad_weight_kernel(PixelMatrix<const scalar_t*> pixels, int64_t num_pixels, int64_t channels, int outputs,
                               const acc_t* score_grad, acc_t* partial) {
  __shared__ __align__(16) acc_t tile_grads[kWeightGradPixels][kProjectOutputs];
  __shared__ acc_t tile_values[kWeightGradPixels][kWeightGradChannels + 1];  // + 1: pixels on distinct banks
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t first_channel = static_cast<int64_t>(blockIdx.y) * kWeightGradChannels;
  const int channel_count = static_cast<int>(min(static_cast<int64_t>(kWeightGradChannels), channels - first_channel));
  const int first_output = warp * kWeightGradOutputs;
  acc_t sums[kWeightGradOutputs];
#pragma unroll
  for (int j = 0; j < kWeightGradOutputs; ++j) sums[j] = acc_t(0);
  for (int64_t first_pixel = static_cast<int64_t>(blockIdx.x) * kWeightGradPixels; first_pixel < num_pixels;
       first_pixel += static_cast<int64_t>(gridDim.x) * kWeightGradPixels) {
    const int tile_pixels = static_cast<int>(min(static_cast<int64_t>(kWeightGradPixels), num_pixels - first_pixel));
    for (int k = threadIdx.x; k < kWeightGradPixels * kProjectOutputs; k += kWeightGradThreads) {
      const int t = k / kProjectOutputs, o = k - t * kProjectOutputs;
      tile_grads[t][o] = t < tile_pixels && o < outputs ? score_grad[(first_pixel + t) * outputs + o] : acc_t(0);
    }
    {  // a thread keeps one pixel of the tile: its column is found once
      const int t = threadIdx.x % kWeightGradPixels;
      const scalar_t* column =
          pixels.column(first_pixel + min(t, tile_pixels - 1)) + first_channel * pixels.stride_c;
      for (int c = threadIdx.x / kWeightGradPixels; c < kWeightGradChannels;
           c += kWeightGradThreads / kWeightGradPixels) {
        tile_values[t][c] = t < tile_pixels && c < channel_count ? static_cast<acc_t>(column[c * pixels.stride_c])
                                                                 : acc_t(0);
      }
    }
    __syncthreads();
    if (first_output < outputs) {
#pragma unroll 8
      for (int t = 0; t < kWeightGradPixels; ++t) {
        const acc_t value = tile_values[t][lane];
#pragma unroll
        for (int j = 0; j < kWeightGradOutputs; ++j) sums[j] += tile_grads[t][first_output + j] * value;
      }
    }
    __syncthreads();  // before the next tile overwrites this one
  }
  if (lane >= channel_count) return;
#pragma unroll
  for (int j = 0; j < kWeightGradOutputs; ++j) {
    const int o = first_output + j;
    if (o < outputs) partial[(static_cast<int64_t>(blockIdx.x) * outputs + o) * channels + first_channel + lane] = sums[j];
  }
}

}  // namespace

at::Tensor pixel_matrix(const at::Tensor& t) {
  const int64_t height = t.size(2), width = t.size(3);
  int64_t pixel_stride;
  if (height * width == 1) {
    pixel_stride = 1;
  } else if (width == 1) {
    pixel_stride = t.stride(2);
  } else if (height == 1 || t.stride(2) == width * t.stride(3)) {
    pixel_stride = t.stride(3);
  } else {
    return {};
  }
  if (pixel_stride != 1 && t.stride(1) != 1 && t.size(1) > 1 && height * width > 1) return {};
  return t.as_strided({t.size(0), height * width, t.size(1)}, {t.stride(0), pixel_stride, t.stride(1)},
                      t.storage_offset());
}

at::Tensor stacked_pixels(const at::Tensor& pixels) {
  if (pixels.size(0) != 1 && pixels.stride(0) != pixels.size(1) * pixels.stride(1)) return {};
  return pixels.view({-1, pixels.size(2)});
}

// A small one of at most kWeightGradMaxPixels pixels.
bool small_projection_grads(const at::Tensor& pixels, int64_t outputs) {
  return small_projection(pixels, outputs) && pixels.size(0) * pixels.size(1) <= kWeightGradMaxPixels;
}

at::Tensor project_grads_in_kernels(const at::Tensor& score_grad, const at::Tensor& pixels,
                                    const at::Tensor& weight_matrix, const at::Tensor& grad_pixels) {
  const int64_t num_pixels = pixels.size(0) * pixels.size(1), channels = pixels.size(2);
  const int outputs = static_cast<int>(weight_matrix.size(0));
  at::Tensor grad_weight = at::empty({outputs, channels}, weight_matrix.options());
  if (channels == 0) return grad_weight;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t channel_chunks = ceil_div(channels, kProjectChunk);
  const int64_t weight_blocks = std::min(ceil_div(num_pixels, int64_t(kWeightGradPixels)), kWeightGradBlocks);
  const int64_t weight_chunks = ceil_div(channels, kWeightGradChannels);
  check_grid_y(channel_chunks, "features");
  check_grid_y(weight_chunks, "features");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pixels.scalar_type(), "project_grads", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const acc_t* g = score_grad.data_ptr<acc_t>();
    const dim3 pixel_grid(static_cast<unsigned>(ceil_div(num_pixels, kProjectPixels)),
                          static_cast<unsigned>(channel_chunks));
    project_grad_pixels_kernel<scalar_t, acc_t><<<pixel_grid, kProjectThreads, 0, stream>>>(
        g, num_pixels, channels, weight_matrix_view<scalar_t>(weight_matrix), pixel_matrix_view<scalar_t*>(grad_pixels));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor partial = at::empty({weight_blocks, outputs, channels}, score_grad.options());
    const dim3 weight_grid(static_cast<unsigned>(weight_blocks), static_cast<unsigned>(weight_chunks));
    project_grad_weight_kernel<scalar_t, acc_t><<<weight_grid, kWeightGradThreads, 0, stream>>>(
        pixel_matrix_view<const scalar_t*>(pixels), num_pixels, channels, outputs, g, partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_chunks<scalar_t, acc_t>(partial, grad_weight);
  });
  return grad_weight;
}

// cuBLAS's product is one 2-D product where the images' pixels stack (a 2-D product costs the
// host less).
at::Tensor project_scores(const at::Tensor& feature, const at::Tensor& weight) {
  const at::Tensor pixels = pixel_matrix(feature);
  const at::Tensor weight_matrix = weight.reshape({-1, feature.size(1)});
  if (small_projection(pixels, weight_matrix.size(0))) return project_scores_in_kernels(pixels, weight_matrix);
  const at::Tensor transposed = weight_matrix.t();
  const at::Tensor stacked = stacked_pixels(pixels);
  if (stacked.defined()) return at::mm(stacked, transposed).view({pixels.size(0), pixels.size(1), -1});
  return at::bmm(pixels, transposed.unsqueeze(0).expand({feature.size(0), -1, -1}));
}

}  // namespace cuda
}  // namespace hypercolumn_ops
