// The score-map products of the CPU fused kernels (the project-scores order): a layer's 1x1
// projection to NC * KK * M score channels and its two gradients, each split into fixed tiles, so
// that no result depends on the thread count: single-threaded library products for the
// projection and the feature gradient, the package's own product for the weight gradient.
#pragma once

#include <ATen/ATen.h>

namespace hypercolumn_ops {
namespace cpu {

// Score maps (B, H, W, Q) = feature (B, C, H, W, any strides) as pixels x C, times weight_rows.T
// (weight_rows (Q, C), contiguous, in the accumulation dtype); returned in the accumulation dtype.
at::Tensor project_scores(const at::Tensor& feature, const at::Tensor& weight_rows);

// grad_feature (B, C, H, W, any strides) = grad_scores (B, H, W, Q) as pixels x Q, times
// weight_rows (Q, C).
void project_grad_features(const at::Tensor& grad_scores, const at::Tensor& weight_rows,
                           const at::Tensor& grad_feature);

// grad_weight_rows (Q, C) = grad_scores.T (Q x pixels) @ feature (pixels x C), summed over fixed
// runs of pixels in order by the package's own product (its reduction over every pixel is where a
// library GEMM's split by thread count would show).
void project_grad_weights(const at::Tensor& grad_scores, const at::Tensor& feature,
                          const at::Tensor& grad_weight_rows);

}  // namespace cpu
}  // namespace hypercolumn_ops
