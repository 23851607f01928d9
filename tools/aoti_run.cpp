// Runs an AOTInductor package of a model that calls the operators, from C++ alone: the
// package's calls of hypercolumn_ops::* go through the dispatcher to libhypercolumn_ops (linked
// without --as-needed, so starting this program registers them).
//
// Usage: hypercolumn_ops_aoti MODEL.pt2 CASES.pt
// CASES.pt is a list saved by torch.save, one list of tensors per case: the model's inputs, then
// the output eager PyTorch gave for them (tools/aoti_check.py writes it). Prints each case and
// exits 1 if an output differs from eager's by more than float64 rounding.
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <fstream>
#include <iostream>
#include <iterator>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 CASES.pt\n";
    return 2;
  }
  std::ifstream file(argv[2], std::ios::binary);
  const std::vector<char> bytes{std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
  const c10::List<c10::IValue> cases = torch::jit::pickle_load(bytes).toList();
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  bool ok = !cases.empty();
  for (const c10::IValue& entry : cases) {
    std::vector<at::Tensor> inputs;
    for (const c10::IValue& tensor : entry.toListRef()) {
      inputs.push_back(tensor.toTensor());
    }
    const at::Tensor expected = inputs.back();
    inputs.pop_back();
    const at::Tensor output = loader.run(inputs).at(0);
    // The operators' kernels are the ones eager ran; the code around them is inductor's.
    const bool same = output.sizes() == expected.sizes() && at::allclose(output, expected, 1e-10, 1e-12);
    std::cout << "inputs " << inputs.size() << ", output " << output.sizes() << ": "
              << (same ? "equal to eager" : "DIFFERENT from eager") << "\n";
    ok = ok && same;
  }
  return ok ? 0 : 1;
}
