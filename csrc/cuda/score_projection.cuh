// The 1x1 projections of the CUDA fused kernels' project-scores order (order 1): a layer's score
// map (B, H*W, NC * KK * M) and, backward, the feature and weight gradients from the score-map
// gradient; small products of NCHW maps in the package's kernels (score_projection.cu), the
// others by cuBLAS.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace hypercolumn_ops {
namespace cuda {

// The (B, H*W, C) matrix view of a (B, C, H, W) map, or an undefined tensor where its pixels do not
// share one stride or neither pixels nor channels are unit-stride (cuBLAS would need a copy).
at::Tensor pixel_matrix(const at::Tensor& t);

// The (B * H*W, C) view of a pixel matrix whose images follow one another in memory (one image,
// or a channels_last map), so that one 2-D product replaces a batched one; undefined otherwise.
at::Tensor stacked_pixels(const at::Tensor& pixels);

// Score map (B, H*W, NC*KK*M) of an order-1 layer: the map's pixel matrix times W^T (weight
// (NC, KK, M, C) contiguous), in the package's kernels where the product is small, else by cuBLAS.
at::Tensor project_scores(const at::Tensor& feature, const at::Tensor& weight);

// Whether project_grads_in_kernels makes the gradients of the projection of `pixels` (B, H*W, C)
// to `outputs` score channels.
bool small_projection_grads(const at::Tensor& pixels, int64_t outputs);

// The feature and weight gradients of a small projection (small_projection_grads), from the
// score-map gradient (B, H*W, O) in the accumulation type: grad_pixels (B, H*W, C) filled, and the
// weight gradient (O, C) returned in the weights' dtype. Every value is summed in a fixed order.
at::Tensor project_grads_in_kernels(const at::Tensor& score_grad, const at::Tensor& pixels,
                                    const at::Tensor& weight_matrix, const at::Tensor& grad_pixels);

}  // namespace cuda
}  // namespace hypercolumn_ops
