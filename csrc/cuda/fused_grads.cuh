// The device side of the CUDA fused kernels' backward: the bias gradient's partial sums, the
// atomic scatter of score gradients onto a score-map gradient, what the tap scatters
// (tap_scatter.cuh) add per point (SlotGrads and its two uses, with ScoreBins, the deterministic
// sums of a score-map gradient), and the weight gradient of sampled layers.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "fused_scores.cuh"
#include "hypercolumn_math.h"
#include "launch.h"
#include "points.cuh"
#include "tap_scatter.cuh"
#include "tap_scatter_launch.cuh"

namespace hypercolumn_ops {
namespace cuda {

// grad_bias[row, k, m], first pass: warp (segment, row, cell chunk, output m) adds the slot
// gradients of one segment of the row's slots (the row is one point, or the oh * ow grid of a
// box) into the cells of its chunk. Lane l adds slots l, l + 32, ... in order, each into its own
// column of shared bins (one per cell); then a fixed shuffle tree adds the lanes of each cell.
// The second pass sums the segments in order (at::sum): the same bits on every run. Each slot is
// read once per (cell chunk, output), and segments keep the GPU busy when rows * M is small.
constexpr int kBiasWarps = 4;
constexpr int kBiasCellChunk = 32;

template <typename acc_t>
__global__ void bias_grad_partials_kernel(int64_t rows, int64_t slots_per_row, int64_t segment_slots,
                                          int64_t segments, int cells, int64_t outputs, const acc_t* slot_grads,
                                          const int64_t* slot_keys, acc_t* partials) {
  __shared__ acc_t bins[kBiasWarps][kBiasCellChunk][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int chunks = (cells + kBiasCellChunk - 1) / kBiasCellChunk;
  const int64_t total = segments * rows * chunks * outputs;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * kBiasWarps + warp; index < total;
       index += static_cast<int64_t>(gridDim.x) * kBiasWarps) {
    const int64_t output = index % outputs;
    const int first_cell = static_cast<int>((index / outputs) % chunks) * kBiasCellChunk;
    const int64_t row = (index / (outputs * chunks)) % rows;
    const int64_t segment = index / (outputs * chunks * rows);
    const int width = min(kBiasCellChunk, cells - first_cell);
    acc_t(*bin)[32] = bins[warp];
    for (int c = 0; c < width; ++c) bin[c][lane] = acc_t(0);
    const int64_t begin = row * slots_per_row + segment * segment_slots;
    const int64_t end = min(begin + segment_slots, (row + 1) * slots_per_row);
    for (int64_t s = begin + lane; s < end; s += 32) {
      const int64_t key = slot_keys[s];
      // Keys are label * KK + cell < NC * KK, an int; -1 marks a slot without gradient.
      const int c = key < 0 ? -1 : static_cast<int>(key) % cells - first_cell;
      if (c >= 0 && c < width) bin[c][lane] += slot_grads[s * outputs + output];
    }
    for (int c = 0; c < width; ++c) {
      const acc_t sum = warp_sum(bin[c][lane]);
      if (lane == 0) partials[((segment * rows + row) * cells + first_cell + c) * outputs + output] = sum;
    }
  }
}

// Order 1 backward: thread (point, output m) adds its slots' score gradients onto the score-map
// gradient (B, H*W, NC*KK*M), channel (cell key) * M + m, with atomics.
template <typename acc_t, bool kSampled>
__global__ void score_grad_scatter_kernel(PointSource<acc_t> src, int64_t num_points, int64_t outputs,
                                          MapView<acc_t*> score_grad, acc_t scale_y, acc_t scale_x, int64_t padding,
                                          const acc_t* slot_grads, const int64_t* slot_keys) {
  const int64_t total = num_points * outputs;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = index / outputs, output = index % outputs;
    const Point<acc_t> pt = point_at(src, p);
    if (!pt.valid) continue;
    const PointTaps<acc_t, kSampled> t =
        point_taps<kSampled>(src, pt, score_grad.height, score_grad.width, scale_y, scale_x, padding);
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const int64_t key = slot_keys[p * kSlots + j];
      const acc_t g = slot_grads[(p * kSlots + j) * outputs + output];
      if (key < 0 || g == acc_t(0)) continue;
      scatter<kSampled>(score_grad, t, key * outputs + output, g);
    }
  }
}

// What the fused backward's scatters stage per point: its index and the cell keys of its slots.
template <typename acc_t>
struct SlotGrads {
  const acc_t* slot_grads;  // (P, 4, M)
  const int64_t* slot_keys;  // (P, 4): label * KK + cell, or -1
  int64_t outputs;

  using Sums = ChannelSums<acc_t>;
  // CellFeatureGrads::at already issues M x 4 loads of its own: one entry at a time.
  static constexpr int kLoadBatch = 1;
  struct Staged {
    int64_t point;
    int64_t key[kSlots];
  };
  __device__ __forceinline__ Staged stage(const Point<acc_t>&, int64_t p) const {
    Staged s;
    s.point = p;
#pragma unroll
    for (int j = 0; j < kSlots; ++j) s.key[j] = slot_keys[p * kSlots + j];
    return s;
  }
};

// Shared-memory budget of ScoreBins' bins: with the largest staging arrays (256 threads, float64)
// a block stays under the 48 KB of dynamic shared memory a launch gets without opting in.
constexpr int64_t kScoreBinBytes = 24 * 1024;
// Entries a ScoreBins thread takes per pixel on average, where the block is not already full.
constexpr int64_t kScoreBinEntries = 8;
// Entries whose slot gradients a ScoreBins lane loads at once (4 slots each).
constexpr int kScoreBinBatch = 2;

// The deterministic sums of a score-map gradient (order 1): of a point's NC * KK * M score
// channels n = (cell key) * M + m only its slots' 4 keys take gradient, so lanes over the channels
// (ChannelSums) would mostly add zeros. Here lane x of group g adds, for each of the group's
// entries in order and each slot j, the slot's gradient of outputs m = x, x + blockDim.x, ... into
// bin (g, key_j, m) in shared memory; store adds the groups' bins in group order. Each bin has one
// writer, so the sums are the same bits every run. Keys and outputs that do not fit the budget
// are split into chunks (blockIdx.y), each of which stages the pixel's entries again.
template <typename acc_t>
struct ScoreBins {
  acc_t* bins;  // (groups, keys, outputs) of this chunk
  int64_t total_outputs, key0, keys, m0, outputs;

  template <typename Grads>
  __device__ __forceinline__ ScoreBins(acc_t* shared, const SumsLayout& layout, const Grads& grads)
      : bins(shared),
        total_outputs(grads.outputs),
        key0(blockIdx.y / layout.output_chunks * layout.keys),
        keys(layout.keys),
        m0(blockIdx.y % layout.output_chunks * layout.outputs),
        outputs(layout.outputs) {}

  // Groups by taps per pixel (at least a warp, at most kPixelThreads threads), then as few chunks
  // as the budget allows: all keys in one where fewer groups make them fit.
  template <typename Grads>
  static PixelLaunch plan(const Grads& grads, int64_t channels, int64_t num_points, int64_t pixels) {
    const int64_t budget = kScoreBinBytes / static_cast<int64_t>(sizeof(acc_t));
    const int64_t total_keys = channels / grads.outputs;
    SumsLayout layout;
    layout.output_chunks = ceil_div(grads.outputs, std::min(grads.outputs, budget));
    layout.outputs = ceil_div(grads.outputs, layout.output_chunks);
    const int64_t lanes = std::min<int64_t>(layout.outputs, kPixelThreads);
    int64_t groups = std::min<int64_t>(std::max(ceil_div(taps_per_pixel(num_points, pixels), kScoreBinEntries),
                                                ceil_div(32, lanes)),
                                       kPixelThreads / lanes);
    groups = std::max<int64_t>(1, std::min(groups, budget / layout.outputs));
    if (total_keys * layout.outputs <= budget) {
      groups = std::min(groups, budget / (total_keys * layout.outputs));
      layout.keys = total_keys;
    } else {
      layout.keys = budget / (groups * layout.outputs);
    }
    const int64_t key_chunks = ceil_div(total_keys, layout.keys);
    layout.keys = ceil_div(total_keys, key_chunks);
    return {dim3(static_cast<unsigned>(lanes), static_cast<unsigned>(groups)), key_chunks * layout.output_chunks,
            groups * layout.keys * layout.outputs, layout};
  }

  __device__ __forceinline__ int64_t size() const { return keys * outputs; }

  __device__ __forceinline__ void clear() {
    __syncthreads();  // the previous pixel's readers are done with the bins
    const int64_t threads = blockDim.x * blockDim.y;
    for (int64_t i = threadIdx.y * blockDim.x + threadIdx.x; i < blockDim.y * size(); i += threads) bins[i] = 0;
  }

  // Each bin takes its group's entries in order, slot by slot. A lane reads the slot gradients of
  // kScoreBinBatch entries before it adds the first: the bins are shared memory, which the
  // compiler cannot tell apart from the slot gradients, so otherwise every load would wait for the
  // add before it.
  template <typename Grads>
  __device__ __forceinline__ void add(const acc_t* weight, const typename Grads::Staged* staged, int n,
                                      const Grads& grads, const MapView<acc_t*>&) {
    acc_t* mine = bins + threadIdx.y * size();
    const int64_t m_end = min(m0 + outputs, total_outputs);
    const int step = blockDim.y;
    for (int64_t m = m0 + threadIdx.x; m < m_end; m += blockDim.x) {
      for (int t = threadIdx.y; t < n; t += kScoreBinBatch * step) {
        int bin[kScoreBinBatch][kSlots];  // this lane's bin of each slot, or -1: none
        acc_t w[kScoreBinBatch], g[kScoreBinBatch][kSlots];
#pragma unroll
        for (int i = 0; i < kScoreBinBatch; ++i) {
          const int e = t + i * step;
          w[i] = e < n ? weight[e] : acc_t(0);
#pragma unroll
          for (int j = 0; j < kSlots; ++j) {
            const int64_t k = w[i] != acc_t(0) ? staged[e].key[j] - key0 : -1;  // an invalid slot's key is -1
            bin[i][j] = k >= 0 && k < keys ? static_cast<int>(k * outputs + m - m0) : -1;
            g[i][j] = bin[i][j] >= 0 ? grads.slot_grads[(staged[e].point * kSlots + j) * total_outputs + m] : 0;
          }
        }
#pragma unroll
        for (int i = 0; i < kScoreBinBatch; ++i) {
#pragma unroll
          for (int j = 0; j < kSlots; ++j) {
            if (bin[i][j] >= 0) mine[bin[i][j]] += w[i] * g[i][j];
          }
        }
      }
    }
  }

  __device__ __forceinline__ void store(bool write, const MapView<acc_t*>& target, int64_t b, int64_t y, int64_t x) {
    __syncthreads();  // every group's adds are done
    if (!write) return;
    const int threads = blockDim.x * blockDim.y;
    acc_t* pixel = target.data + b * target.stride_b + y * target.stride_y + x * target.stride_x;
    // 32-bit index math: a chunk holds at most kScoreBinBytes / sizeof(acc_t) bins.
    const int bins_per_group = static_cast<int>(size()), width = static_cast<int>(outputs);
    for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < bins_per_group; i += threads) {
      const int k = i / width;
      const int64_t m = m0 + (i - k * width), n = (key0 + k) * total_outputs + m;
      if (m >= total_outputs || n >= target.channels) continue;
      acc_t total = 0;
      for (unsigned g = 0; g < blockDim.y; ++g) total += bins[g * bins_per_group + i];
      pixel[n * target.stride_c] = total;
    }
  }
};

// Order 1 backward: the gradient of score-map channel n = (cell key) * M + m at a point, the sum of
// its slots' score gradients of output m whose cell key is n / M (deterministic path, ScoreBins).
template <typename acc_t>
struct ScoreMapGrads : SlotGrads<acc_t> {
  using Sums = ScoreBins<acc_t>;
};

// Order 0 backward, the feature side: a point's channel-c gradient is sum over its slots j and
// outputs m of (score gradient) x W[cell key, m, c], scattered onto its taps (scatter_to_taps).
template <typename scalar_t, typename acc_t>
struct CellFeatureGrads : SlotGrads<acc_t> {
  const scalar_t* weight;  // (NC * KK * M, C) contiguous
  int64_t channels;

  __device__ __forceinline__ acc_t at(const typename SlotGrads<acc_t>::Staged& s, int64_t c) const {
    const int64_t outputs = this->outputs;
    acc_t sum = 0;
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      if (s.key[j] < 0) continue;
      const acc_t* g = this->slot_grads + (s.point * kSlots + j) * outputs;
      for (int64_t m = 0; m < outputs; ++m) {
        if (g[m] != acc_t(0)) sum += g[m] * static_cast<acc_t>(weight[(s.key[j] * outputs + m) * channels + c]);
      }
    }
    return sum;
  }
};

// Order 0 backward, the weight side: block x sums the points of its chunk (in order) into its own
// (NC * KK * M, C) partial, thread = channel c, no atomics; at::sum then adds the partials.
template <typename scalar_t, typename acc_t, bool kSampled>
__global__ void __launch_bounds__(kChannelThreads)
    weight_grad_kernel(MapView<const scalar_t*> map, PointSource<acc_t> src, int64_t num_points, int64_t chunk_points,
                       acc_t scale_y, acc_t scale_x, int64_t padding, int64_t outputs, int64_t score_rows,
                       const acc_t* slot_grads, const int64_t* slot_keys, acc_t* partials) {
  __shared__ PointTaps<acc_t, kSampled> taps[kTilePoints];
  __shared__ int64_t weight_row[kTilePoints][kSlots];  // (cell key) * M of slot j, or -1
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t channels = map.channels;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk_points;
  const int64_t end = min(num_points, begin + chunk_points);
  acc_t* partial = partials + static_cast<int64_t>(blockIdx.x) * score_rows * channels;
  for (int64_t first = begin; first < end; first += kTilePoints) {
    const int count = static_cast<int>(min(static_cast<int64_t>(kTilePoints), end - first));
    __syncthreads();  // the previous tile's readers are done with the shared taps
    for (int t = threadIdx.x; t < count; t += blockDim.x) {
      taps[t] = point_taps<kSampled>(src, point_at(src, first + t), map.height, map.width, scale_y, scale_x, padding);
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        const int64_t key = slot_keys[(first + t) * kSlots + j];
        weight_row[t][j] = key >= 0 ? key * outputs : -1;
      }
    }
    __syncthreads();
    if (c >= channels) continue;
    for (int t = 0; t < count; ++t) {
      if (!taps[t].valid) continue;
      const acc_t value = gather<kSampled>(map, taps[t], c);
      const acc_t* g = slot_grads + (first + t) * kSlots * outputs;
      for (int j = 0; j < kSlots; ++j) {
        if (weight_row[t][j] < 0) continue;
        for (int64_t m = 0; m < outputs; ++m) {
          const acc_t gs = g[j * outputs + m];
          if (gs != acc_t(0)) partial[(weight_row[t][j] + m) * channels + c] += gs * value;
        }
      }
    }
  }
}

}  // namespace cuda
}  // namespace hypercolumn_ops
