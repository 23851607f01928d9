// The argument checks of every kernel entry, CPU and CUDA alike, and the per-layer scales.
//
// The Python wrappers (hypercolumn_ops/ops.py) validate the public arguments first; these checks
// are what keeps a direct caller of torch.ops.hypercolumn_ops.* from making a kernel read or write
// out of bounds: shapes, dtypes, devices, counts, enum codes. Each message names the argument and
// what was expected. An entry names its device type once (check_features); every other tensor
// must then be on the features' device.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "hypercolumn_math.h"

namespace hypercolumn_ops {

// float64 for float64 features, float32 for float16/bfloat16/float32: the dtype of the kernels'
// sums and of the coordinate rows they read.
inline at::ScalarType accumulation_dtype(at::ScalarType features_dtype) {
  return features_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline int64_t total_channels(at::TensorList features) {
  int64_t channels = 0;
  for (const auto& f : features) channels += f.size(1);
  return channels;
}

// Features: L >= 1 tensors (B, C_l, H_l, W_l) of one floating dtype on one device of type
// `device_type`, one batch size, non-empty maps (H_l, W_l >= 1), any strides.
inline void check_features(at::TensorList features, c10::DeviceType device_type) {
  TORCH_CHECK(!features.empty(), "features: expected at least one feature map, got an empty list");
  const at::Tensor& first = features[0];
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor& f = features[l];
    TORCH_CHECK(f.defined(), "features[", l, "]: expected a tensor, got an undefined one");
    TORCH_CHECK(f.dim() == 4, "features[", l, "]: expected a 4-D tensor (B, C, H, W), got shape ", f.sizes());
    if (l == 0) {
      TORCH_CHECK(f.device().type() == device_type, "features[0]: expected a tensor on a ", device_type,
                  " device, got ", f.device());
      const auto dtype = f.scalar_type();
      TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
                  "features[0]: expected float16, bfloat16, float32 or float64, got ", dtype);
    } else {
      TORCH_CHECK(f.device() == first.device(), "features[", l, "]: device ", f.device(),
                  " differs from features[0]'s ", first.device());
      TORCH_CHECK(f.scalar_type() == first.scalar_type(), "features[", l, "]: dtype ", f.scalar_type(),
                  " differs from features[0]'s ", first.scalar_type());
      TORCH_CHECK(f.size(0) == first.size(0), "features[", l, "]: batch size ", f.size(0),
                  " differs from features[0]'s ", first.size(0));
    }
    TORCH_CHECK(f.size(2) >= 1 && f.size(3) >= 1, "features[", l, "]: expected a non-empty map, got shape ",
                f.sizes());
  }
}

// Layer l samples at (x * x[l] - 0.5, y * y[l] - 0.5). Inline storage for up to 8 layers: no
// allocation on a call of the usual sizes.
struct LayerScales {
  c10::SmallVector<double, 8> y, x;
};

// The scales of every layer, from exactly one of image_size (H, W) of the image the network saw,
// sy = H_l / H and sx = W_l / W (double divisions, as Python's H_l / H), or spatial_scale, one per
// layer, sx = sy = spatial_scale[l]. The one place the kernels derive them.
inline LayerScales layer_scales(at::TensorList features, at::IntArrayRef image_size,
                                at::ArrayRef<double> spatial_scale) {
  TORCH_CHECK(image_size.empty() != spatial_scale.empty(),
              "image_size, spatial_scale: expected exactly one of the two to be non-empty, got image_size ",
              image_size, " and spatial_scale ", spatial_scale);
  const size_t layers = features.size();
  LayerScales scales;
  scales.y.resize(layers);
  scales.x.resize(layers);
  if (!image_size.empty()) {
    TORCH_CHECK(image_size.size() == 2, "image_size: expected (H, W), got ", image_size);
    TORCH_CHECK(image_size[0] >= 1 && image_size[1] >= 1, "image_size: expected positive sizes (H, W), got ",
                image_size);
    for (size_t l = 0; l < layers; ++l) {
      scales.y[l] = static_cast<double>(features[l].size(2)) / static_cast<double>(image_size[0]);
      scales.x[l] = static_cast<double>(features[l].size(3)) / static_cast<double>(image_size[1]);
    }
    return scales;
  }
  TORCH_CHECK(spatial_scale.size() == layers, "spatial_scale: expected one scale per layer (", layers, "), got ",
              spatial_scale.size());
  for (size_t l = 0; l < layers; ++l) {
    const double s = spatial_scale[l];
    TORCH_CHECK(std::isfinite(s) && s > 0, "spatial_scale: expected positive finite scales, got ", s, " for layer ",
                l);
    scales.y[l] = s;
    scales.x[l] = s;
  }
  return scales;
}

inline void check_padding(int64_t padding) {
  TORCH_CHECK(padding == kPaddingBorder || padding == kPaddingZeros || padding == kPaddingZerosPerTap,
              "padding: expected 0 (border), 1 (zeros) or 2 (zeros per tap), got ", padding);
}

inline void check_output_size(int64_t output_height, int64_t output_width) {
  TORCH_CHECK(output_height >= 1 && output_width >= 1, "output_height, output_width: expected positive sizes, got (",
              output_height, ", ", output_width, ")");
}

// sampling_ratio of a box operator: at most kMaxSamples samples per axis of an output cell (<= 0 is
// adaptive, itself at most kMaxSamples), so that a huge ratio never makes a kernel loop for ever.
inline void check_sampling_ratio(int64_t sampling_ratio) {
  TORCH_CHECK(sampling_ratio <= kMaxSamples, "sampling_ratio: expected at most ", kMaxSamples,
              " samples per axis of an output cell (<= 0 for adaptive sampling), got ", sampling_ratio);
}

// Coordinate rows (count, columns): points, boxes or locations, on the features' device, of a
// floating dtype; returned as the contiguous accumulation-dtype tensor the kernels read (no copy
// where they already are).
inline at::Tensor coordinate_rows(const char* name, const at::Tensor& rows, int64_t columns,
                                  const at::Tensor& feature) {
  TORCH_CHECK(rows.defined(), name, ": expected a tensor, got an undefined one");
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) == columns, name, ": expected shape (rows, ", columns, "), got ",
              rows.sizes());
  TORCH_CHECK(rows.is_floating_point(), name, ": expected a floating dtype, got ", rows.scalar_type());
  TORCH_CHECK(rows.device() == feature.device(), name, ": expected a tensor on the features' device ",
              feature.device(), ", got ", rows.device());
  const at::ScalarType dtype = accumulation_dtype(feature.scalar_type());
  return rows.scalar_type() == dtype ? rows.contiguous() : rows.to(dtype).contiguous();
}

// The gradient of an output: its shape, the features' dtype and device (any strides).
inline void check_grad(const at::Tensor& grad, at::IntArrayRef sizes, const at::Tensor& feature) {
  TORCH_CHECK(grad.defined(), "grad: expected a tensor, got an undefined one");
  TORCH_CHECK(grad.sizes() == sizes, "grad: expected shape ", sizes, " (the output's), got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == feature.scalar_type(), "grad: expected dtype ", feature.scalar_type(),
              " (the features'), got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == feature.device(), "grad: expected a tensor on the features' device ",
              feature.device(), ", got ", grad.device());
}

// The checked arguments of a sampling operator (sparse_hypercolumn, box_hypercolumn), forward or
// backward: the layers' scales, the coordinate rows and their count, the output's channels.
struct SamplingArguments {
  LayerScales scales;
  at::Tensor rows;
  int64_t count;
  int64_t channels;
};

// `rows` is "points" (N, 3) or "boxes" (R, 5).
inline SamplingArguments check_sampling(at::TensorList features, c10::DeviceType device_type, const char* name,
                                        const at::Tensor& rows, int64_t columns, at::IntArrayRef image_size,
                                        at::ArrayRef<double> spatial_scale, int64_t padding) {
  check_features(features, device_type);
  SamplingArguments args;
  args.scales = layer_scales(features, image_size, spatial_scale);
  check_padding(padding);
  args.rows = coordinate_rows(name, rows, columns, features[0]);
  args.count = args.rows.size(0);
  args.channels = total_channels(features);
  return args;
}

// The classifier of a fused call: NC classifier sets of K x K cells (KK = K * K) of M outputs.
struct ClassifierShape {
  int64_t classes, cells, grid, outputs;
};

// The checked arguments of a fused operator (fused_hypercolumn, fused_hypercolumn_points),
// forward or backward.
struct FusedArguments {
  LayerScales scales;
  at::Tensor rows;       // boxes (R, 5) or points (N, 3), contiguous, accumulation dtype
  at::Tensor locations;  // (N, 2) like rows, or undefined
  int64_t count;         // rows
  ClassifierShape shape;
};

// weights: L tensors (NC, KK, M, C_l) of the features' dtype and device, any strides; bias: None
// or (rows, KK, M) of the features' dtype; labels: None (then NC = 1) or (rows,) int64; activation
// and orders: enum codes (hypercolumn_math.h), one order per layer.
inline ClassifierShape check_classifier(at::TensorList features, at::TensorList weights,
                                        const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& labels, int64_t rows, int64_t activation,
                                        at::IntArrayRef orders) {
  const at::Tensor& first = features[0];
  TORCH_CHECK(activation == kActivationNone || activation == kActivationSigmoid,
              "activation: expected 0 (none) or 1 (sigmoid), got ", activation);
  TORCH_CHECK(orders.size() == features.size(), "orders: expected one per layer (", features.size(), "), got ",
              orders.size());
  for (size_t l = 0; l < orders.size(); ++l) {
    TORCH_CHECK(orders[l] == kOrderSampleFeatures || orders[l] == kOrderProjectScores, "orders[", l,
                "]: expected 0 (sample features) or 1 (project scores), got ", orders[l]);
  }
  TORCH_CHECK(weights.size() == features.size(), "weights: expected one tensor per layer (", features.size(),
              "), got ", weights.size());
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK(w.defined(), "weights[", l, "]: expected a tensor, got an undefined one");
    TORCH_CHECK(w.dim() == 4, "weights[", l, "]: expected (NC, KK, M, C_l), got shape ", w.sizes());
    TORCH_CHECK(w.scalar_type() == first.scalar_type(), "weights[", l, "]: dtype ", w.scalar_type(),
                " differs from the features' ", first.scalar_type());
    TORCH_CHECK(w.device() == first.device(), "weights[", l, "]: expected a tensor on the features' device ",
                first.device(), ", got ", w.device());
    TORCH_CHECK(w.size(3) == features[l].size(1), "weights[", l, "]: expected C_l = ", features[l].size(1),
                " channels (features[", l, "]), got ", w.size(3));
    TORCH_CHECK(w.sizes().slice(0, 3) == weights[0].sizes().slice(0, 3), "weights[", l, "]: (NC, KK, M) = ",
                w.sizes().slice(0, 3), " differs from weights[0]'s ", weights[0].sizes().slice(0, 3));
  }
  ClassifierShape shape{weights[0].size(0), weights[0].size(1), 0, weights[0].size(2)};
  shape.grid = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(shape.cells))));
  TORCH_CHECK(shape.classes >= 1 && shape.cells >= 1 && shape.outputs >= 1 && shape.grid * shape.grid == shape.cells,
              "weights: expected NC >= 1, M >= 1 and KK a perfect square K * K, got (NC, KK, M) = ",
              weights[0].sizes().slice(0, 3));
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 3 && bias->size(0) == rows && bias->size(1) == shape.cells &&
                    bias->size(2) == shape.outputs,
                "bias: expected shape (P, KK, M) = (", rows, ", ", shape.cells, ", ", shape.outputs, "), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == first.scalar_type(), "bias: dtype ", bias->scalar_type(),
                " differs from the features' ", first.scalar_type());
    TORCH_CHECK(bias->device() == first.device(), "bias: expected a tensor on the features' device ", first.device(),
                ", got ", bias->device());
  }
  if (labels.has_value() && labels->defined()) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == rows, "labels: expected shape (", rows, ",), got ",
                labels->sizes());
    TORCH_CHECK(labels->scalar_type() == at::kLong, "labels: expected int64, got ", labels->scalar_type());
    TORCH_CHECK(labels->device() == first.device(), "labels: expected a tensor on the features' device ",
                first.device(), ", got ", labels->device());
  } else {
    TORCH_CHECK(shape.classes == 1, "labels: required with NC = ", shape.classes, " classifier sets, got none");
  }
  return shape;
}

// fused_hypercolumn: `boxes` (R, 5), no locations.
inline FusedArguments check_fused_boxes(at::TensorList features, c10::DeviceType device_type, const at::Tensor& boxes,
                                        at::TensorList weights, const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& labels, int64_t output_height,
                                        int64_t output_width, at::IntArrayRef image_size,
                                        at::ArrayRef<double> spatial_scale, int64_t padding, int64_t activation,
                                        at::IntArrayRef orders) {
  check_features(features, device_type);
  FusedArguments args;
  args.scales = layer_scales(features, image_size, spatial_scale);
  check_padding(padding);
  check_output_size(output_height, output_width);
  args.rows = coordinate_rows("boxes", boxes, 5, features[0]);
  args.count = args.rows.size(0);
  args.shape = check_classifier(features, weights, bias, labels, args.count, activation, orders);
  return args;
}

// fused_hypercolumn_points: `points` (N, 3) and their places in their boxes, `locations` (N, 2),
// which K = 1 may leave out (its one cell has weight 1 at any place).
inline FusedArguments check_fused_points(at::TensorList features, c10::DeviceType device_type,
                                         const at::Tensor& points, const std::optional<at::Tensor>& locations,
                                         at::TensorList weights, const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& labels, at::IntArrayRef image_size,
                                         at::ArrayRef<double> spatial_scale, int64_t padding, int64_t activation,
                                         at::IntArrayRef orders) {
  check_features(features, device_type);
  FusedArguments args;
  args.scales = layer_scales(features, image_size, spatial_scale);
  check_padding(padding);
  args.rows = coordinate_rows("points", points, 3, features[0]);
  args.count = args.rows.size(0);
  args.shape = check_classifier(features, weights, bias, labels, args.count, activation, orders);
  if (locations.has_value() && locations->defined()) {
    args.locations = coordinate_rows("locations", *locations, 2, features[0]);
    TORCH_CHECK(args.locations.size(0) == args.count, "locations: expected ", args.count,
                " rows (one per point), got ", args.locations.size(0));
  } else {
    TORCH_CHECK(args.shape.cells == 1, "locations: required when K > 1 (KK = ", args.shape.cells, ")");
  }
  return args;
}

}  // namespace hypercolumn_ops
