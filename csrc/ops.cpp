// The operator schema of hypercolumn_ops: one TORCH_LIBRARY for every device.
//
// The Python wrappers (hypercolumn_ops/ops.py) validate the public arguments and pass the
// normalised form below; kernels re-check shapes with TORCH_CHECK so direct callers of
// torch.ops.hypercolumn_ops.* cannot make them read out of bounds.
//
// Normalised arguments:
//   features   L tensors (B, C_l, H_l, W_l), one floating dtype, any strides.
//   points     (N, 3) rows (batch_index, x, y); boxes (R, 5) rows (batch_index, x1, y1, x2, y2);
//              locations (N, 2) rows (u, v) or None when K == 1. Coordinates are float64 for
//              float64 features and float32 otherwise, contiguous.
//   scale_y, scale_x  per-layer scales (H_l / H, W_l / W, or spatial_scale).
//   padding    0 = "border", 1 = "zeros".   activation  0 = none, 1 = "sigmoid".
//   weights    L tensors (NC, KK, M, C_l); NC == 1 unless labels are given.
//   bias       None or (P, KK, M) with P = R or N, any strides (stride 0 for a shared bias).
//   labels     None or (P,) int64 in [0, NC).
//   orders     per layer, 0 = sample features then classify, 1 = project the map to NC*KK*M
//              score channels then sample the scores (hypercolumn_ops/planning.py chooses).
// Backward ops return the gradient of every feature (its shape), of every weight tensor (its
// shape) and of the per-point bias rows (P, KK, M).
//
// index_values_valid(values, size): whether every element of the 1-D float32, float64 or int64
// `values` is an integer value in [0, size) (csrc/index_check.h); the wrappers' value checks of
// batch indices and labels.
#include <torch/library.h>

TORCH_LIBRARY(hypercolumn_ops, m) {
  m.def(
      "sparse_hypercolumn(Tensor[] features, Tensor points, float[] scale_y, float[] scale_x, "
      "int padding) -> Tensor");
  m.def(
      "sparse_hypercolumn_backward(Tensor grad, Tensor[] features, Tensor points, "
      "float[] scale_y, float[] scale_x, int padding) -> Tensor[]");
  m.def(
      "box_hypercolumn(Tensor[] features, Tensor boxes, int output_height, int output_width, "
      "float[] scale_y, float[] scale_x, int padding) -> Tensor");
  m.def(
      "box_hypercolumn_backward(Tensor grad, Tensor[] features, Tensor boxes, int output_height, "
      "int output_width, float[] scale_y, float[] scale_x, int padding) -> Tensor[]");
  m.def(
      "fused_hypercolumn(Tensor[] features, Tensor boxes, Tensor[] weights, Tensor? bias, "
      "Tensor? labels, int output_height, int output_width, float[] scale_y, float[] scale_x, "
      "int padding, int activation, int[] orders) -> Tensor");
  m.def(
      "fused_hypercolumn_backward(Tensor grad, Tensor[] features, Tensor boxes, Tensor[] weights, "
      "Tensor? bias, Tensor? labels, int output_height, int output_width, float[] scale_y, "
      "float[] scale_x, int padding, int activation, int[] orders) -> (Tensor[], Tensor[], Tensor)");
  m.def(
      "fused_hypercolumn_points(Tensor[] features, Tensor points, Tensor? locations, "
      "Tensor[] weights, Tensor? bias, Tensor? labels, float[] scale_y, float[] scale_x, "
      "int padding, int activation, int[] orders) -> Tensor");
  m.def(
      "fused_hypercolumn_points_backward(Tensor grad, Tensor[] features, Tensor points, "
      "Tensor? locations, Tensor[] weights, Tensor? bias, Tensor? labels, float[] scale_y, "
      "float[] scale_x, int padding, int activation, int[] orders) -> (Tensor[], Tensor[], Tensor)");
  m.def("index_values_valid(Tensor values, int size) -> bool");
}
