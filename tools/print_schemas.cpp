// Loads libhypercolumn_ops (linked without --as-needed) and prints the schema of every
// hypercolumn_ops operator and the dispatch keys it has kernels for; exits 1 if none are found, one
// lacks a CPU kernel, or one that returns tensors lacks its autograd kernel (csrc/autograd.cpp).
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>

int main() {
  int found = 0, missing = 0;
  for (const auto& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (name.name.rfind("hypercolumn_ops::", 0) != 0) continue;
    auto op = c10::Dispatcher::singleton().findOp(name);
    const bool cpu = op->hasKernelForDispatchKey(c10::DispatchKey::CPU);
    const bool autograd = op->hasKernelForDispatchKey(c10::DispatchKey::Autograd);
    bool differentiable = false;  // returns a tensor (index_values_valid returns a bool)
    for (const auto& result : op->schema().returns()) {
      differentiable = differentiable || !result.type()->cast<c10::BoolType>();
    }
    std::cout << op->schema() << "\n    CPU kernel: " << (cpu ? "yes" : "no")
              << ", CUDA kernel: " << (op->hasKernelForDispatchKey(c10::DispatchKey::CUDA) ? "yes" : "no")
              << ", autograd: " << (autograd ? "yes" : "no") << "\n";
    ++found;
    missing += cpu && (autograd || !differentiable) ? 0 : 1;
  }
  std::cout << found << " hypercolumn_ops operators\n";
  return found > 0 && missing == 0 ? 0 : 1;
}
