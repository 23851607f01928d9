// A fused call (fused_hypercolumn, fused_hypercolumn_points) on the host, as the CUDA kernels
// run it: its checked arguments, the order each layer runs in, its points, its score maps.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "checks.h"
#include "hypercolumn_math.h"
#include "points.cuh"
#include "score_projection.cuh"

namespace hypercolumn_ops {
namespace cuda {

// A fused call as the kernels run it (both operators, forward and backward): checks.h's checked
// arguments, the weights and labels contiguous, and the order each layer runs in.
struct FusedArgs {
  LayerScales scales;
  std::vector<at::Tensor> weights;  // (NC, KK, M, C_l) contiguous
  at::Tensor rows, locations, labels, bias;
  int64_t classes = 1, cells = 1, grid_k = 1, outputs = 1, num_rows = 0, grid_h = 0, grid_w = 0, num_points = 0;
  int64_t sampling_ratio = 1;  // box grids: roi_align's sampling_ratio and aligned
  bool aligned = true;
  std::vector<int64_t> orders;  // the orders that run (see effective_order)
};

// Whether cuBLAS gives the same bits on every run: with CUDA >= 10.2 only under a fixed workspace
// configuration (the package sets CUBLAS_WORKSPACE_CONFIG=:4096:8 when it is imported and the
// variable is unset; PyTorch's own matrix products need the same).
inline bool cublas_reproducible() {
  const char* config = std::getenv("CUBLAS_WORKSPACE_CONFIG");
  return config != nullptr && (std::string(config) == ":4096:8" || std::string(config) == ":16:8");
}

// Order 1 needs a dense map of at least one channel that cuBLAS can read as a matrix in place,
// and, in deterministic mode, a reproducible cuBLAS; both orders are exact, so falling back to
// order 0 changes no result.
inline int64_t effective_order(int64_t requested, const at::Tensor& feature) {
  if (requested != kOrderProjectScores) return kOrderSampleFeatures;
  if (at::globalContext().deterministicAlgorithms() && !cublas_reproducible()) return kOrderSampleFeatures;
  if (feature.size(0) == 0 || feature.size(1) == 0 || !feature.is_non_overlapping_and_dense() ||
      !pixel_matrix(feature).defined()) {
    return kOrderSampleFeatures;
  }
  return kOrderProjectScores;
}

// The call of `checked` (check_fused_boxes or check_fused_points) on box grids of grid_h x grid_w
// sampled as sampling_ratio and aligned say (0 x 0 for points, which take 1 and true).
inline FusedArgs fused_args(at::TensorList features, FusedArguments checked, at::TensorList weights,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& labels,
                            at::IntArrayRef orders, int64_t grid_h, int64_t grid_w, int64_t sampling_ratio,
                            bool aligned) {
  FusedArgs a;
  a.sampling_ratio = sampling_ratio;
  a.aligned = aligned;
  a.scales = std::move(checked.scales);
  a.rows = std::move(checked.rows);
  a.locations = std::move(checked.locations);
  a.num_rows = checked.count;
  a.grid_h = grid_h;
  a.grid_w = grid_w;
  a.num_points = grid_h == 0 ? a.num_rows : a.num_rows * grid_h * grid_w;
  a.classes = checked.shape.classes;
  a.cells = checked.shape.cells;
  a.grid_k = checked.shape.grid;
  a.outputs = checked.shape.outputs;
  for (const at::Tensor& w : weights) a.weights.push_back(w.contiguous());
  if (labels.has_value() && labels->defined()) a.labels = labels->contiguous();
  if (bias.has_value() && bias->defined()) a.bias = *bias;
  for (size_t l = 0; l < features.size(); ++l) a.orders.push_back(effective_order(orders[l], features[l]));
  return a;
}

template <typename acc_t>
PointSource<acc_t> fused_source(const FusedArgs& a, int64_t batch) {
  return {a.rows.data_ptr<acc_t>(),
          a.locations.defined() ? a.locations.data_ptr<acc_t>() : nullptr,
          a.labels.defined() ? a.labels.data_ptr<int64_t>() : nullptr,
          a.grid_h,
          a.grid_w,
          batch,
          a.classes,
          a.sampling_ratio,
          a.aligned};
}

// One entry per layer: the score map of an order-1 layer, undefined for order 0.
inline std::vector<at::Tensor> score_maps(at::TensorList features, const FusedArgs& a) {
  std::vector<at::Tensor> maps(features.size());
  for (size_t l = 0; l < features.size(); ++l) {
    if (a.orders[l] == kOrderProjectScores) maps[l] = project_scores(features[l], a.weights[l]);
  }
  return maps;
}

}  // namespace cuda
}  // namespace hypercolumn_ops
