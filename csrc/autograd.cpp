// Autograd formulas of the hypercolumn_ops operators, under the Autograd key of every device.
//
// Gradients flow to features, weights and bias; coordinates, locations and labels are constants,
// as in torchvision.ops.roi_align. Backward recomputes what forward sampled: it saves the inputs
// only. In C++ rather than with torch.library.register_autograd so that a call costs the host no
// Python (about 0.1 ms per forward+backward), and so that libtorch users of the CMake library get
// the gradients too. The backward operators are not differentiable: differentiating one (a
// gradient of a gradient) raises NotImplementedError instead of giving a wrong result.
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "op_handles.h"

namespace hypercolumn_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Saved tensors: the features, then `rest` (undefined where an optional input is absent); the
// plain arguments go into saved_data.
void save(AutogradContext* ctx, at::TensorList features, std::vector<at::Tensor> rest) {
  ctx->saved_data["layers"] = static_cast<int64_t>(features.size());
  std::vector<at::Tensor> tensors(features.begin(), features.end());
  tensors.insert(tensors.end(), rest.begin(), rest.end());
  ctx->save_for_backward(tensors);
}

// The image size stays a list of SymInts: under torch.compile it may be symbolic, and forcing it
// to an int here would specialise the compiled graph on it.
void save_scales(AutogradContext* ctx, c10::SymIntArrayRef image_size, at::ArrayRef<double> spatial_scale,
                 int64_t padding) {
  ctx->saved_data["image_size"] = image_size;
  ctx->saved_data["spatial_scale"] = spatial_scale.vec();
  ctx->saved_data["padding"] = padding;
}

// box grids' sampling options (box_hypercolumn, fused_hypercolumn).
void save_grid(AutogradContext* ctx, int64_t output_height, int64_t output_width, int64_t sampling_ratio,
               bool aligned) {
  ctx->saved_data["output_height"] = output_height;
  ctx->saved_data["output_width"] = output_width;
  ctx->saved_data["sampling_ratio"] = sampling_ratio;
  ctx->saved_data["aligned"] = aligned;
}

struct Saved {
  std::vector<at::Tensor> features, rest;
  std::vector<c10::SymInt> image_size;
  std::vector<double> spatial_scale;
  int64_t padding;
};

Saved saved(AutogradContext* ctx) {
  const variable_list tensors = ctx->get_saved_variables();
  const int64_t layers = ctx->saved_data["layers"].toInt();
  return {std::vector<at::Tensor>(tensors.begin(), tensors.begin() + layers),
          std::vector<at::Tensor>(tensors.begin() + layers, tensors.end()),
          ctx->saved_data["image_size"].toSymIntVector(), ctx->saved_data["spatial_scale"].toDoubleVector(),
          ctx->saved_data["padding"].toInt()};
}

struct SavedGrid {
  int64_t output_height, output_width, sampling_ratio;
  bool aligned;
};

SavedGrid saved_grid(AutogradContext* ctx) {
  return {ctx->saved_data["output_height"].toInt(), ctx->saved_data["output_width"].toInt(),
          ctx->saved_data["sampling_ratio"].toInt(), ctx->saved_data["aligned"].toBool()};
}

OptionalTensor optional(const at::Tensor& t) {
  return t.defined() ? OptionalTensor(t) : OptionalTensor();
}

// One gradient per input of the forward, in order (a Tensor[] input counts one per element);
// undefined for the constants.
class Gradients {
 public:
  Gradients& add(std::vector<at::Tensor> grads) {
    list_.insert(list_.end(), grads.begin(), grads.end());
    return *this;
  }
  Gradients& add(at::Tensor grad) {
    list_.push_back(std::move(grad));
    return *this;
  }
  Gradients& none(size_t count) {
    list_.resize(list_.size() + count);
    return *this;
  }
  variable_list done() { return std::move(list_); }

 private:
  variable_list list_;
};

// The bias gradient in the bias input's dtype (the kernels return the features').
at::Tensor bias_grad(const at::Tensor& grad, const at::Tensor& bias) {
  return bias.defined() ? grad.to(bias.scalar_type()) : at::Tensor();
}


class SparseHypercolumn : public torch::autograd::Function<SparseHypercolumn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList features, const at::Tensor& points, Sizes image_size,
                            Scales spatial_scale, int64_t padding) {
    save(ctx, features, {points});
    save_scales(ctx, image_size, spatial_scale, padding);
    const at::AutoDispatchBelowADInplaceOrView below;
    return sparse_op().call(features, points, image_size, spatial_scale, padding);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Saved s = saved(ctx);
    const auto& backward_op = sparse_backward_op();
    return Gradients()
        .add(backward_op.call(grads[0], s.features, s.rest[0], s.image_size, s.spatial_scale, s.padding))
        .none(4)
        .done();
  }
};


class BoxHypercolumn : public torch::autograd::Function<BoxHypercolumn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList features, const at::Tensor& boxes,
                            int64_t output_height, int64_t output_width, Sizes image_size, Scales spatial_scale,
                            int64_t padding, int64_t sampling_ratio, bool aligned) {
    save(ctx, features, {boxes});
    save_scales(ctx, image_size, spatial_scale, padding);
    save_grid(ctx, output_height, output_width, sampling_ratio, aligned);
    const at::AutoDispatchBelowADInplaceOrView below;
    return box_op().call(features, boxes, output_height, output_width, image_size, spatial_scale, padding,
                           sampling_ratio, aligned);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Saved s = saved(ctx);
    const SavedGrid g = saved_grid(ctx);
    const auto& backward_op = box_backward_op();
    return Gradients()
        .add(backward_op.call(grads[0], s.features, s.rest[0], g.output_height, g.output_width, s.image_size,
                              s.spatial_scale, s.padding, g.sampling_ratio, g.aligned))
        .none(8)
        .done();
  }
};

void save_classifier(AutogradContext* ctx, int64_t activation, at::IntArrayRef orders) {
  ctx->saved_data["activation"] = activation;
  ctx->saved_data["orders"] = orders.vec();
}

// Saved tensors of the fused operators: features, then the weights, then `rest`.
void save_fused(AutogradContext* ctx, at::TensorList features, at::TensorList weights, std::vector<at::Tensor> rest) {
  std::vector<at::Tensor> tensors(weights.begin(), weights.end());
  tensors.insert(tensors.end(), rest.begin(), rest.end());
  save(ctx, features, tensors);
}


class FusedHypercolumn : public torch::autograd::Function<FusedHypercolumn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList features, const at::Tensor& boxes,
                            at::TensorList weights, const OptionalTensor& bias, const OptionalTensor& labels,
                            int64_t output_height, int64_t output_width, Sizes image_size, Scales spatial_scale,
                            int64_t padding, int64_t activation, at::IntArrayRef orders, int64_t sampling_ratio,
                            bool aligned) {
    save_fused(ctx, features, weights, {boxes, bias.value_or(at::Tensor()), labels.value_or(at::Tensor())});
    save_scales(ctx, image_size, spatial_scale, padding);
    save_classifier(ctx, activation, orders);
    save_grid(ctx, output_height, output_width, sampling_ratio, aligned);
    const at::AutoDispatchBelowADInplaceOrView below;
    return fused_op().call(features, boxes, weights, bias, labels, output_height, output_width, image_size,
                           spatial_scale, padding, activation, orders, sampling_ratio, aligned);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Saved s = saved(ctx);
    const SavedGrid g = saved_grid(ctx);
    const size_t layers = s.features.size();
    const std::vector<at::Tensor> weights(s.rest.begin(), s.rest.begin() + layers);
    const at::Tensor &boxes = s.rest[layers], &bias = s.rest[layers + 1], &labels = s.rest[layers + 2];
    const auto& backward_op = fused_backward_op();
    auto [grad_features, grad_weights, grad_bias] = backward_op.call(
        grads[0], s.features, boxes, weights, optional(bias), optional(labels), g.output_height, g.output_width,
        s.image_size, s.spatial_scale, s.padding, ctx->saved_data["activation"].toInt(),
        ctx->saved_data["orders"].toIntVector(), g.sampling_ratio, g.aligned);
    return Gradients()
        .add(grad_features)
        .none(1)
        .add(grad_weights)
        .add(bias_grad(grad_bias, bias))
        .none(10)
        .done();
  }
};


class FusedHypercolumnPoints : public torch::autograd::Function<FusedHypercolumnPoints> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList features, const at::Tensor& points,
                            const OptionalTensor& locations, at::TensorList weights, const OptionalTensor& bias,
                            const OptionalTensor& labels, Sizes image_size, Scales spatial_scale, int64_t padding,
                            int64_t activation, at::IntArrayRef orders) {
    save_fused(ctx, features, weights,
               {points, locations.value_or(at::Tensor()), bias.value_or(at::Tensor()), labels.value_or(at::Tensor())});
    save_scales(ctx, image_size, spatial_scale, padding);
    save_classifier(ctx, activation, orders);
    const at::AutoDispatchBelowADInplaceOrView below;
    return fused_points_op().call(features, points, locations, weights, bias, labels, image_size, spatial_scale, padding,
                           activation, orders);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Saved s = saved(ctx);
    const size_t layers = s.features.size();
    const std::vector<at::Tensor> weights(s.rest.begin(), s.rest.begin() + layers);
    const at::Tensor &points = s.rest[layers], &locations = s.rest[layers + 1], &bias = s.rest[layers + 2],
                     &labels = s.rest[layers + 3];
    const auto& backward_op = fused_points_backward_op();
    auto [grad_features, grad_weights, grad_bias] = backward_op.call(
        grads[0], s.features, points, optional(locations), weights, optional(bias), optional(labels), s.image_size,
        s.spatial_scale, s.padding, ctx->saved_data["activation"].toInt(), ctx->saved_data["orders"].toIntVector());
    return Gradients()
        .add(grad_features)
        .none(2)
        .add(grad_weights)
        .add(bias_grad(grad_bias, bias))
        .none(6)
        .done();
  }
};

// Whether autograd has to see a call: grad mode is on and an input takes a gradient, or an input
// carries a forward-mode tangent (which torch::autograd::Function refuses with an error). The
// other calls run the operator below autograd at once, with no node and nothing saved: a forward
// under torch.no_grad or of constants, and a backward operator as the engine runs it (grad mode
// off unless create_graph=True). On a call of a few points that is about a quarter of its time.
bool records_graph(at::TensorList features, at::TensorList weights = {}, const OptionalTensor& bias = {},
                   const at::Tensor& grad = {}) {
  const bool grad_mode = at::GradMode::is_enabled();
  const auto takes = [grad_mode](const at::Tensor& t) {
    return t.defined() && ((grad_mode && t.requires_grad()) || t._fw_grad(/*level=*/0).defined());
  };
  return std::any_of(features.begin(), features.end(), takes) || std::any_of(weights.begin(), weights.end(), takes) ||
         (bias.has_value() && takes(*bias)) || takes(grad);
}

// Calls the operator of `handle` below autograd.
template <typename Signature, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Signature>& handle, const Args&... args) {
  const at::AutoDispatchBelowADInplaceOrView below;
  return handle.call(args...);
}

// A backward operator, computed below autograd. Where its outputs need a graph (a backward pass
// with create_graph=True), differentiating them raises.
class BackwardOnce : public torch::autograd::Function<BackwardOnce> {
 public:
  static variable_list forward(AutogradContext* ctx, const std::string& name, at::TensorList inputs,
                               const std::function<variable_list()>& run) {
    ctx->saved_data["name"] = name;
    const at::AutoDispatchBelowADInplaceOrView below;
    return run();
  }

  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, ctx->saved_data["name"].toStringRef(),
                                ": the gradient of this gradient (double backward) is not supported");
  }
};

// The inputs of a backward operator that can take gradients: the incoming gradient, the features
// and, for the fused operators, the weights and the bias.
// (Passed to BackwardOnce::apply as a TensorList: autograd takes a std::vector for a constant.)
std::vector<at::Tensor> differentiable(const at::Tensor& grad, at::TensorList features, at::TensorList weights = {},
                                       const OptionalTensor& bias = {}) {
  std::vector<at::Tensor> inputs{grad};
  inputs.insert(inputs.end(), features.begin(), features.end());
  inputs.insert(inputs.end(), weights.begin(), weights.end());
  if (bias.has_value() && bias->defined()) inputs.push_back(*bias);
  return inputs;
}

std::vector<at::Tensor> sparse_hypercolumn_backward_autograd(const at::Tensor& grad, at::TensorList features,
                                                             const at::Tensor& points, Sizes image_size,
                                                             Scales spatial_scale, int64_t padding) {
  const auto& backward_op = sparse_backward_op();
  if (!records_graph(features, {}, {}, grad)) {
    return call_below_autograd(backward_op, grad, features, points, image_size, spatial_scale, padding);
  }
  const std::vector<at::Tensor> inputs = differentiable(grad, features);
  return BackwardOnce::apply(backward_op.schema().name(), at::TensorList(inputs), [&] {
    return backward_op.call(grad, features, points, image_size, spatial_scale, padding);
  });
}

std::vector<at::Tensor> box_hypercolumn_backward_autograd(const at::Tensor& grad, at::TensorList features,
                                                          const at::Tensor& boxes, int64_t output_height,
                                                          int64_t output_width, Sizes image_size, Scales spatial_scale,
                                                          int64_t padding, int64_t sampling_ratio, bool aligned) {
  const auto& backward_op = box_backward_op();
  if (!records_graph(features, {}, {}, grad)) {
    return call_below_autograd(backward_op, grad, features, boxes, output_height, output_width, image_size,
                               spatial_scale, padding, sampling_ratio, aligned);
  }
  const std::vector<at::Tensor> inputs = differentiable(grad, features);
  return BackwardOnce::apply(backward_op.schema().name(), at::TensorList(inputs), [&] {
    return backward_op.call(grad, features, boxes, output_height, output_width, image_size, spatial_scale, padding,
                            sampling_ratio, aligned);
  });
}

// The fused backward's (features, weights, bias) gradients as one list, and back.
variable_list flatten(FusedGrads grads) {
  auto& [features, weights, bias] = grads;
  variable_list flat(features.begin(), features.end());
  flat.insert(flat.end(), weights.begin(), weights.end());
  flat.push_back(bias);
  return flat;
}

FusedGrads unflatten(const variable_list& flat) {
  const size_t layers = (flat.size() - 1) / 2;
  return {std::vector<at::Tensor>(flat.begin(), flat.begin() + layers),
          std::vector<at::Tensor>(flat.begin() + layers, flat.end() - 1), flat.back()};
}

FusedGrads fused_hypercolumn_backward_autograd(const at::Tensor& grad, at::TensorList features,
                                               const at::Tensor& boxes, at::TensorList weights,
                                               const OptionalTensor& bias, const OptionalTensor& labels,
                                               int64_t output_height, int64_t output_width, Sizes image_size,
                                               Scales spatial_scale, int64_t padding, int64_t activation,
                                               at::IntArrayRef orders, int64_t sampling_ratio, bool aligned) {
  const auto& backward_op = fused_backward_op();
  if (!records_graph(features, weights, bias, grad)) {
    return call_below_autograd(backward_op, grad, features, boxes, weights, bias, labels, output_height,
                               output_width, image_size, spatial_scale, padding, activation, orders, sampling_ratio,
                               aligned);
  }
  const std::vector<at::Tensor> inputs = differentiable(grad, features, weights, bias);
  return unflatten(BackwardOnce::apply(backward_op.schema().name(), at::TensorList(inputs), [&] {
    return flatten(backward_op.call(grad, features, boxes, weights, bias, labels, output_height, output_width,
                                    image_size, spatial_scale, padding, activation, orders, sampling_ratio, aligned));
  }));
}

FusedGrads fused_hypercolumn_points_backward_autograd(const at::Tensor& grad, at::TensorList features,
                                                      const at::Tensor& points, const OptionalTensor& locations,
                                                      at::TensorList weights, const OptionalTensor& bias,
                                                      const OptionalTensor& labels, Sizes image_size,
                                                      Scales spatial_scale, int64_t padding, int64_t activation,
                                                      at::IntArrayRef orders) {
  const auto& backward_op = fused_points_backward_op();
  if (!records_graph(features, weights, bias, grad)) {
    return call_below_autograd(backward_op, grad, features, points, locations, weights, bias, labels, image_size,
                               spatial_scale, padding, activation, orders);
  }
  const std::vector<at::Tensor> inputs = differentiable(grad, features, weights, bias);
  return unflatten(BackwardOnce::apply(backward_op.schema().name(), at::TensorList(inputs), [&] {
    return flatten(backward_op.call(grad, features, points, locations, weights, bias, labels, image_size,
                                    spatial_scale, padding, activation, orders));
  }));
}

at::Tensor sparse_hypercolumn_autograd(at::TensorList features, const at::Tensor& points, Sizes image_size,
                                       Scales spatial_scale, int64_t padding) {
  if (!records_graph(features)) {
    return call_below_autograd(sparse_op(), features, points, image_size, spatial_scale, padding);
  }
  return SparseHypercolumn::apply(features, points, image_size, spatial_scale, padding);
}

at::Tensor box_hypercolumn_autograd(at::TensorList features, const at::Tensor& boxes, int64_t output_height,
                                    int64_t output_width, Sizes image_size, Scales spatial_scale, int64_t padding,
                                    int64_t sampling_ratio, bool aligned) {
  if (!records_graph(features)) {
    return call_below_autograd(box_op(), features, boxes, output_height, output_width, image_size, spatial_scale,
                               padding, sampling_ratio, aligned);
  }
  return BoxHypercolumn::apply(features, boxes, output_height, output_width, image_size, spatial_scale, padding,
                               sampling_ratio, aligned);
}

at::Tensor fused_hypercolumn_autograd(at::TensorList features, const at::Tensor& boxes, at::TensorList weights,
                                      const OptionalTensor& bias, const OptionalTensor& labels, int64_t output_height,
                                      int64_t output_width, Sizes image_size, Scales spatial_scale, int64_t padding,
                                      int64_t activation, at::IntArrayRef orders, int64_t sampling_ratio,
                                      bool aligned) {
  if (!records_graph(features, weights, bias)) {
    return call_below_autograd(fused_op(), features, boxes, weights, bias, labels, output_height, output_width,
                               image_size, spatial_scale, padding, activation, orders, sampling_ratio, aligned);
  }
  return FusedHypercolumn::apply(features, boxes, weights, bias, labels, output_height, output_width, image_size,
                                 spatial_scale, padding, activation, orders, sampling_ratio, aligned);
}

at::Tensor fused_hypercolumn_points_autograd(at::TensorList features, const at::Tensor& points,
                                             const OptionalTensor& locations, at::TensorList weights,
                                             const OptionalTensor& bias, const OptionalTensor& labels,
                                             Sizes image_size, Scales spatial_scale, int64_t padding,
                                             int64_t activation, at::IntArrayRef orders) {
  if (!records_graph(features, weights, bias)) {
    return call_below_autograd(fused_points_op(), features, points, locations, weights, bias, labels, image_size,
                               spatial_scale, padding, activation, orders);
  }
  return FusedHypercolumnPoints::apply(features, points, locations, weights, bias, labels, image_size, spatial_scale,
                                       padding, activation, orders);
}

}  // namespace

TORCH_LIBRARY_IMPL(hypercolumn_ops, Autograd, m) {
  m.impl("sparse_hypercolumn", &sparse_hypercolumn_autograd);
  m.impl("box_hypercolumn", &box_hypercolumn_autograd);
  m.impl("fused_hypercolumn", &fused_hypercolumn_autograd);
  m.impl("fused_hypercolumn_points", &fused_hypercolumn_points_autograd);
  m.impl("sparse_hypercolumn_backward", &sparse_hypercolumn_backward_autograd);
  m.impl("box_hypercolumn_backward", &box_hypercolumn_backward_autograd);
  m.impl("fused_hypercolumn_backward", &fused_hypercolumn_backward_autograd);
  m.impl("fused_hypercolumn_points_backward", &fused_hypercolumn_points_backward_autograd);
}

}  // namespace hypercolumn_ops
