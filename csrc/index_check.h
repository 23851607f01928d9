// index_values_valid: whether every element of a 1-D tensor (a batch-index column of points or
// boxes, or labels) is an integer value in [0, size). The Python wrappers' value checks call it
// before any kernel runs; on CUDA it is one kernel and one device-to-host copy of a flag.
#pragma once

#include <ATen/ATen.h>

namespace hypercolumn_ops {

inline void check_index_values(const at::Tensor& values, int64_t size) {
  TORCH_CHECK(values.dim() == 1, "values: expected a 1-D tensor, got shape ", values.sizes());
  const auto type = values.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kLong,
              "values: expected float32, float64 or int64, got ", type);
  TORCH_CHECK(size >= 0, "size: expected a non-negative count, got ", size);
}

namespace cpu {

// The CPU kernel (csrc/cpu/index_check.cpp), also called directly, without the dispatcher, by the
// Python module's value check of CPU tensors (csrc/python_module.cpp).
bool index_values_valid_cpu(const at::Tensor& values, int64_t size);

// The same of the 1-D CPU `values`, or of column 0 of the 2-D CPU `values` (coordinate rows).
inline bool index_column_valid_cpu(const at::Tensor& values, int64_t size) {
  return index_values_valid_cpu(values.dim() == 2 ? values.select(1, 0) : values, size);
}

}  // namespace cpu
}  // namespace hypercolumn_ops
