// The operator schema of hypercolumn_ops: one TORCH_LIBRARY for every device.
//
// The Python wrappers (hypercolumn_ops/ops.py) validate the public arguments and pass the
// normalised form below; the kernels of every device check it again (csrc/checks.h) so that direct
// callers of torch.ops.hypercolumn_ops.* get an error, never an out-of-bounds read.
//
// Normalised arguments:
//   features   L tensors (B, C_l, H_l, W_l), one floating dtype, any strides.
//   points     (N, 3) rows (batch_index, x, y); boxes (R, 5) rows (batch_index, x1, y1, x2, y2);
//              locations (N, 2) rows (u, v) or None when K == 1. Coordinates are float64 for
//              float64 features and float32 otherwise, contiguous.
//   image_size, spatial_scale  exactly one is non-empty: image_size (H, W) of the image the
//              network saw, positive, gives layer l the scales sy = H_l / H, sx = W_l / W;
//              spatial_scale, one positive finite float per layer, sx = sy = spatial_scale[l]
//              (csrc/checks.h, layer_scales). image_size is SymInt[]: under torch.compile it may
//              be symbolic, as the features' sizes it is derived from.
//   padding    0 = "border", 1 = "zeros" (roi_align's), 2 = "zeros per tap" (grid_sample's
//              padding_mode="zeros").   activation  0 = none, 1 = "sigmoid".
//   sampling_ratio, aligned  (box grids) torchvision.ops.roi_align's: sample points per grid cell
//              and axis (<= 0: adaptive, ceil(box size / grid size) per box and layer), at most 1024
//              (a larger sampling_ratio is refused), and whether pixel centres are at half-integer
//              coordinates. The kernels of every device implement every padding, sampling_ratio and
//              aligned (docs/semantics.md, "Padding" and "Box grids").
//   weights    L tensors (NC, KK, M, C_l); NC == 1 unless labels are given.
//   bias       None or (P, KK, M) with P = R or N, any strides (stride 0 for a shared bias).
//   labels     None or (P,) int64 in [0, NC).
//   orders     per layer, 0 = sample features then classify, 1 = project the map to NC*KK*M
//              score channels then sample the scores (hypercolumn_ops/planning.py chooses).
// The enum codes are defined once, in csrc/hypercolumn_math.h; csrc/checks.h checks every
// argument for the kernels of both devices.
// Backward ops return the gradient of every feature (its shape), of every weight tensor (its
// shape) and of the per-point bias rows (P, KK, M).
//
// index_values_valid(values, size): whether every element of the 1-D float32, float64 or int64
// `values` is an integer value in [0, size) (csrc/index_check.h); the wrappers' value checks of
// batch indices and labels.
#include <torch/library.h>

TORCH_LIBRARY(hypercolumn_ops, m) {
  m.def(
      "sparse_hypercolumn(Tensor[] features, Tensor points, SymInt[] image_size, float[] spatial_scale, "
      "int padding) -> Tensor");
  m.def(
      "sparse_hypercolumn_backward(Tensor grad, Tensor[] features, Tensor points, SymInt[] image_size, "
      "float[] spatial_scale, int padding) -> Tensor[]");
  m.def(
      "box_hypercolumn(Tensor[] features, Tensor boxes, int output_height, int output_width, "
      "SymInt[] image_size, float[] spatial_scale, int padding, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "box_hypercolumn_backward(Tensor grad, Tensor[] features, Tensor boxes, int output_height, "
      "int output_width, SymInt[] image_size, float[] spatial_scale, int padding, int sampling_ratio, "
      "bool aligned) -> Tensor[]");
  m.def(
      "fused_hypercolumn(Tensor[] features, Tensor boxes, Tensor[] weights, Tensor? bias, "
      "Tensor? labels, int output_height, int output_width, SymInt[] image_size, float[] spatial_scale, "
      "int padding, int activation, int[] orders, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "fused_hypercolumn_backward(Tensor grad, Tensor[] features, Tensor boxes, Tensor[] weights, "
      "Tensor? bias, Tensor? labels, int output_height, int output_width, SymInt[] image_size, "
      "float[] spatial_scale, int padding, int activation, int[] orders, int sampling_ratio, "
      "bool aligned) -> (Tensor[], Tensor[], Tensor)");
  m.def(
      "fused_hypercolumn_points(Tensor[] features, Tensor points, Tensor? locations, "
      "Tensor[] weights, Tensor? bias, Tensor? labels, SymInt[] image_size, float[] spatial_scale, "
      "int padding, int activation, int[] orders) -> Tensor");
  m.def(
      "fused_hypercolumn_points_backward(Tensor grad, Tensor[] features, Tensor points, "
      "Tensor? locations, Tensor[] weights, Tensor? bias, Tensor? labels, SymInt[] image_size, "
      "float[] spatial_scale, int padding, int activation, int[] orders) -> (Tensor[], Tensor[], Tensor)");
  m.def("index_values_valid(Tensor values, int size) -> bool");
}
