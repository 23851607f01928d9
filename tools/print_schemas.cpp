// Loads libhypercolumn_ops (linked without --as-needed) and prints the schema of every
// hypercolumn_ops operator and the dispatch keys it has kernels for; exits 1 if none are found, one
// lacks a CPU kernel, or one that returns tensors lacks its autograd kernel (csrc/autograd.cpp).
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <iostream>

int main() {
  int found = 0, missing = 0;
  for (const auto& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (name.name.rfind("hypercolumn_ops::", 0) != 0) continue;
    auto op = c10::Dispatcher::singleton().findOp(name);
    const bool cpu = op->hasKernelForDispatchKey(c10::DispatchKey::CPU);
    const bool autograd = op->hasKernelForDispatchKey(c10::DispatchKey::Autograd);
    // Every operator but index_values_valid (a bool) returns tensors and needs its formula.
    const auto& returns = op->schema().returns();
    const bool differentiable = std::any_of(returns.begin(), returns.end(),
                                            [](const c10::Argument& r) { return !r.type()->cast<c10::BoolType>(); });
    std::cout << op->schema() << "\n    CPU kernel: " << (cpu ? "yes" : "no")
              << ", CUDA kernel: " << (op->hasKernelForDispatchKey(c10::DispatchKey::CUDA) ? "yes" : "no")
              << ", autograd: " << (autograd ? "yes" : "no") << "\n";
    ++found;
    missing += cpu && (autograd || !differentiable) ? 0 : 1;
  }
  std::cout << found << " hypercolumn_ops operators\n";
  return found > 0 && missing == 0 ? 0 : 1;
}
