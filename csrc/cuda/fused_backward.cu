// CUDA kernels of fused_hypercolumn and fused_hypercolumn_points, backward (the device side in
// fused_grads.cuh).
//
// Backward recomputes the scores the same way where the sigmoid needs them, and stores each
// point's score gradients (P, 4, M) and cell keys (P, 4); then per layer
//   order 0: scatters W^T (score gradient) onto the feature taps (scatter_to_taps, tap_scatter_launch.cuh), and
//            sums (score gradient) x (resampled features) into per-chunk weight-gradient partials,
//            which at::sum then adds;
//   order 1: scatters the score gradients onto a score-map gradient, from which
//            project_grads_in_kernels (small products) or cuBLAS forms the feature and weight
//            gradients.
// The scatters use atomics by default; under torch.use_deterministic_algorithms(True) each pixel's
// contributions are summed in a fixed order instead (gather_to_taps, tap_scatter_launch.cuh; score maps by
// ScoreBins, which adds only the 4 cells a point touches), and order 1 stays where cuBLAS is
// reproducible (CUBLAS_WORKSPACE_CONFIG). Deterministic mode never raises.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "fused_call.cuh"
#include "fused_grads.cuh"
#include "fused_scores.cuh"
#include "launch.h"
#include "score_projection.cuh"
#include "tap_scatter_launch.cuh"

namespace hypercolumn_ops {
namespace cuda {
namespace {

using FusedGrads = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>;

// Segments per row for the bias gradient: enough warps to fill the GPU (about 4,096), each
// segment at least 256 slots (8 per lane).
int64_t bias_segment_slots(int64_t rows, int64_t slots_per_row, int64_t cells, int64_t outputs) {
  const int64_t warps = rows * ceil_div(cells, kBiasCellChunk) * outputs;
  const int64_t segments = std::min(ceil_div(4096, warps), ceil_div(slots_per_row, 256));
  return ceil_div(slots_per_row, std::max<int64_t>(segments, 1));
}

// Points per block of weight_grad_kernel: chunks of about 256 points, each with its own partial
// (NC * KK * M, C), at most 2^24 partial elements in all. Fixed by the shapes, so the order of
// every sum is too.
int64_t weight_grad_chunk_points(int64_t num_points, int64_t partial_size) {
  const int64_t max_chunks = std::max<int64_t>(1, (int64_t(1) << 24) / std::max<int64_t>(1, partial_size));
  return ceil_div(num_points, std::min(ceil_div(num_points, 256), max_chunks));
}

FusedGrads fused_backward(const at::Tensor& grad_out, at::TensorList features, at::TensorList weights,
                          const FusedArgs& a, int64_t padding, int64_t activation) {
  const at::Tensor& first = features[0];
  const int64_t batch = first.size(0);
  const auto acc_type = accumulation_dtype(first.scalar_type());
  std::vector<at::Tensor> grad_features(features.size()), grad_weights(features.size());
  // Layer l's weight gradient from a product's result in the weights' dtype: a view where the
  // weights are contiguous, else a copy with their strides.
  const auto product_weight_grad = [&](size_t l, const at::Tensor& grad) {
    const at::Tensor shaped = grad.view(weights[l].sizes());
    return weights[l].is_contiguous() ? shaped : at::empty_like(weights[l]).copy_(shaped);
  };
  at::Tensor grad_bias;
  if (a.num_points == 0 || batch == 0) {
    for (size_t l = 0; l < features.size(); ++l) {
      grad_features[l] = at::zeros_like(features[l]);
      grad_weights[l] = at::zeros_like(weights[l]);
    }
    return {grad_features, grad_weights, at::zeros({a.num_rows, a.cells, a.outputs}, first.options())};
  }
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const auto stream = at::cuda::getCurrentCUDAStream();
  // The sigmoid's slope needs the scores; a linear blend's gradient does not.
  const std::vector<at::Tensor> maps =
      activation == kActivationSigmoid ? score_maps(features, a) : std::vector<at::Tensor>();
  const at::Tensor slot_grads = at::empty({a.num_points, kSlots, a.outputs}, first.options().dtype(acc_type));
  const at::Tensor slot_keys = at::empty({a.num_points, kSlots}, first.options().dtype(at::kLong));
  const int64_t score_rows = a.classes * a.cells * a.outputs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "fused_backward", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    auto prm = fused_params<scalar_t, acc_t>(a, padding, activation);
    prm.grad_out = grad_out.data_ptr<scalar_t>();
    prm.grad_strides = output_strides(grad_out);
    prm.slot_grads = slot_grads.data_ptr<acc_t>();
    prm.slot_keys = slot_keys.data_ptr<int64_t>();
    launch_fused_scores<scalar_t, acc_t, true>(features, a, maps, prm);
    const acc_t* g = slot_grads.data_ptr<acc_t>();
    const int64_t* keys = slot_keys.data_ptr<int64_t>();

    const auto src = fused_source<acc_t>(a, batch);
    const int64_t slots_per_row = (a.grid_h == 0 ? 1 : a.grid_h * a.grid_w) * kSlots;
    const int64_t segment_slots = bias_segment_slots(a.num_rows, slots_per_row, a.cells, a.outputs);
    const int64_t segments = ceil_div(slots_per_row, segment_slots);
    const at::Tensor partials = at::empty({segments, a.num_rows, a.cells, a.outputs}, slot_grads.options());
    const int64_t bias_warps = segments * a.num_rows * ceil_div(a.cells, kBiasCellChunk) * a.outputs;
    const int bias_blocks = static_cast<int>(std::min<int64_t>(ceil_div(bias_warps, kBiasWarps), 65535));
    bias_grad_partials_kernel<acc_t><<<bias_blocks, kBiasWarps * 32, 0, stream>>>(
        a.num_rows, slots_per_row, segment_slots, segments, static_cast<int>(a.cells), a.outputs, g, keys,
        partials.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_bias = at::sum(partials, at::IntArrayRef{0}).to(first.scalar_type());

    for (size_t l = 0; l < features.size(); ++l) {
      const at::Tensor& f = features[l];
      const int64_t channels = f.size(1);
      const acc_t sy = static_cast<acc_t>(a.scales.y[l]), sx = static_cast<acc_t>(a.scales.x[l]);
      if (a.orders[l] == kOrderProjectScores) {
        // Score-map gradient (B, H*W, NC*KK*M), then the 1x1 convolution's two products.
        at::Tensor score_grad = at::zeros({batch, f.size(2) * f.size(3), score_rows}, f.options().dtype(acc_type));
        // The same memory as a (B, NC*KK*M, H, W) map for the scatters.
        const at::Tensor score_grad_map =
            score_grad.view({batch, f.size(2), f.size(3), score_rows}).permute({0, 3, 1, 2});
        if (deterministic) {
          gather_to_taps<acc_t>(score_grad_map, src, a.num_points, sy, sx, padding,
                                ScoreMapGrads<acc_t>{{g, keys, a.outputs}});
        } else {
          const int64_t total = a.num_points * a.outputs;
          const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(total, 256), 65535));
          with_sampling(src.sampled(), [&](auto sampled) {
            constexpr bool kSampled = decltype(sampled)::value;
            score_grad_scatter_kernel<acc_t, kSampled><<<blocks, 256, 0, stream>>>(
                src, a.num_points, a.outputs, map_view<acc_t>(score_grad_map), sy, sx, padding, g, keys);
          });
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        const at::Tensor weight_matrix = a.weights[l].reshape({score_rows, channels});
        // Dense (effective_order), so empty_like keeps the map's strides and its pixel matrix exists.
        grad_features[l] = at::empty_like(f);
        at::Tensor grad_pixels = pixel_matrix(grad_features[l]);
        const at::Tensor pixels = pixel_matrix(f);
        if (small_projection_grads(pixels, score_rows)) {
          grad_weights[l] =
              product_weight_grad(l, project_grads_in_kernels(score_grad, pixels, weight_matrix, grad_pixels));
          continue;
        }
        const at::Tensor score_grad_typed = score_grad.to(f.scalar_type());
        const at::Tensor stacked = stacked_pixels(pixels);
        at::Tensor stacked_grad = stacked_pixels(grad_pixels);
        if (stacked.defined() && stacked_grad.defined()) {
          // One 2-D product each; the weight gradient's sums over images happen inside cuBLAS.
          const at::Tensor rows_grad = score_grad_typed.view({-1, score_rows});
          at::mm_out(stacked_grad, rows_grad, weight_matrix);
          grad_weights[l] = product_weight_grad(l, at::mm(rows_grad.t(), stacked));
          continue;
        }
        at::bmm_out(grad_pixels, score_grad_typed, weight_matrix.unsqueeze(0).expand({batch, -1, -1}));
        const at::Tensor per_image = at::bmm(score_grad_typed.transpose(1, 2), pixels);
        grad_weights[l] = at::empty_like(weights[l]).copy_(
            at::sum(per_image, at::IntArrayRef{0}, false, acc_type).view(weights[l].sizes()));
        continue;
      }
      const at::Tensor buffer = accumulation_buffer(f);
      const CellFeatureGrads<scalar_t, acc_t> cell_grads{{g, keys, a.outputs}, a.weights[l].data_ptr<scalar_t>(),
                                                         channels};
      scatter_to_taps<acc_t>(buffer, src, a.num_points, sy, sx, padding, cell_grads, deterministic);
      grad_features[l] = feature_grad(f, buffer);
      const int64_t chunk_points = weight_grad_chunk_points(a.num_points, score_rows * channels);
      const int64_t chunks = ceil_div(a.num_points, chunk_points);
      at::Tensor partials = at::zeros({chunks, score_rows, channels}, f.options().dtype(acc_type));
      if (channels > 0) {
        const int threads = channel_threads(channels);
        const int64_t channel_chunks = ceil_div(channels, threads);
        check_grid_y(channel_chunks, "features");
        const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(channel_chunks));
        with_sampling(src.sampled(), [&](auto sampled) {
          constexpr bool kSampled = decltype(sampled)::value;
          weight_grad_kernel<scalar_t, acc_t, kSampled><<<grid, threads, 0, stream>>>(
              const_map_view<scalar_t>(f), src, a.num_points, chunk_points, sy, sx, padding, a.outputs, score_rows,
              g, keys, partials.data_ptr<acc_t>());
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      grad_weights[l] = at::empty_like(weights[l]).copy_(at::sum(partials, at::IntArrayRef{0}).view(weights[l].sizes()));
    }
  });
  return {grad_features, grad_weights, grad_bias};
}

FusedGrads fused_hypercolumn_backward_cuda(const at::Tensor& grad, at::TensorList features, const at::Tensor& boxes,
                                           at::TensorList weights, const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& labels, int64_t output_height,
                                           int64_t output_width, at::IntArrayRef image_size,
                                           at::ArrayRef<double> spatial_scale, int64_t padding, int64_t activation,
                                           at::IntArrayRef orders, int64_t sampling_ratio, bool aligned) {
  FusedArguments checked = check_fused_boxes(features, kDeviceType, boxes, weights, bias, labels, output_height,
                                             output_width, image_size, spatial_scale, padding, activation, orders);
  check_sampling_ratio(sampling_ratio);
  check_grad(grad, {checked.count, checked.shape.outputs, output_height, output_width}, features[0]);
  const c10::cuda::CUDAGuard guard(features[0].device());
  const FusedArgs a = fused_args(features, std::move(checked), weights, bias, labels, orders, output_height,
                                 output_width, sampling_ratio, aligned);
  return fused_backward(grad, features, weights, a, padding, activation);
}

FusedGrads fused_hypercolumn_points_backward_cuda(const at::Tensor& grad, at::TensorList features,
                                                  const at::Tensor& points, const std::optional<at::Tensor>& locations,
                                                  at::TensorList weights, const std::optional<at::Tensor>& bias,
                                                  const std::optional<at::Tensor>& labels, at::IntArrayRef image_size,
                                                  at::ArrayRef<double> spatial_scale, int64_t padding,
                                                  int64_t activation, at::IntArrayRef orders) {
  FusedArguments checked = check_fused_points(features, kDeviceType, points, locations, weights, bias, labels,
                                              image_size, spatial_scale, padding, activation, orders);
  check_grad(grad, {checked.count, checked.shape.outputs}, features[0]);
  const c10::cuda::CUDAGuard guard(features[0].device());
  const FusedArgs a = fused_args(features, std::move(checked), weights, bias, labels, orders, 0, 0, 1, true);
  return fused_backward(grad, features, weights, a, padding, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(hypercolumn_ops, CUDA, m) {
  m.impl("fused_hypercolumn_backward", &fused_hypercolumn_backward_cuda);
  m.impl("fused_hypercolumn_points_backward", &fused_hypercolumn_points_backward_cuda);
}

}  // namespace cuda
}  // namespace hypercolumn_ops
