// Work items of the CPU kernels and the channel-block accumulators the backward passes scatter
// into.
//
// Determinism: every backward writes each gradient element from one work item, which visits
// the points in their order; which thread runs an item never changes a result.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace hypercolumn_ops {
namespace cpu {

// Points handed to one thread at a time when the work is per point.
constexpr int64_t kPointBlock = 256;
// Elements of a per-item float accumulator (512 KiB of float32): half an L2 of this machine's
// cores, so the scatter of a channel block stays in cache.
constexpr int64_t kAccumulatorElements = int64_t(1) << 17;

// Runs fn(item) for item in [0, count) on at::parallel_for's threads, handing items out as
// threads free up (items may differ in cost). Items must write disjoint outputs. Worker
// threads do not inherit the caller's dispatch state, so ATen calls inside an item (GEMM tiles)
// are explicitly kept below autograd, as the kernel itself is.
template <typename Fn>
void run_items(int64_t count, const Fn& fn) {
  if (count <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t item = next++; item < count; item = next++) fn(item);
  });
}

// A block of channels [c0, c1) of one layer: the unit of work of a backward scatter.
struct ChannelBlock {
  int64_t layer, c0, c1;
};

// Channel blocks of every layer, each small enough that a float accumulator of the block over
// the whole map (B * H * W * channels) fits kAccumulatorElements.
inline std::vector<ChannelBlock> channel_blocks(at::TensorList features,
                                                const std::vector<int64_t>& layers) {
  std::vector<ChannelBlock> blocks;
  for (int64_t l : layers) {
    const at::Tensor& f = features[l];
    const int64_t pixels = std::max<int64_t>(f.size(0) * f.size(2) * f.size(3), 1);
    const int64_t width = std::max<int64_t>(kAccumulatorElements / pixels, 1);
    for (int64_t c0 = 0; c0 < f.size(1); c0 += width)
      blocks.push_back(ChannelBlock{l, c0, std::min(c0 + width, f.size(1))});
  }
  return blocks;
}

// Writes a (B, H, W, c1 - c0) accumulator into channels [c0, c1) of `grad` (B, C, H, W, any
// strides).
template <typename scalar_t, typename acc_t>
void write_channel_block(const std::vector<acc_t>& block, const at::Tensor& grad, int64_t c0,
                         int64_t c1) {
  scalar_t* out = grad.data_ptr<scalar_t>();
  const int64_t batch = grad.size(0), height = grad.size(2), width = grad.size(3);
  const int64_t channels = c1 - c0;
  const int64_t sb = grad.stride(0), sc = grad.stride(1), sh = grad.stride(2), sw = grad.stride(3);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t y = 0; y < height; ++y) {
      for (int64_t x = 0; x < width; ++x) {
        const acc_t* from = block.data() + ((b * height + y) * width + x) * channels;
        scalar_t* to = out + b * sb + c0 * sc + y * sh + x * sw;
        for (int64_t c = 0; c < channels; ++c) to[c * sc] = scalar_t(from[c]);
      }
    }
  }
}

}  // namespace cpu
}  // namespace hypercolumn_ops
