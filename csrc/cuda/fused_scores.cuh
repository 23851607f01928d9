// The scores pass of the CUDA fused kernels, shared by their forward and backward: the kernel and
// its launches.
//
// Forward is one sampling pass over all layers: a block takes a tile of points (and a chunk of
// outputs; FusedTile), keeps their scores s_k for the <= 4 classifier cells whose location weight
// is non-zero in shared memory, and per layer either
//   order 0: samples a chunk of channels of every point into shared memory and takes
//            one warp-wide dot product per (point, cell, output) with the cell's classifier row, or
//   order 1: samples the layer's projected score map (B, H_l * W_l, NC * KK * M), made from a view
//            of the map before the launch (one 1x1 convolution: project_scores_kernel for small
//            products of NCHW maps, cuBLAS otherwise);
// then adds the bias, applies the activation per cell, blends with the location weights and writes
// each output once. The hypercolumns themselves are never stored. A box grid whose cells average
// several samples gathers each of them in both orders (gather in points.cuh).
//
// Backward runs the same pass (kBackward) to store each point's score gradients per slot.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fused_call.cuh"
#include "hypercolumn_math.h"
#include "launch.h"
#include "points.cuh"

namespace hypercolumn_ops {
namespace cuda {

// A block's tile: `points` points x `outputs` outputs, features sampled `channels` at a time in
// order 0.
template <int kPoints, int kOutputs, int kChannels>
struct FusedTile {
  static constexpr int points = kPoints, outputs = kOutputs, channels = kChannels;
};
// M > 4 outputs per cell: 16 points x 32 outputs.
using WideTile = FusedTile<16, 32, 128>;
// M <= 4 (figure-ground's M = 1): 64 points x 4 outputs, so that the 256 threads of a block find
// (point, slot, output) work to share; its shared tiles stay within 48 KB in float64 too.
using TallTile = FusedTile<64, 4, 32>;
constexpr int kFusedThreads = 256;
// Layers per launch (kernel parameters); more layers run in several launches that carry the raw
// scores from one to the next.
constexpr int kMaxFusedLayers = 12;
constexpr int kSlots = 4;  // classifier cells around a point (location_weights)

template <typename scalar_t, typename acc_t>
struct FusedLayers {
  MapView<const scalar_t*> map[kMaxFusedLayers];  // features (order 0) or score maps (order 1)
  const scalar_t* weight[kMaxFusedLayers];        // (NC, KK, M, C_l) contiguous, order 0
  acc_t scale_y[kMaxFusedLayers], scale_x[kMaxFusedLayers];
  int order[kMaxFusedLayers];
  int count;
};

template <typename scalar_t, typename acc_t>
struct FusedParams {
  int64_t grid_k, cells, outputs, padding, activation;
  const scalar_t* bias;  // (rows, KK, M) with strides, or null
  int64_t bias_row, bias_cell, bias_output;
  scalar_t* out;  // forward output
  OutputStrides out_strides;
  const scalar_t* grad_out;  // backward: gradient of the output
  OutputStrides grad_strides;
  acc_t* slot_grads;         // backward: (P, 4, M) score gradients per location slot
  int64_t* slot_keys;        // backward: (P, 4) label * KK + cell of each slot, -1 where it takes none
  const acc_t* partial_in;   // (P, 4, M) raw scores of earlier layers, or null
  acc_t* partial_out;        // (P, 4, M) raw scores for later layers, or null (then finish)
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

template <typename scalar_t, typename acc_t, bool kBackward, typename Tile, bool kSampled>
__global__ void __launch_bounds__(kFusedThreads)
    fused_scores_kernel(FusedLayers<scalar_t, acc_t> layers, PointSource<acc_t> src, int64_t num_points,
                        FusedParams<scalar_t, acc_t> prm) {
  constexpr int kFusedPoints = Tile::points, kFusedOutputs = Tile::outputs, kFusedChannels = Tile::channels;
  __shared__ Point<acc_t> points[kFusedPoints];
  __shared__ LocationWeights<acc_t> slots[kFusedPoints];
  __shared__ PointTaps<acc_t, kSampled> taps[kFusedPoints];
  __shared__ acc_t scores[kFusedPoints][kSlots][kFusedOutputs];
  __shared__ acc_t column[kFusedPoints][kFusedChannels];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warps = blockDim.x / 32;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kFusedPoints;
  const int count = static_cast<int>(min(static_cast<int64_t>(kFusedPoints), num_points - first));
  const int64_t outputs = prm.outputs;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kFusedOutputs;
  const int mcount = static_cast<int>(min(static_cast<int64_t>(kFusedOutputs), outputs - m0));

  if (tid < count) {
    const Point<acc_t> pt = point_at(src, first + tid);
    points[tid] = pt;
    slots[tid] = location_weights<acc_t>(pt.u, pt.v, prm.grid_k);
  }
  for (int e = tid; e < count * kSlots * mcount; e += blockDim.x) {
    const int p = e / (kSlots * mcount), j = (e / mcount) % kSlots, m = e % mcount;
    scores[p][j][m] = prm.partial_in != nullptr ? prm.partial_in[((first + p) * kSlots + j) * outputs + m0 + m]
                                                : acc_t(0);
  }
  __syncthreads();

  for (int l = 0; l < layers.count; ++l) {
    const MapView<const scalar_t*>& map = layers.map[l];
    if (tid < count) {
      taps[tid] = point_taps<kSampled>(src, points[tid], map.height, map.width, layers.scale_y[l],
                                       layers.scale_x[l], prm.padding);
    }
    __syncthreads();
    if (layers.order[l] == kOrderSampleFeatures) {
      const scalar_t* weight = layers.weight[l];
      for (int64_t c0 = 0; c0 < map.channels; c0 += kFusedChannels) {
        const int chunk = static_cast<int>(min(static_cast<int64_t>(kFusedChannels), map.channels - c0));
        for (int e = tid; e < count * kFusedChannels; e += blockDim.x) {
          const int p = e / kFusedChannels, cc = e % kFusedChannels;
          column[p][cc] = (cc < chunk && taps[p].valid) ? gather<kSampled>(map, taps[p], c0 + cc) : acc_t(0);
        }
        __syncthreads();
        // One warp per (point, slot, output): the branch below is uniform over the warp.
        for (int task = warp; task < count * kSlots * mcount; task += warps) {
          const int p = task / (kSlots * mcount), j = (task / mcount) % kSlots, m = task % mcount;
          if (!points[p].valid || slots[p].alpha[j] == acc_t(0)) continue;
          const scalar_t* row =
              weight + ((points[p].label * prm.cells + slots[p].cell[j]) * outputs + m0 + m) * map.channels + c0;
          acc_t dot = 0;
          for (int cc = lane; cc < chunk; cc += 32) dot += static_cast<acc_t>(row[cc]) * column[p][cc];
          dot = warp_sum(dot);
          if (lane == 0) scores[p][j][m] += dot;
        }
        __syncthreads();
      }
    } else {
      for (int e = tid; e < count * kSlots * mcount; e += blockDim.x) {
        const int p = e / (kSlots * mcount), j = (e / mcount) % kSlots, m = e % mcount;
        if (!points[p].valid || slots[p].alpha[j] == acc_t(0)) continue;
        const int64_t channel = (points[p].label * prm.cells + slots[p].cell[j]) * outputs + m0 + m;
        scores[p][j][m] += gather<kSampled>(map, taps[p], channel);
      }
      __syncthreads();
    }
  }

  if (prm.partial_out != nullptr) {
    for (int e = tid; e < count * kSlots * mcount; e += blockDim.x) {
      const int p = e / (kSlots * mcount), j = (e / mcount) % kSlots, m = e % mcount;
      prm.partial_out[((first + p) * kSlots + j) * outputs + m0 + m] = scores[p][j][m];
    }
    return;
  }
  for (int e = tid; e < count * mcount; e += blockDim.x) {
    const int p = e / mcount, m = e % mcount;
    const Point<acc_t>& pt = points[p];
    const int64_t output = m0 + m;
    // Activated score and its derivative per slot; the bias is a per-row term of each cell.
    acc_t activated[kSlots], slope[kSlots];
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      activated[j] = 0;
      slope[j] = 0;
      if (!pt.valid || slots[p].alpha[j] == acc_t(0)) continue;
      acc_t s = scores[p][j][m];
      if (prm.bias != nullptr) {
        s += static_cast<acc_t>(prm.bias[pt.row * prm.bias_row + slots[p].cell[j] * prm.bias_cell +
                                         output * prm.bias_output]);
      }
      if (prm.activation == kActivationSigmoid) {
        const acc_t a = sigmoid<acc_t>(s);
        activated[j] = a;
        slope[j] = a * (acc_t(1) - a);
      } else {
        activated[j] = s;
        slope[j] = 1;
      }
    }
    if (!kBackward) {
      acc_t value = static_cast<acc_t>(NAN);
      if (pt.valid) {
        value = 0;
#pragma unroll
        for (int j = 0; j < kSlots; ++j) {
          if (slots[p].alpha[j] != acc_t(0)) value += slots[p].alpha[j] * activated[j];
        }
      }
      prm.out[output_offset(prm.out_strides, pt) + output * prm.out_strides.column] = static_cast<scalar_t>(value);
    } else {
      const acc_t g = pt.valid ? static_cast<acc_t>(prm.grad_out[output_offset(prm.grad_strides, pt) +
                                                                  output * prm.grad_strides.column])
                               : acc_t(0);
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        const bool used = pt.valid && slots[p].alpha[j] != acc_t(0);
        prm.slot_grads[((first + p) * kSlots + j) * outputs + output] =
            used ? g * slots[p].alpha[j] * slope[j] : acc_t(0);
        if (m == 0 && blockIdx.y == 0) {
          prm.slot_keys[(first + p) * kSlots + j] = used ? pt.label * prm.cells + slots[p].cell[j] : -1;
        }
      }
    }
  }
}

// Score map (B, H*W, N) seen as a (B, N, H, W) map.
template <typename ptr_t>
MapView<ptr_t> score_map_view(ptr_t data, const at::Tensor& feature, int64_t channels) {
  const int64_t height = feature.size(2), width = feature.size(3);
  return {data, channels, height, width, height * width * channels, 1, width * channels, channels};
}

// Runs fused_scores_kernel over every layer, kMaxFusedLayers at a time, in one tile shape
// (launch_fused_scores picks it); prm.out / prm.slot_grads receive the result of the last launch.
// The backward of a linear blend needs no scores: there `maps` is empty and one launch over no
// layers writes the slot gradients.
template <typename scalar_t, typename acc_t, bool kBackward, typename Tile>
void launch_fused_tiles(at::TensorList features, const FusedArgs& a, const std::vector<at::Tensor>& maps,
                        FusedParams<scalar_t, acc_t> prm) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto src = fused_source<acc_t>(a, features[0].size(0));
  const int64_t layers = static_cast<int64_t>(maps.size());
  const int64_t output_blocks = ceil_div(a.outputs, Tile::outputs);
  check_grid_y(output_blocks, "weights (M outputs)");
  const dim3 grid(static_cast<unsigned>(ceil_div(a.num_points, Tile::points)), static_cast<unsigned>(output_blocks));
  at::Tensor partial_in, partial_out;
  for (int64_t start = 0; start == 0 || start < layers; start += kMaxFusedLayers) {
    const int64_t stop = std::min(layers, start + kMaxFusedLayers);
    FusedLayers<scalar_t, acc_t> pack{};
    pack.count = static_cast<int>(stop - start);
    for (int64_t l = start; l < stop; ++l) {
      const int64_t i = l - start;
      pack.order[i] = static_cast<int>(a.orders[l]);
      pack.scale_y[i] = static_cast<acc_t>(a.scales.y[l]);
      pack.scale_x[i] = static_cast<acc_t>(a.scales.x[l]);
      pack.weight[i] = a.weights[l].data_ptr<scalar_t>();
      pack.map[i] = a.orders[l] == kOrderProjectScores
                        ? score_map_view<const scalar_t*>(maps[l].data_ptr<scalar_t>(), features[l], maps[l].size(2))
                        : const_map_view<scalar_t>(features[l]);
    }
    FusedParams<scalar_t, acc_t> p = prm;
    p.partial_in = partial_in.defined() ? partial_in.data_ptr<acc_t>() : nullptr;
    if (stop < layers) {
      partial_out = at::empty({a.num_points, kSlots, a.outputs}, features[0].options().dtype(
                                                                      c10::CppTypeToScalarType<acc_t>::value));
      p.partial_out = partial_out.data_ptr<acc_t>();
    } else {
      p.partial_out = nullptr;
    }
    with_sampling(src.sampled(), [&](auto sampled) {
      constexpr bool kSampled = decltype(sampled)::value;
      fused_scores_kernel<scalar_t, acc_t, kBackward, Tile, kSampled><<<grid, kFusedThreads, 0, stream>>>(
          pack, src, a.num_points, p);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    partial_in = partial_out;
  }
}

template <typename scalar_t, typename acc_t, bool kBackward>
void launch_fused_scores(at::TensorList features, const FusedArgs& a, const std::vector<at::Tensor>& maps,
                         FusedParams<scalar_t, acc_t> prm) {
  if (a.outputs <= TallTile::outputs) {
    launch_fused_tiles<scalar_t, acc_t, kBackward, TallTile>(features, a, maps, prm);
  } else {
    launch_fused_tiles<scalar_t, acc_t, kBackward, WideTile>(features, a, maps, prm);
  }
}

template <typename scalar_t, typename acc_t>
FusedParams<scalar_t, acc_t> fused_params(const FusedArgs& a, int64_t padding, int64_t activation) {
  FusedParams<scalar_t, acc_t> prm{};
  prm.grid_k = a.grid_k;
  prm.cells = a.cells;
  prm.outputs = a.outputs;
  prm.padding = padding;
  prm.activation = activation;
  if (a.bias.defined()) {
    prm.bias = a.bias.data_ptr<scalar_t>();
    prm.bias_row = a.bias.stride(0);
    prm.bias_cell = a.bias.stride(1);
    prm.bias_output = a.bias.stride(2);
  }
  return prm;
}

}  // namespace cuda
}  // namespace hypercolumn_ops
