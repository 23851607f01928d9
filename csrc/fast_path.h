// The fast path of the public Python operators (csrc/fast_path.cpp), registered on the
// extension's Python module by csrc/python_module.cpp.
#pragma once

#include <torch/extension.h>

namespace hypercolumn_ops {

void register_fast_path(pybind11::module_& m);

}  // namespace hypercolumn_ops
