// CUDA kernel of index_values_valid (csrc/index_check.h). The wrappers' value checks used to be
// four elementwise launches and a reduction before their device-to-host copy; this is one memset,
// one launch and the copy of one flag. Each thread tests its values with the kernels' own
// predicate (batch_index in hypercolumn_math.h) and raises the flag once if any fails.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "hypercolumn_math.h"
#include "index_check.h"
#include "launch.h"

namespace hypercolumn_ops {
namespace cuda {
namespace {

constexpr int kIndexCheckThreads = 256;
constexpr int64_t kIndexCheckMaxBlocks = 1024;  // a grid-stride loop beyond 262,144 values

template <typename scalar_t>
__global__ void __launch_bounds__(kIndexCheckThreads)
    index_check_kernel(const scalar_t* values, int64_t count, int64_t stride, int64_t size, int* invalid) {
  bool bad = false;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step) {
    int64_t b;
    bad = bad || !batch_index<scalar_t>(values[i * stride], size, &b);
  }
  if (bad) gpuAtomicAdd(invalid, 1);
}

bool index_values_valid_cuda(const at::Tensor& values, int64_t size) {
  check_index_values(values, size);
  const int64_t count = values.size(0);
  if (count == 0) return true;
  const c10::cuda::CUDAGuard guard(values.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor invalid = at::empty({1}, values.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(invalid.data_ptr<int>(), 0, sizeof(int), stream));
  const int blocks = static_cast<int>(std::min(ceil_div(count, kIndexCheckThreads), kIndexCheckMaxBlocks));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kLong, values.scalar_type(), "index_values_valid", [&] {
    index_check_kernel<scalar_t><<<blocks, kIndexCheckThreads, 0, stream>>>(
        values.const_data_ptr<scalar_t>(), count, values.stride(0), size, invalid.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return invalid.item<int>() == 0;
}

}  // namespace

TORCH_LIBRARY_IMPL(hypercolumn_ops, CUDA, m) { m.impl("index_values_valid", &index_values_valid_cuda); }

}  // namespace cuda
}  // namespace hypercolumn_ops
