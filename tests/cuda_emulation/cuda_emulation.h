// Just enough of CUDA to run the kernels of csrc/cuda/ on the CPU, for tests/test_cuda_emulated.py.
//
// tests/cuda_emulation/build.py rewrites each kernel launch `k<<<grid, block, smem, stream>>>(args)`
// into `hc_emulation::launch(grid, block, smem, k, args)`. A launch runs the grid's blocks one after
// another; each block's threads are real threads, so __syncthreads (a barrier), shared memory
// (function statics, and one buffer of `smem` bytes for the dynamic part: one block at a time uses
// them), warp shuffles (a barrier per warp) and atomics (std::atomic_ref) behave as on a GPU,
// threads interleaving in any order. What this cannot
// show: timing, the memory model of the GPU beyond what barriers and atomics order, launch limits.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
#define C10_CUDA_CHECK(error) TORCH_CHECK((error) == 0, "emulated CUDA call failed")

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

namespace hc_emulation {

struct Block {
  explicit Block(unsigned threads)
      : barrier(threads), lanes(threads) {
    for (unsigned first = 0; first < threads; first += 32) {
      warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - first)));
    }
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<double> lanes;  // one shuffle slot per thread
};

inline thread_local Block* current = nullptr;
inline thread_local unsigned char* dynamic_shared = nullptr;  // the launch's dynamic shared memory

inline unsigned thread_rank() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

inline void sync_block() { current->barrier.arrive_and_wait(); }

template <typename T>
T shfl_down(T value, unsigned offset) {
  const unsigned rank = thread_rank(), lane = rank % 32;
  std::barrier<>& warp = *current->warps[rank / 32];
  current->lanes[rank] = static_cast<double>(value);
  warp.arrive_and_wait();
  const unsigned source = rank + offset;
  const T result = (lane + offset < 32 && source < current->lanes.size()) ? static_cast<T>(current->lanes[source]) : value;
  warp.arrive_and_wait();
  return result;
}

// One thread per block thread, reused for every block of the grid: after a block, all of them
// meet at `between_blocks`, whose completion step sets up the next block's barriers.
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, void (*kernel)(Params...), Args&&... args) {
  const unsigned threads = block.x * block.y * block.z;
  const unsigned blocks = grid.x * grid.y * grid.z;
  if (threads == 0 || blocks == 0) return;
  // Poisoned, as shared memory holds whatever the previous block left.
  std::vector<std::max_align_t> shared((shared_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t));
  std::memset(shared.data(), 0xff, shared.size() * sizeof(std::max_align_t));
  std::unique_ptr<Block> state = std::make_unique<Block>(threads);
  std::barrier between_blocks(threads, [&]() noexcept { state = std::make_unique<Block>(threads); });
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      gridDim = grid;
      blockDim = block;
      dynamic_shared = reinterpret_cast<unsigned char*>(shared.data());
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned b = 0; b < blocks; ++b) {
        current = state.get();
        blockIdx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y));
        kernel(args...);
        // An exited thread no longer takes part in barriers (as __syncthreads on sm_70+).
        current->warps[t / 32]->arrive_and_drop();
        current->barrier.arrive_and_drop();
        between_blocks.arrive_and_wait();
      }
    });
  }
  for (std::thread& thread : pool) thread.join();
}

}  // namespace hc_emulation

#define __syncthreads() hc_emulation::sync_block()
#define HC_DYNAMIC_SHARED(name) unsigned char* name = hc_emulation::dynamic_shared
#define __shfl_down_sync(mask, value, offset) hc_emulation::shfl_down(value, offset)

template <typename T>
inline T gpuAtomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

namespace at {
namespace cuda {
inline int getCurrentCUDAStream() { return 0; }
}  // namespace cuda
}  // namespace at

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(const at::Device&) {}
};
}  // namespace cuda
}  // namespace c10

template <typename StreamT>
inline int cudaMemsetAsync(void* address, int value, size_t bytes, StreamT) {
  std::memset(address, value, bytes);
  return 0;
}

// cub's radix sort as its documentation specifies it: (key, value) pairs ordered by bits
// [begin_bit, end_bit) of the key alone, stably; a first call without storage asks its size.
namespace cub {
struct DeviceRadixSort {
  template <typename KeyT, typename ValueT, typename NumItemsT, typename StreamT>
  static int SortPairs(void* temp_storage, size_t& temp_storage_bytes, const KeyT* keys_in, KeyT* keys_out,
                       const ValueT* values_in, ValueT* values_out, NumItemsT num_items, int begin_bit, int end_bit,
                       StreamT) {
    if (temp_storage == nullptr) {
      temp_storage_bytes = 1;
      return 0;
    }
    const int width = end_bit - begin_bit;
    const uint64_t mask = width >= 64 ? ~uint64_t(0) : (uint64_t(1) << width) - 1;
    const auto digits = [&](int64_t i) { return (static_cast<uint64_t>(keys_in[i]) >> begin_bit) & mask; };
    std::vector<int64_t> order(static_cast<size_t>(num_items));
    std::iota(order.begin(), order.end(), int64_t(0));
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return digits(a) < digits(b); });
    for (size_t k = 0; k < order.size(); ++k) {
      keys_out[k] = keys_in[order[k]];
      values_out[k] = values_in[order[k]];
    }
    return 0;
  }
};
}  // namespace cub
