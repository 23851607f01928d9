// Build facts of the compiled extension, read at import by hypercolumn_ops/_native.py to refuse
// a library built against another torch before any of its kernels can run.
#include <torch/extension.h>
#include <torch/version.h>

namespace {

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
}
