// CUDA kernels of fused_hypercolumn and fused_hypercolumn_points, forward: the scores pass
// (fused_scores.cuh) over every layer, after the score maps of the projected ones
// (score_projection.cuh).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "checks.h"
#include "fused_call.cuh"
#include "fused_scores.cuh"
#include "launch.h"
#include "poison.h"

namespace hypercolumn_ops {
namespace cuda {
namespace {

void fused_forward(at::TensorList features, const FusedArgs& a, int64_t padding, int64_t activation,
                   const at::Tensor& out) {
  if (a.num_points == 0) return;
  const std::vector<at::Tensor> maps = score_maps(features, a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fused_forward", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    auto prm = fused_params<scalar_t, acc_t>(a, padding, activation);
    prm.out = out.data_ptr<scalar_t>();
    prm.out_strides = output_strides(out);
    launch_fused_scores<scalar_t, acc_t, false>(features, a, maps, prm);
  });
}

at::Tensor fused_hypercolumn_cuda(at::TensorList features, const at::Tensor& boxes, at::TensorList weights,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& labels,
                                  int64_t output_height, int64_t output_width, at::IntArrayRef image_size,
                                  at::ArrayRef<double> spatial_scale, int64_t padding, int64_t activation,
                                  at::IntArrayRef orders, int64_t sampling_ratio, bool aligned) {
  FusedArguments checked = check_fused_boxes(features, kDeviceType, boxes, weights, bias, labels, output_height,
                                             output_width, image_size, spatial_scale, padding, activation, orders);
  check_sampling_ratio(sampling_ratio);
  const c10::cuda::CUDAGuard guard(features[0].device());
  const FusedArgs a = fused_args(features, std::move(checked), weights, bias, labels, orders, output_height,
                                 output_width, sampling_ratio, aligned);
  at::Tensor out = new_output({a.num_rows, a.outputs, output_height, output_width}, features[0].options());
  fused_forward(features, a, padding, activation, out);
  return out;
}

at::Tensor fused_hypercolumn_points_cuda(at::TensorList features, const at::Tensor& points,
                                         const std::optional<at::Tensor>& locations, at::TensorList weights,
                                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& labels,
                                         at::IntArrayRef image_size, at::ArrayRef<double> spatial_scale,
                                         int64_t padding, int64_t activation, at::IntArrayRef orders) {
  FusedArguments checked = check_fused_points(features, kDeviceType, points, locations, weights, bias, labels,
                                              image_size, spatial_scale, padding, activation, orders);
  const c10::cuda::CUDAGuard guard(features[0].device());
  const FusedArgs a = fused_args(features, std::move(checked), weights, bias, labels, orders, 0, 0, 1, true);
  at::Tensor out = new_output({a.num_rows, a.outputs}, features[0].options());
  fused_forward(features, a, padding, activation, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hypercolumn_ops, CUDA, m) {
  m.impl("fused_hypercolumn", &fused_hypercolumn_cuda);
  m.impl("fused_hypercolumn_points", &fused_hypercolumn_points_cuda);
}

}  // namespace cuda
}  // namespace hypercolumn_ops
