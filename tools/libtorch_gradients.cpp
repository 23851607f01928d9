// Loads libhypercolumn_ops (linked without --as-needed) and takes a gradient through one of its
// operators from C++ alone, as a libtorch program would: sparse_hypercolumn at a point that falls
// exactly on pixel (2, 1) of a 4 x 4 map samples that pixel, so d(output)/d(features) is one there
// and zero elsewhere. Exits 1 if the output or the gradient is not that.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>

int main() {
  using Signature = at::Tensor(at::TensorList, const at::Tensor&, c10::SymIntArrayRef, at::ArrayRef<double>, int64_t);
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("hypercolumn_ops::sparse_hypercolumn", "")
                      .typed<Signature>();
  const at::Tensor features = at::arange(16, at::kDouble).reshape({1, 1, 4, 4}).requires_grad_();
  // (batch, x, y) in image pixels; with image_size (4, 4) the scale is 1 and the map coordinate is
  // (x - 0.5, y - 0.5) = (1, 2).
  const at::Tensor points = at::tensor({0.0, 1.5, 2.5}, at::kDouble).reshape({1, 3});
  const std::vector<at::Tensor> maps{features};
  const std::vector<c10::SymInt> image_size{4, 4};
  const at::Tensor out = op.call(maps, points, image_size, {}, 0);
  out.sum().backward();
  at::Tensor expected = at::zeros({1, 1, 4, 4}, at::kDouble);
  expected[0][0][2][1] = 1.0;
  const bool ok = out.item<double>() == 9.0 && features.grad().defined() && features.grad().equal(expected);
  std::cout << "output " << out.item<double>() << ", gradient "
            << (features.grad().defined() ? "one-hot at (2, 1): " : "missing: ") << (ok ? "ok" : "WRONG") << "\n";
  return ok ? 0 : 1;
}
