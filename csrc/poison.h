// Output allocation for kernels: empty tensors, or NaN-filled ones when the environment sets
// HYPERCOLUMN_OPS_POISON=1 (the tests do), so an element a kernel forgets to write shows up as
// NaN instead of passing by luck with stale memory.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace hypercolumn_ops {

inline bool poison_outputs() {
  static const bool enabled = [] {
    const char* value = std::getenv("HYPERCOLUMN_OPS_POISON");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  return enabled;
}

// Asks for transparent huge pages under a large CPU output before its first touch. With 4 KiB
// pages, the page faults of a fresh output (each zeroing a page) cost more than a sampling
// kernel's work: a 119 MB output on a 2-core EPYC takes 47 ms to first-touch, 6.5 ms with 2 MiB
// pages. A hint only (contents and layout unchanged); systems without THP ignore it.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHugePage = std::uintptr_t(1) << 21;
  if (!t.device().is_cpu() || t.nbytes() < 4 * kHugePage) return;
  const std::uintptr_t begin = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  const std::uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const std::uintptr_t last = (begin + t.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                             at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  at::Tensor out = at::empty(sizes, options.memory_format(format));
  advise_huge_pages(out);
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

}  // namespace hypercolumn_ops
