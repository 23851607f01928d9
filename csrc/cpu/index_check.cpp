// CPU kernel of index_values_valid (csrc/index_check.h): the predicate of the kernels' own
// validity test (batch_index in hypercolumn_math.h), over the values in parallel chunks.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "hypercolumn_math.h"
#include "index_check.h"

namespace hypercolumn_ops {
namespace cpu {

bool index_values_valid_cpu(const at::Tensor& values, int64_t size) {
  check_index_values(values, size);
  bool valid = true;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kLong, values.scalar_type(), "index_values_valid", [&] {
    const scalar_t* data = values.const_data_ptr<scalar_t>();
    const int64_t stride = values.stride(0);
    valid = at::parallel_reduce(
        0, values.size(0), int64_t(1) << 16, true,
        [&](int64_t begin, int64_t end, bool chunk_valid) {
          int64_t b;
          for (int64_t i = begin; i < end && chunk_valid; ++i) {
            chunk_valid = batch_index<scalar_t>(data[i * stride], size, &b);
          }
          return chunk_valid;
        },
        [](bool x, bool y) { return x && y; });
  });
  return valid;
}

}  // namespace cpu
}  // namespace hypercolumn_ops

TORCH_LIBRARY_IMPL(hypercolumn_ops, CPU, m) {
  m.impl("index_values_valid", TORCH_FN(hypercolumn_ops::cpu::index_values_valid_cpu));
}
