// Output allocation for kernels: empty tensors, or NaN-filled ones when the environment sets
// HYPERCOLUMN_OPS_POISON=1 (the tests do), so an element a kernel forgets to write shows up as
// NaN instead of passing by luck with stale memory.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace hypercolumn_ops {

inline bool poison_outputs() {
  static const bool enabled = [] {
    const char* value = std::getenv("HYPERCOLUMN_OPS_POISON");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  return enabled;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                             at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  at::Tensor out = at::empty(sizes, options.memory_format(format));
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

}  // namespace hypercolumn_ops
