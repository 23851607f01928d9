// Host-side helpers of the CUDA kernels' launches: the device type of their entries, block
// sizes, the launch limits, and the accumulation buffers of the backward passes.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"

namespace hypercolumn_ops {
namespace cuda {

// The device type every CUDA kernel entry checks its features for (checks.h's check_features).
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;

// Points per block in the sampling kernels: their taps are computed once into shared memory and
// reused by every channel thread of the block.
constexpr int kTilePoints = 32;
// Channel threads per block (at most; fewer for thin layers).
constexpr int kChannelThreads = 128;

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

// A kernel's launch configuration exceeds no CUDA limit: gridDim.y and .z are at most 65535.
inline void check_grid_y(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= 65535, what, ": too many channel or output blocks (", blocks, ") for one launch");
}

// A zero-filled accumulation-type (float32, or float64 for float64 features) gradient buffer for
// `feature`, channels_last so that the channel threads of a warp add to consecutive addresses.
inline at::Tensor accumulation_buffer(const at::Tensor& feature) {
  return at::empty(feature.sizes(), feature.options().dtype(accumulation_dtype(feature.scalar_type())),
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

}  // namespace cuda
}  // namespace hypercolumn_ops
