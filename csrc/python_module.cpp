// The Python module of the compiled extension: its build facts, read at import by
// hypercolumn_ops/_native.py to refuse a library built against another torch before any of its
// kernels can run; the value check of CPU tensors, which the public operators run on every call
// (called here without the dispatcher: a call through torch.ops costs the host several times the
// check itself on the few rows of a typical call); and the operators' fast path (fast_path.cpp).
#include <torch/extension.h>
#include <torch/version.h>

#include "fast_path.h"
#include "index_check.h"

namespace {

// Whether the 1-D CPU `values`, or column 0 of the 2-D CPU `values` (coordinate rows), holds
// integer values in [0, size) only.
bool index_values_valid(const at::Tensor& values, int64_t size) {
  TORCH_CHECK(values.defined() && values.device().is_cpu(), "values: expected a CPU tensor");
  TORCH_CHECK(values.dim() == 1 || values.dim() == 2, "values: expected a 1-D or 2-D tensor, got shape ",
              values.sizes());
  return hypercolumn_ops::cpu::index_column_valid_cpu(values, size);
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = TORCH_VERSION;
#ifdef HYPERCOLUMN_OPS_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hypercolumn_ops compiled kernels (operators live in torch.ops.hypercolumn_ops)";
  m.def("build_info", &build_info, "How this extension was built.");
  m.def("index_values_valid", &index_values_valid, pybind11::arg("values"), pybind11::arg("size"),
        "Whether a CPU tensor's values (column 0 of rows) are integer values in [0, size).");
  hypercolumn_ops::register_fast_path(m);
}
