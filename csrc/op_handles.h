// Typed handles of the operators of csrc/ops.cpp for C++ callers that go through the dispatcher:
// the autograd formulas (csrc/autograd.cpp) and the fast path of the Python operators
// (csrc/fast_path.cpp). Each handle is looked up once.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>
#include <vector>

namespace hypercolumn_ops {

using OptionalTensor = c10::optional<at::Tensor>;
using FusedGrads = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>;

// The operator `name` as seen from the dispatcher's top (under the Autograd key, the formulas of
// autograd.cpp; below it, the device's kernel, or a fake one while tracing).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using Sizes = c10::SymIntArrayRef;
using Scales = at::ArrayRef<double>;

using SparseFn = at::Tensor(at::TensorList, const at::Tensor&, Sizes, Scales, int64_t);
using SparseBackwardFn = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, const at::Tensor&, Sizes, Scales,
                                                 int64_t);
inline const c10::TypedOperatorHandle<SparseFn>& sparse_op() {
  static const auto handle = op<SparseFn>("hypercolumn_ops::sparse_hypercolumn");
  return handle;
}
inline const c10::TypedOperatorHandle<SparseBackwardFn>& sparse_backward_op() {
  static const auto handle = op<SparseBackwardFn>("hypercolumn_ops::sparse_hypercolumn_backward");
  return handle;
}

using BoxFn = at::Tensor(at::TensorList, const at::Tensor&, int64_t, int64_t, Sizes, Scales, int64_t, int64_t, bool);
using BoxBackwardFn = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, const at::Tensor&, int64_t, int64_t,
                                              Sizes, Scales, int64_t, int64_t, bool);
inline const c10::TypedOperatorHandle<BoxFn>& box_op() {
  static const auto handle = op<BoxFn>("hypercolumn_ops::box_hypercolumn");
  return handle;
}
inline const c10::TypedOperatorHandle<BoxBackwardFn>& box_backward_op() {
  static const auto handle = op<BoxBackwardFn>("hypercolumn_ops::box_hypercolumn_backward");
  return handle;
}

using FusedFn = at::Tensor(at::TensorList, const at::Tensor&, at::TensorList, const OptionalTensor&,
                           const OptionalTensor&, int64_t, int64_t, Sizes, Scales, int64_t, int64_t, at::IntArrayRef,
                           int64_t, bool);
using FusedBackwardFn = FusedGrads(const at::Tensor&, at::TensorList, const at::Tensor&, at::TensorList,
                                   const OptionalTensor&, const OptionalTensor&, int64_t, int64_t, Sizes, Scales,
                                   int64_t, int64_t, at::IntArrayRef, int64_t, bool);
inline const c10::TypedOperatorHandle<FusedFn>& fused_op() {
  static const auto handle = op<FusedFn>("hypercolumn_ops::fused_hypercolumn");
  return handle;
}
inline const c10::TypedOperatorHandle<FusedBackwardFn>& fused_backward_op() {
  static const auto handle = op<FusedBackwardFn>("hypercolumn_ops::fused_hypercolumn_backward");
  return handle;
}

using FusedPointsFn = at::Tensor(at::TensorList, const at::Tensor&, const OptionalTensor&, at::TensorList,
                                 const OptionalTensor&, const OptionalTensor&, Sizes, Scales, int64_t, int64_t,
                                 at::IntArrayRef);
using FusedPointsBackwardFn = FusedGrads(const at::Tensor&, at::TensorList, const at::Tensor&, const OptionalTensor&,
                                         at::TensorList, const OptionalTensor&, const OptionalTensor&, Sizes, Scales,
                                         int64_t, int64_t, at::IntArrayRef);
inline const c10::TypedOperatorHandle<FusedPointsFn>& fused_points_op() {
  static const auto handle = op<FusedPointsFn>("hypercolumn_ops::fused_hypercolumn_points");
  return handle;
}
inline const c10::TypedOperatorHandle<FusedPointsBackwardFn>& fused_points_backward_op() {
  static const auto handle = op<FusedPointsBackwardFn>("hypercolumn_ops::fused_hypercolumn_points_backward");
  return handle;
}

}  // namespace hypercolumn_ops
