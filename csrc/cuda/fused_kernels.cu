// CUDA kernels of fused_hypercolumn and fused_hypercolumn_points (forward and backward).
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
// each output once. The hypercolumns themselves are never stored.
//
// Backward recomputes the scores the same way where the sigmoid needs them, and stores each
// point's score gradients (P, 4, M) and cell keys (P, 4); then per layer
//   order 0: scatters W^T (score gradient) onto the feature taps (scatter_to_taps, common.cuh), and
//            sums (score gradient) x (resampled features) into per-chunk weight-gradient partials,
//            which at::sum then adds;
//   order 1: scatters the score gradients onto a score-map gradient, from which
//            project_grads_in_kernels (small products) or cuBLAS forms the feature and weight
//            gradients.
// The scatters use atomics by default; under torch.use_deterministic_algorithms(True) each pixel's
// contributions are summed in a fixed order instead (gather_to_taps, common.cuh; score maps by
// ScoreBins, which adds only the 4 cells a point touches), and order 1 stays where cuBLAS is
// reproducible (CUBLAS_WORKSPACE_CONFIG). Deterministic mode never raises.
#include <torch/library.h>

#include <cstdlib>

#include "common.cuh"

namespace hypercolumn_ops {
namespace cuda {
namespace {

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

template <typename scalar_t, typename acc_t, bool kBackward, typename Tile>
__global__ void __launch_bounds__(kFusedThreads)
    fused_scores_kernel(FusedLayers<scalar_t, acc_t> layers, PointSource<acc_t> src, int64_t num_points,
                        FusedParams<scalar_t, acc_t> prm) {
  constexpr int kFusedPoints = Tile::points, kFusedOutputs = Tile::outputs, kFusedChannels = Tile::channels;
  __shared__ Point<acc_t> points[kFusedPoints];
  __shared__ LocationWeights<acc_t> slots[kFusedPoints];
  __shared__ PointTaps<acc_t> taps[kFusedPoints];
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
    if (tid < count) taps[tid] = point_taps(points[tid], map, layers.scale_y[l], layers.scale_x[l], prm.padding);
    __syncthreads();
    if (layers.order[l] == kOrderSampleFeatures) {
      const scalar_t* weight = layers.weight[l];
      for (int64_t c0 = 0; c0 < map.channels; c0 += kFusedChannels) {
        const int chunk = static_cast<int>(min(static_cast<int64_t>(kFusedChannels), map.channels - c0));
        for (int e = tid; e < count * kFusedChannels; e += blockDim.x) {
          const int p = e / kFusedChannels, cc = e % kFusedChannels;
          column[p][cc] = (cc < chunk && taps[p].valid) ? gather(map, taps[p], c0 + cc) : acc_t(0);
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
        scores[p][j][m] += gather(map, taps[p], channel);
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

// Segments per row for the bias gradient: enough warps to fill the GPU (about 4,096), each
// segment at least 256 slots (8 per lane).
int64_t bias_segment_slots(int64_t rows, int64_t slots_per_row, int64_t cells, int64_t outputs) {
  const int64_t warps = rows * ceil_div(cells, kBiasCellChunk) * outputs;
  const int64_t segments = std::min(ceil_div(4096, warps), ceil_div(slots_per_row, 256));
  return ceil_div(slots_per_row, std::max<int64_t>(segments, 1));
}

// Order 1 backward: thread (point, output m) adds its slots' score gradients onto the score-map
// gradient (B, H*W, NC*KK*M), channel (cell key) * M + m, with atomics.
template <typename acc_t>
__global__ void score_grad_scatter_kernel(PointSource<acc_t> src, int64_t num_points, int64_t outputs,
                                          MapView<acc_t*> score_grad, acc_t scale_y, acc_t scale_x, int64_t padding,
                                          const acc_t* slot_grads, const int64_t* slot_keys) {
  const int64_t total = num_points * outputs;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = index / outputs, output = index % outputs;
    const Point<acc_t> pt = point_at(src, p);
    if (!pt.valid) continue;
    const PointTaps<acc_t> t = point_taps(pt, score_grad, scale_y, scale_x, padding);
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const int64_t key = slot_keys[p * kSlots + j];
      const acc_t g = slot_grads[(p * kSlots + j) * outputs + output];
      if (key < 0 || g == acc_t(0)) continue;
      scatter(score_grad, t, key * outputs + output, g);
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
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kChannelThreads)
    weight_grad_kernel(MapView<const scalar_t*> map, PointSource<acc_t> src, int64_t num_points, int64_t chunk_points,
                       acc_t scale_y, acc_t scale_x, int64_t padding, int64_t outputs, int64_t score_rows,
                       const acc_t* slot_grads, const int64_t* slot_keys, acc_t* partials) {
  __shared__ PointTaps<acc_t> taps[kTilePoints];
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
      taps[t] = point_taps(point_at(src, first + t), map, scale_y, scale_x, padding);
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
      const acc_t value = gather(map, taps[t], c);
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

// ----------------------------------------------------------------------------- host side

// Checked arguments shared by both fused operators.
struct FusedArgs {
  std::vector<at::Tensor> weights;  // (NC, KK, M, C_l) contiguous
  at::Tensor rows, locations, labels, bias;
  int64_t classes = 1, cells = 1, grid_k = 1, outputs = 1, num_rows = 0, grid_h = 0, grid_w = 0, num_points = 0;
  std::vector<int64_t> orders;  // the orders that run (see effective_order)
};

// The (B, H*W, C) matrix view of a (B, C, H, W) map, or an undefined tensor where its pixels do not
// share one stride or neither pixels nor channels are unit-stride (cuBLAS would need a copy).
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

// The (B * H*W, C) view of a pixel matrix whose images follow one another in memory (one image,
// or a channels_last map), so that one 2-D product replaces a batched one; undefined otherwise.
at::Tensor stacked_pixels(const at::Tensor& pixels) {
  if (pixels.size(0) != 1 && pixels.stride(0) != pixels.size(1) * pixels.stride(1)) return {};
  return pixels.view({-1, pixels.size(2)});
}

// Whether cuBLAS gives the same bits on every run: with CUDA >= 10.2 only under a fixed workspace
// configuration (the package sets CUBLAS_WORKSPACE_CONFIG=:4096:8 when it is imported and the
// variable is unset; PyTorch's own matrix products need the same).
bool cublas_reproducible() {
  const char* config = std::getenv("CUBLAS_WORKSPACE_CONFIG");
  return config != nullptr && (std::string(config) == ":4096:8" || std::string(config) == ":16:8");
}

// Order 1 needs a dense map of at least one channel that cuBLAS can read as a matrix in place,
// and, in deterministic mode, a reproducible cuBLAS; both orders are exact, so falling back to
// order 0 changes no result.
int64_t effective_order(int64_t requested, const at::Tensor& feature) {
  if (requested != kOrderProjectScores) return kOrderSampleFeatures;
  if (at::globalContext().deterministicAlgorithms() && !cublas_reproducible()) return kOrderSampleFeatures;
  if (feature.size(0) == 0 || feature.size(1) == 0 || !feature.is_non_overlapping_and_dense() ||
      !pixel_matrix(feature).defined()) {
    return kOrderSampleFeatures;
  }
  return kOrderProjectScores;
}

FusedArgs check_fused(at::TensorList features, const at::Tensor& coords, int64_t coord_columns,
                      const c10::optional<at::Tensor>& locations, at::TensorList weights,
                      const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& labels,
                      int64_t grid_h, int64_t grid_w, at::ArrayRef<double> scale_y, at::ArrayRef<double> scale_x,
                      int64_t padding, int64_t activation, at::IntArrayRef orders) {
  check_scales(features, scale_y, scale_x);
  check_padding(padding);
  TORCH_CHECK(activation == kActivationNone || activation == kActivationSigmoid,
              "activation: expected 0 (none) or 1 (sigmoid), got ", activation);
  const at::Tensor& first = features[0];
  FusedArgs a;
  a.rows = coordinate_rows(coords, coord_columns, coord_columns == 3 ? "points" : "boxes", first);
  a.num_rows = a.rows.size(0);
  a.grid_h = grid_h;
  a.grid_w = grid_w;
  a.num_points = grid_h == 0 ? a.num_rows : a.num_rows * grid_h * grid_w;

  TORCH_CHECK(weights.size() == features.size(), "weights: expected one tensor per layer (", features.size(),
              "), got ", weights.size());
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK(w.dim() == 4, "weights[", l, "]: expected (NC, KK, M, C_l), got shape ", w.sizes());
    TORCH_CHECK(w.scalar_type() == first.scalar_type(), "weights[", l, "]: dtype ", w.scalar_type(),
                " differs from the features' ", first.scalar_type());
    TORCH_CHECK(w.device() == first.device(), "weights[", l, "]: device ", w.device(), " differs from the features' ",
                first.device());
    TORCH_CHECK(w.size(3) == features[l].size(1), "weights[", l, "]: expected C_l = ", features[l].size(1),
                " channels, got ", w.size(3));
    TORCH_CHECK(w.sizes().slice(0, 3) == weights[0].sizes().slice(0, 3), "weights[", l, "]: (NC, KK, M) = ",
                w.sizes().slice(0, 3), " differs from weights[0]'s ", weights[0].sizes().slice(0, 3));
    a.weights.push_back(w.contiguous());
  }
  a.classes = weights[0].size(0);
  a.cells = weights[0].size(1);
  a.outputs = weights[0].size(2);
  a.grid_k = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(a.cells))));
  TORCH_CHECK(a.classes >= 1 && a.outputs >= 1 && a.cells >= 1 && a.grid_k * a.grid_k == a.cells,
              "weights: expected NC >= 1, M >= 1 and KK a perfect square K * K, got (NC, KK, M) = ",
              weights[0].sizes().slice(0, 3));

  if (labels.has_value() && labels->defined()) {
    TORCH_CHECK(labels->scalar_type() == at::kLong, "labels: expected int64, got ", labels->scalar_type());
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == a.num_rows, "labels: expected shape (", a.num_rows,
                ",), got ", labels->sizes());
    TORCH_CHECK(labels->device() == first.device(), "labels: device ", labels->device(),
                " differs from the features' ", first.device());
    a.labels = labels->contiguous();
  } else {
    TORCH_CHECK(a.classes == 1, "labels: required with NC = ", a.classes, " classifier sets");
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->sizes() == at::IntArrayRef({a.num_rows, a.cells, a.outputs}), "bias: expected shape (",
                a.num_rows, ", ", a.cells, ", ", a.outputs, "), got ", bias->sizes());
    TORCH_CHECK(bias->device() == first.device(), "bias: device ", bias->device(), " differs from the features' ",
                first.device());
    TORCH_CHECK(bias->scalar_type() == first.scalar_type(), "bias: dtype ", bias->scalar_type(),
                " differs from the features' ", first.scalar_type());
    a.bias = *bias;
  }
  if (locations.has_value() && locations->defined()) {
    a.locations = coordinate_rows(*locations, 2, "locations", first);
    TORCH_CHECK(a.locations.size(0) == a.num_rows, "locations: expected ", a.num_rows, " rows, got ",
                a.locations.size(0));
  } else {
    TORCH_CHECK(grid_h > 0 || a.cells == 1, "locations: required when K > 1 (KK = ", a.cells, ")");
  }
  TORCH_CHECK(orders.size() == features.size(), "orders: expected one per layer (", features.size(), "), got ",
              orders.size());
  for (size_t l = 0; l < features.size(); ++l) {
    TORCH_CHECK(orders[l] == kOrderSampleFeatures || orders[l] == kOrderProjectScores,
                "orders: expected 0 or 1 per layer, got ", orders[l]);
    a.orders.push_back(effective_order(orders[l], features[l]));
  }
  return a;
}

template <typename acc_t>
PointSource<acc_t> fused_source(const FusedArgs& a, int64_t batch) {
  return {a.rows.data_ptr<acc_t>(),
          a.locations.defined() ? a.locations.data_ptr<acc_t>() : nullptr,
          a.labels.defined() ? a.labels.data_ptr<int64_t>() : nullptr,
          a.grid_h,
          a.grid_w,
          batch,
          a.classes};
}

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

// Whether project_grads_in_kernels makes the gradients of such a projection: a small one of at
// most kWeightGradMaxPixels pixels.
bool small_projection_grads(const at::Tensor& pixels, int64_t outputs) {
  return small_projection(pixels, outputs) && pixels.size(0) * pixels.size(1) <= kWeightGradMaxPixels;
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
        at::empty({chunks, num_pixels, outputs}, pixels.options().dtype(coordinate_type(pixels.scalar_type())));
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

// The feature and weight gradients of a small projection (small_projection_grads), from the
// score-map gradient (B, H*W, O) in the accumulation type: grad_pixels (B, H*W, C) filled, and the
// weight gradient (O, C) returned in the weights' dtype. Every value is summed in a fixed order.
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

// Score map (B, H*W, NC*KK*M) of an order-1 layer: the map's pixel matrix times W^T, in the
// kernels above where the product is small, else by cuBLAS, as one 2-D product where the images'
// pixels stack (a 2-D product costs the host less).
at::Tensor project_scores(const at::Tensor& feature, const at::Tensor& weight) {
  const at::Tensor pixels = pixel_matrix(feature);
  const at::Tensor weight_matrix = weight.reshape({-1, feature.size(1)});
  if (small_projection(pixels, weight_matrix.size(0))) return project_scores_in_kernels(pixels, weight_matrix);
  const at::Tensor transposed = weight_matrix.t();
  const at::Tensor stacked = stacked_pixels(pixels);
  if (stacked.defined()) return at::mm(stacked, transposed).view({pixels.size(0), pixels.size(1), -1});
  return at::bmm(pixels, transposed.unsqueeze(0).expand({feature.size(0), -1, -1}));
}

// One entry per layer: the score map of an order-1 layer, undefined for order 0.
std::vector<at::Tensor> score_maps(at::TensorList features, const FusedArgs& a) {
  std::vector<at::Tensor> maps(features.size());
  for (size_t l = 0; l < features.size(); ++l) {
    if (a.orders[l] == kOrderProjectScores) maps[l] = project_scores(features[l], a.weights[l]);
  }
  return maps;
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
                        at::ArrayRef<double> scale_y, at::ArrayRef<double> scale_x,
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
      pack.scale_y[i] = static_cast<acc_t>(scale_y[l]);
      pack.scale_x[i] = static_cast<acc_t>(scale_x[l]);
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
    fused_scores_kernel<scalar_t, acc_t, kBackward, Tile><<<grid, kFusedThreads, 0, stream>>>(pack, src,
                                                                                             a.num_points, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    partial_in = partial_out;
  }
}

template <typename scalar_t, typename acc_t, bool kBackward>
void launch_fused_scores(at::TensorList features, const FusedArgs& a, const std::vector<at::Tensor>& maps,
                         at::ArrayRef<double> scale_y, at::ArrayRef<double> scale_x,
                         FusedParams<scalar_t, acc_t> prm) {
  if (a.outputs <= TallTile::outputs) {
    launch_fused_tiles<scalar_t, acc_t, kBackward, TallTile>(features, a, maps, scale_y, scale_x, prm);
  } else {
    launch_fused_tiles<scalar_t, acc_t, kBackward, WideTile>(features, a, maps, scale_y, scale_x, prm);
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

void fused_forward(at::TensorList features, const FusedArgs& a, at::ArrayRef<double> scale_y,
                   at::ArrayRef<double> scale_x, int64_t padding, int64_t activation, const at::Tensor& out) {
  if (a.num_points == 0) return;
  const std::vector<at::Tensor> maps = score_maps(features, a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fused_forward", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    auto prm = fused_params<scalar_t, acc_t>(a, padding, activation);
    prm.out = out.data_ptr<scalar_t>();
    prm.out_strides = output_strides(out);
    launch_fused_scores<scalar_t, acc_t, false>(features, a, maps, scale_y, scale_x, prm);
  });
}

// Points per block of weight_grad_kernel: chunks of about 256 points, each with its own partial
// (NC * KK * M, C), at most 2^24 partial elements in all. Fixed by the shapes, so the order of
// every sum is too.
int64_t weight_grad_chunk_points(int64_t num_points, int64_t partial_size) {
  const int64_t max_chunks = std::max<int64_t>(1, (int64_t(1) << 24) / std::max<int64_t>(1, partial_size));
  return ceil_div(num_points, std::min(ceil_div(num_points, 256), max_chunks));
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> fused_backward(
    const at::Tensor& grad_out, at::TensorList features, at::TensorList weights, const FusedArgs& a,
    at::ArrayRef<double> scale_y, at::ArrayRef<double> scale_x, int64_t padding, int64_t activation) {
  const at::Tensor& first = features[0];
  const int64_t batch = first.size(0);
  const auto acc_type = coordinate_type(first.scalar_type());
  std::vector<at::Tensor> grad_features(features.size()), grad_weights(features.size());
  // Layer l's weight gradient from a product's result in the weights' dtype: a view where the
  // weights are contiguous, else a copy with their strides.
  const auto product_weight_grad = [&](size_t l, const at::Tensor& grad) {
    const at::Tensor shaped = grad.view(weights[l].sizes());
    return weights[l].is_contiguous() ? shaped : at::empty_like(weights[l]).copy_(shaped);
  };
  at::Tensor grad_bias;
  if (a.num_points == 0 || batch == 0) {
    for (size_t l = 0; l < features.size(); ++l) {
      grad_features[l] = at::zeros_like(features[l]);
      grad_weights[l] = at::zeros_like(weights[l]);
    }
    return {grad_features, grad_weights, at::zeros({a.num_rows, a.cells, a.outputs}, first.options())};
  }
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const auto stream = at::cuda::getCurrentCUDAStream();
  // The sigmoid's slope needs the scores; a linear blend's gradient does not.
  const std::vector<at::Tensor> maps =
      activation == kActivationSigmoid ? score_maps(features, a) : std::vector<at::Tensor>();
  const at::Tensor slot_grads = at::empty({a.num_points, kSlots, a.outputs}, first.options().dtype(acc_type));
  const at::Tensor slot_keys = at::empty({a.num_points, kSlots}, first.options().dtype(at::kLong));
  const int64_t score_rows = a.classes * a.cells * a.outputs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "fused_backward", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    auto prm = fused_params<scalar_t, acc_t>(a, padding, activation);
    prm.grad_out = grad_out.data_ptr<scalar_t>();
    prm.grad_strides = output_strides(grad_out);
    prm.slot_grads = slot_grads.data_ptr<acc_t>();
    prm.slot_keys = slot_keys.data_ptr<int64_t>();
    launch_fused_scores<scalar_t, acc_t, true>(features, a, maps, scale_y, scale_x, prm);
    const acc_t* g = slot_grads.data_ptr<acc_t>();
    const int64_t* keys = slot_keys.data_ptr<int64_t>();

    const auto src = fused_source<acc_t>(a, batch);
    const int64_t slots_per_row = (a.grid_h == 0 ? 1 : a.grid_h * a.grid_w) * kSlots;
    const int64_t segment_slots = bias_segment_slots(a.num_rows, slots_per_row, a.cells, a.outputs);
    const int64_t segments = ceil_div(slots_per_row, segment_slots);
    const at::Tensor partials = at::empty({segments, a.num_rows, a.cells, a.outputs}, slot_grads.options());
    const int64_t bias_warps = segments * a.num_rows * ceil_div(a.cells, kBiasCellChunk) * a.outputs;
    const int bias_blocks = static_cast<int>(std::min<int64_t>(ceil_div(bias_warps, kBiasWarps), 65535));
    bias_grad_partials_kernel<acc_t><<<bias_blocks, kBiasWarps * 32, 0, stream>>>(
        a.num_rows, slots_per_row, segment_slots, segments, static_cast<int>(a.cells), a.outputs, g, keys,
        partials.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_bias = at::sum(partials, at::IntArrayRef{0}).to(first.scalar_type());

    for (size_t l = 0; l < features.size(); ++l) {
      const at::Tensor& f = features[l];
      const int64_t channels = f.size(1);
      const acc_t sy = static_cast<acc_t>(scale_y[l]), sx = static_cast<acc_t>(scale_x[l]);
      if (a.orders[l] == kOrderProjectScores) {
        // Score-map gradient (B, H*W, NC*KK*M), then the 1x1 convolution's two products.
        at::Tensor score_grad = at::zeros({batch, f.size(2) * f.size(3), score_rows}, f.options().dtype(acc_type));
        // The same memory as a (B, NC*KK*M, H, W) map for the scatters.
        const at::Tensor score_grad_map =
            score_grad.view({batch, f.size(2), f.size(3), score_rows}).permute({0, 3, 1, 2});
        if (deterministic) {
          gather_to_taps<acc_t>(score_grad_map, src, a.num_points, sy, sx, padding,
                                ScoreMapGrads<acc_t>{{g, keys, a.outputs}});
        } else {
          const int64_t total = a.num_points * a.outputs;
          const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(total, 256), 65535));
          score_grad_scatter_kernel<acc_t><<<blocks, 256, 0, stream>>>(
              src, a.num_points, a.outputs, map_view<acc_t>(score_grad_map), sy, sx, padding, g, keys);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        const at::Tensor weight_matrix = a.weights[l].reshape({score_rows, channels});
        // Dense (effective_order), so empty_like keeps the map's strides and its pixel matrix exists.
        grad_features[l] = at::empty_like(f);
        at::Tensor grad_pixels = pixel_matrix(grad_features[l]);
        const at::Tensor pixels = pixel_matrix(f);
        if (small_projection_grads(pixels, score_rows)) {
          grad_weights[l] =
              product_weight_grad(l, project_grads_in_kernels(score_grad, pixels, weight_matrix, grad_pixels));
          continue;
        }
        const at::Tensor score_grad_typed = score_grad.to(f.scalar_type());
        const at::Tensor stacked = stacked_pixels(pixels);
        at::Tensor stacked_grad = stacked_pixels(grad_pixels);
        if (stacked.defined() && stacked_grad.defined()) {
          // One 2-D product each; the weight gradient's sums over images happen inside cuBLAS.
          const at::Tensor rows_grad = score_grad_typed.view({-1, score_rows});
          at::mm_out(stacked_grad, rows_grad, weight_matrix);
          grad_weights[l] = product_weight_grad(l, at::mm(rows_grad.t(), stacked));
          continue;
        }
        at::bmm_out(grad_pixels, score_grad_typed, weight_matrix.unsqueeze(0).expand({batch, -1, -1}));
        const at::Tensor per_image = at::bmm(score_grad_typed.transpose(1, 2), pixels);
        grad_weights[l] = at::empty_like(weights[l]).copy_(
            at::sum(per_image, at::IntArrayRef{0}, false, acc_type).view(weights[l].sizes()));
        continue;
      }
      const at::Tensor buffer = accumulation_buffer(f);
      const CellFeatureGrads<scalar_t, acc_t> cell_grads{{g, keys, a.outputs}, a.weights[l].data_ptr<scalar_t>(),
                                                         channels};
      scatter_to_taps<acc_t>(buffer, src, a.num_points, sy, sx, padding, cell_grads, deterministic);
      grad_features[l] = feature_grad(f, buffer);
      const int64_t chunk_points = weight_grad_chunk_points(a.num_points, score_rows * channels);
      const int64_t chunks = ceil_div(a.num_points, chunk_points);
      at::Tensor partials = at::zeros({chunks, score_rows, channels}, f.options().dtype(acc_type));
      if (channels > 0) {
        const int threads = channel_threads(channels);
        const int64_t channel_chunks = ceil_div(channels, threads);
        check_grid_y(channel_chunks, "features");
        const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(channel_chunks));
        weight_grad_kernel<scalar_t, acc_t><<<grid, threads, 0, stream>>>(
            const_map_view<scalar_t>(f), src, a.num_points, chunk_points, sy, sx, padding, a.outputs, score_rows, g,
            keys, partials.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      grad_weights[l] = at::empty_like(weights[l]).copy_(at::sum(partials, at::IntArrayRef{0}).view(weights[l].sizes()));
    }
  });
  return {grad_features, grad_weights, grad_bias};
}

void check_grad(const at::Tensor& grad, at::IntArrayRef expected, const at::Tensor& feature) {
  TORCH_CHECK(grad.sizes() == expected, "grad: expected shape ", expected, ", got ", grad.sizes());
  TORCH_CHECK(grad.device() == feature.device(), "grad: expected device ", feature.device(), ", got ",
              grad.device());
}

at::Tensor fused_hypercolumn_cuda(at::TensorList features, const at::Tensor& boxes, at::TensorList weights,
                                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& labels,
                                  int64_t output_height, int64_t output_width, at::ArrayRef<double> scale_y,
                                  at::ArrayRef<double> scale_x, int64_t padding, int64_t activation,
                                  at::IntArrayRef orders) {
  TORCH_CHECK(output_height >= 1 && output_width >= 1, "output_height, output_width: expected positive sizes, got ",
              output_height, " and ", output_width);
  check_features(features);
  const c10::cuda::CUDAGuard guard(features[0].device());
  const FusedArgs a = check_fused(features, boxes, 5, c10::nullopt, weights, bias, labels, output_height,
                                  output_width, scale_y, scale_x, padding, activation, orders);
  at::Tensor out = new_output({a.num_rows, a.outputs, output_height, output_width}, features[0].options());
  fused_forward(features, a, scale_y, scale_x, padding, activation, out);
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> fused_hypercolumn_backward_cuda(
    const at::Tensor& grad, at::TensorList features, const at::Tensor& boxes, at::TensorList weights,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& labels, int64_t output_height,
    int64_t output_width, at::ArrayRef<double> scale_y, at::ArrayRef<double> scale_x, int64_t padding,
    int64_t activation, at::IntArrayRef orders) {
  TORCH_CHECK(output_height >= 1 && output_width >= 1, "output_height, output_width: expected positive sizes, got ",
              output_height, " and ", output_width);
  check_features(features);
  const c10::cuda::CUDAGuard guard(features[0].device());
  const FusedArgs a = check_fused(features, boxes, 5, c10::nullopt, weights, bias, labels, output_height,
                                  output_width, scale_y, scale_x, padding, activation, orders);
  check_grad(grad, {a.num_rows, a.outputs, output_height, output_width}, features[0]);
  return fused_backward(grad.to(features[0].scalar_type()), features, weights, a, scale_y, scale_x, padding, activation);
}

at::Tensor fused_hypercolumn_points_cuda(at::TensorList features, const at::Tensor& points,
                                         const c10::optional<at::Tensor>& locations, at::TensorList weights,
                                         const c10::optional<at::Tensor>& bias,
                                         const c10::optional<at::Tensor>& labels, at::ArrayRef<double> scale_y,
                                         at::ArrayRef<double> scale_x, int64_t padding, int64_t activation,
                                         at::IntArrayRef orders) {
  check_features(features);
  const c10::cuda::CUDAGuard guard(features[0].device());
  const FusedArgs a = check_fused(features, points, 3, locations, weights, bias, labels, 0, 0, scale_y, scale_x,
                                  padding, activation, orders);
  at::Tensor out = new_output({a.num_rows, a.outputs}, features[0].options());
  fused_forward(features, a, scale_y, scale_x, padding, activation, out);
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> fused_hypercolumn_points_backward_cuda(
    const at::Tensor& grad, at::TensorList features, const at::Tensor& points,
    const c10::optional<at::Tensor>& locations, at::TensorList weights, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& labels, at::ArrayRef<double> scale_y, at::ArrayRef<double> scale_x,
    int64_t padding, int64_t activation, at::IntArrayRef orders) {
  check_features(features);
  const c10::cuda::CUDAGuard guard(features[0].device());
  const FusedArgs a = check_fused(features, points, 3, locations, weights, bias, labels, 0, 0, scale_y, scale_x,
                                  padding, activation, orders);
  check_grad(grad, {a.num_rows, a.outputs}, features[0]);
  return fused_backward(grad.to(features[0].scalar_type()), features, weights, a, scale_y, scale_x, padding, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(hypercolumn_ops, CUDA, m) {
  m.impl("fused_hypercolumn", &fused_hypercolumn_cuda);
  m.impl("fused_hypercolumn_backward", &fused_hypercolumn_backward_cuda);
  m.impl("fused_hypercolumn_points", &fused_hypercolumn_points_cuda);
  m.impl("fused_hypercolumn_points_backward", &fused_hypercolumn_points_backward_cuda);
}

}  // namespace cuda
}  // namespace hypercolumn_ops
