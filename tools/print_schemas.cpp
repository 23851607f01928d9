// Loads libhypercolumn_ops (linked without --as-needed) and prints the schema of every
// hypercolumn_ops operator and the dispatch keys it has kernels for; exits 1 if none are found
// or one lacks a CPU kernel.
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>

int main() {
  int found = 0, without_cpu = 0;
  for (const auto& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (name.name.rfind("hypercolumn_ops::", 0) != 0) continue;
    auto op = c10::Dispatcher::singleton().findOp(name);
    std::cout << op->schema() << "\n    CPU kernel: "
              << (op->hasKernelForDispatchKey(c10::DispatchKey::CPU) ? "yes" : "no")
              << ", CUDA kernel: " << (op->hasKernelForDispatchKey(c10::DispatchKey::CUDA) ? "yes" : "no")
              << "\n";
    ++found;
    without_cpu += op->hasKernelForDispatchKey(c10::DispatchKey::CPU) ? 0 : 1;
  }
  std::cout << found << " hypercolumn_ops operators\n";
  return found > 0 && without_cpu == 0 ? 0 : 1;
}
