// CPU kernels of fused_hypercolumn and fused_hypercolumn_points, forward and backward.
//
// Score of cell k at point p: s_k(p) = sum_l W_l[label, k] @ f_l(p) + b[row(p), k]; output
// out(p) = sum_k alpha_k(p) * act(s_k(p)) over the (at most four) cells with non-zero location
// weight. Each layer is evaluated in the order `orders` names:
//   sample features (0): gather a block of points' features, a channel chunk at a time, and
//     take dot products with the hit cells' classifier rows;
//   project scores (1): one GEMM maps the layer to NC * KK * M score channels, (B, H, W, Q) in
//     the accumulation dtype, which the points then sample. Box grids whose layers are all
//     projected use the grid's separability instead (box_fused_forward): taps per grid column
//     and per grid row, score maps interpolated along y once per grid row.
// Backward recomputes the scores where the sigmoid needs them, stores dL/ds per point and hit
// cell, then: projected layers scatter dL/ds into gradient score maps (parallel over bands of
// map rows; box grids a grid row at a time, through their separability) followed by two GEMMs;
// sampled layers scatter per channel block (parallel over blocks). Every GEMM is split into fixed
// tiles, each one single-threaded product, so no result depends on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/sampling.h"
#include "poison.h"

namespace hypercolumn_ops {
namespace cpu {
namespace {

// Channels gathered per chunk when sampling features: a block's tile is
// kPointBlock x kTileChannels. Fixed, so a score's summation order never depends on the block.
constexpr int64_t kTileChannels = 128;
// GEMM tiles: pixels x output columns per product.
constexpr int64_t kGemmPixels = 256;
constexpr int64_t kGemmColumns = 512;
// grad_weights: channels per item, and pixels per accumulated product of its reduction.
constexpr int64_t kWeightColumns = 64;
constexpr int64_t kReductionPixels = 4096;

struct ClassifierShape {
  int64_t classes, cells, grid, outputs;
};

ClassifierShape check_fused(at::TensorList features, at::TensorList weights,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& labels, int64_t rows,
                            at::ArrayRef<double> scale_y, at::ArrayRef<double> scale_x,
                            int64_t padding, int64_t activation, at::IntArrayRef orders) {
  check_features(features);
  check_scales(scale_y, scale_x, features.size());
  check_padding(padding);
  TORCH_CHECK(activation == kActivationNone || activation == kActivationSigmoid,
              "activation: expected 0 (none) or 1 (sigmoid), got ", activation);
  TORCH_CHECK(orders.size() == features.size(), "orders: expected one per layer (",
              features.size(), "), got ", orders.size());
  for (size_t l = 0; l < orders.size(); ++l) {
    TORCH_CHECK(orders[l] == kOrderSampleFeatures || orders[l] == kOrderProjectScores, "orders[",
                l, "]: expected 0 (sample features) or 1 (project scores), got ", orders[l]);
  }
  TORCH_CHECK(weights.size() == features.size(), "weights: expected one tensor per layer (",
              features.size(), "), got ", weights.size());
  const auto dtype = features[0].scalar_type();
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK(w.defined(), "weights[", l, "]: expected a tensor, got an undefined one");
    TORCH_CHECK(w.dim() == 4, "weights[", l, "]: expected (NC, KK, M, C_l), got shape ", w.sizes());
    TORCH_CHECK(w.device().is_cpu(), "weights[", l, "]: expected a CPU tensor, got ", w.device());
    TORCH_CHECK(w.scalar_type() == dtype, "weights[", l, "]: dtype ", w.scalar_type(),
                " differs from the features' ", dtype);
    TORCH_CHECK(w.size(3) == features[l].size(1), "weights[", l, "]: expected C_l = ",
                features[l].size(1), " channels (features[", l, "]), got ", w.size(3));
    TORCH_CHECK(w.sizes().slice(0, 3) == weights[0].sizes().slice(0, 3), "weights[", l,
                "]: (NC, KK, M) = ", w.sizes().slice(0, 3), " differs from weights[0]'s ",
                weights[0].sizes().slice(0, 3));
  }
  ClassifierShape shape{weights[0].size(0), weights[0].size(1), 0, weights[0].size(2)};
  TORCH_CHECK(shape.classes >= 1 && shape.cells >= 1 && shape.outputs >= 1,
              "weights: expected NC, KK, M >= 1, got ", weights[0].sizes().slice(0, 3));
  while (shape.grid * shape.grid < shape.cells) ++shape.grid;
  TORCH_CHECK(shape.grid * shape.grid == shape.cells, "weights: KK = ", shape.cells,
              " classifier cells is not a perfect square K * K");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 3 && bias->size(0) == rows && bias->size(1) == shape.cells &&
                    bias->size(2) == shape.outputs,
                "bias: expected shape (P, KK, M) = (", rows, ", ", shape.cells, ", ",
                shape.outputs, "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dtype, "bias: dtype ", bias->scalar_type(),
                " differs from the features' ", dtype);
    TORCH_CHECK(bias->device().is_cpu(), "bias: expected a CPU tensor, got ", bias->device());
  }
  if (labels.has_value() && labels->defined()) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == rows, "labels: expected shape (",
                rows, ",), got ", labels->sizes());
    TORCH_CHECK(labels->scalar_type() == at::kLong, "labels: expected int64, got ",
                labels->scalar_type());
    TORCH_CHECK(labels->device().is_cpu(), "labels: expected a CPU tensor, got ",
                labels->device());
  } else {
    TORCH_CHECK(shape.classes == 1, "labels: required with NC = ", shape.classes,
                " classifier sets, got none");
  }
  return shape;
}

// The classifier of a call, in the accumulation dtype: weights as (NC * KK * M, C_l) rows,
// bias rows, labels, and the score maps of the projected layers once computed.
template <typename scalar_t>
struct Classifier {
  using acc_t = acc_type<scalar_t>;
  ClassifierShape shape;
  int64_t padding, activation, batch;
  std::vector<FeatureMap<scalar_t>> maps;
  std::vector<int64_t> orders;
  std::vector<at::Tensor> weight_rows;  // (NC * KK * M, C_l), contiguous
  std::vector<at::Tensor> score_maps;   // (B, H_l, W_l, NC * KK * M) where projected
  const scalar_t* bias = nullptr;
  int64_t bias_stride[3] = {0, 0, 0};
  const int64_t* labels = nullptr;
  int64_t label_stride = 0;

  int64_t score_channels() const { return shape.classes * shape.cells * shape.outputs; }
  int64_t score_row(int64_t label, int64_t cell) const {
    return (label * shape.cells + cell) * shape.outputs;
  }
};

template <typename scalar_t>
Classifier<scalar_t> make_classifier(at::TensorList features, at::TensorList weights,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& labels,
                                     const ClassifierShape& shape, at::ArrayRef<double> scale_y,
                                     at::ArrayRef<double> scale_x, int64_t padding,
                                     int64_t activation, at::IntArrayRef orders) {
  Classifier<scalar_t> cls;
  cls.shape = shape;
  cls.padding = padding;
  cls.activation = activation;
  cls.batch = features[0].size(0);
  const auto acc = accumulation_dtype(features[0].scalar_type());
  const int64_t rows = shape.classes * shape.cells * shape.outputs;
  for (size_t l = 0; l < features.size(); ++l) {
    cls.maps.push_back(feature_map<scalar_t>(features[l], scale_y[l], scale_x[l]));
    cls.orders.push_back(orders[l]);
    cls.weight_rows.push_back(weights[l].reshape({rows, features[l].size(1)}).to(acc).contiguous());
  }
  cls.score_maps.resize(features.size());
  if (bias.has_value() && bias->defined()) {
    cls.bias = bias->const_data_ptr<scalar_t>();
    for (int d = 0; d < 3; ++d) cls.bias_stride[d] = bias->stride(d);
  }
  if (labels.has_value() && labels->defined()) {
    cls.labels = labels->const_data_ptr<int64_t>();
    cls.label_stride = labels->stride(0);
  }
  return cls;
}

// ----------------------------------------------------------------------------- GEMM tiles

// A run of pixels of a (B, C, H, W) tensor that one (pixels, C) matrix with a single pixel
// stride covers: whole images where the rows are evenly strided (contiguous, channels_last),
// else single rows; at most max_pixels each.
struct PixelRun {
  int64_t b, y, x, count;
};

std::vector<PixelRun> pixel_runs(const at::Tensor& t, int64_t max_pixels) {
  const int64_t batch = t.size(0), height = t.size(2), width = t.size(3);
  const bool whole = height == 1 || width == 1 || t.stride(2) == width * t.stride(3);
  std::vector<PixelRun> runs;
  for (int64_t b = 0; b < batch; ++b) {
    if (whole) {
      for (int64_t s = 0; s < height * width; s += max_pixels)
        runs.push_back(PixelRun{b, s / width, s % width, std::min(max_pixels, height * width - s)});
    } else {
      for (int64_t y = 0; y < height; ++y)
        for (int64_t x = 0; x < width; x += max_pixels)
          runs.push_back(PixelRun{b, y, x, std::min(max_pixels, width - x)});
    }
  }
  return runs;
}

// Channels [c0, c1) of a run's pixels as a (pixels, channels) view of `t` (no copy).
at::Tensor run_matrix(const at::Tensor& t, const PixelRun& run, int64_t c0, int64_t c1) {
  const int64_t pixel_stride = t.size(3) == 1 ? t.stride(2) : t.stride(3);
  return t.as_strided({run.count, c1 - c0}, {pixel_stride, t.stride(1)},
                      t.storage_offset() + run.b * t.stride(0) + c0 * t.stride(1) +
                          run.y * t.stride(2) + run.x * t.stride(3));
}

// The run's rows of a (B * H * W, Q) matrix of a map (B, H, W, Q).
at::Tensor run_rows(const at::Tensor& map_rows, const at::Tensor& feature, const PixelRun& run) {
  const int64_t first = (run.b * feature.size(2) + run.y) * feature.size(3) + run.x;
  return map_rows.narrow(0, first, run.count);
}

at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// Score maps (B, H, W, Q) = features (as pixels x C) @ weight_rows.T (C x Q), in the
// accumulation dtype; float16/bfloat16 features are converted one tile at a time.
at::Tensor project_scores(const at::Tensor& feature, const at::Tensor& weight_rows) {
  const int64_t batch = feature.size(0), height = feature.size(2), width = feature.size(3);
  const int64_t channels = weight_rows.size(0);
  at::Tensor scores = at::empty({batch, height, width, channels}, weight_rows.options());
  const at::Tensor rows = scores.view({batch * height * width, channels});
  const std::vector<PixelRun> runs = pixel_runs(feature, kGemmPixels);
  const int64_t column_blocks = (channels + kGemmColumns - 1) / kGemmColumns;
  // With channel planes far apart (NCHW) and few score channels next to the feature channels,
  // weight_rows @ features (Q x pixels) is the product MKL runs fastest (1.8x on the sds layers:
  // it does not repack the features), transposed into the map afterwards. The transposition
  // costs pixels x Q, the repacking pixels x C: with Q above C / 4 (one tile of 256 pixels, one
  // thread: 0.75-0.87x at C = 128-256, Q = 128-512) and with channels contiguous
  // (channels_last), features @ weight_rows.T.
  const bool planar = feature.stride(1) > (feature.size(3) == 1 ? feature.stride(2) : feature.stride(3));
  run_items(static_cast<int64_t>(runs.size()) * column_blocks, [&](int64_t item) {
    const PixelRun& run = runs[item / column_blocks];
    const int64_t q0 = (item % column_blocks) * kGemmColumns;
    const int64_t q1 = std::min(q0 + kGemmColumns, channels);
    at::Tensor out = run_rows(rows, feature, run).narrow(1, q0, q1 - q0);
    const at::Tensor pixels = as_dtype(run_matrix(feature, run, 0, feature.size(1)), scores.scalar_type());
    const at::Tensor columns = weight_rows.narrow(0, q0, q1 - q0);
    if (planar && 4 * (q1 - q0) <= feature.size(1)) {
      out.copy_(at::mm(columns, pixels.t()).t());
    } else {
      at::mm_out(out, pixels, columns.t());
    }
  });
  return scores;
}

// grad_features (B, C, H, W) = grad_scores (as pixels x Q) @ weight_rows (Q x C).
void project_grad_features(const at::Tensor& grad_scores, const at::Tensor& weight_rows,
                           const at::Tensor& grad_feature) {
  const int64_t batch = grad_feature.size(0), height = grad_feature.size(2);
  const int64_t width = grad_feature.size(3), channels = grad_feature.size(1);
  const at::Tensor rows = grad_scores.view({batch * height * width, weight_rows.size(0)});
  const std::vector<PixelRun> runs = pixel_runs(grad_feature, kGemmPixels);
  const int64_t column_blocks = std::max<int64_t>((channels + kGemmColumns - 1) / kGemmColumns, 1);
  run_items(static_cast<int64_t>(runs.size()) * column_blocks, [&](int64_t item) {
    const PixelRun& run = runs[item / column_blocks];
    const int64_t c0 = (item % column_blocks) * kGemmColumns;
    const int64_t c1 = std::min(c0 + kGemmColumns, channels);
    at::Tensor out = run_matrix(grad_feature, run, c0, c1);
    const at::Tensor a = run_rows(rows, grad_feature, run);
    const at::Tensor b = weight_rows.narrow(1, c0, c1 - c0);
    if (out.scalar_type() == rows.scalar_type()) {
      at::mm_out(out, a, b);
    } else {
      out.copy_(at::mm(a, b));
    }
  });
}

// grad_weight_rows (Q, C) = grad_scores.T (Q x pixels) @ features (pixels x C), summed over
// fixed runs of pixels in order; items own column blocks.
void project_grad_weights(const at::Tensor& grad_scores, const at::Tensor& feature,
                          const at::Tensor& grad_weight_rows) {
  const int64_t batch = feature.size(0), height = feature.size(2), width = feature.size(3);
  const int64_t channels = feature.size(1);
  const at::Tensor rows = grad_scores.view({batch * height * width, grad_weight_rows.size(0)});
  const std::vector<PixelRun> runs = pixel_runs(feature, kReductionPixels);
  const int64_t column_blocks = (channels + kWeightColumns - 1) / kWeightColumns;
  run_items(column_blocks, [&](int64_t item) {
    const int64_t c0 = item * kWeightColumns;
    const int64_t c1 = std::min(c0 + kWeightColumns, channels);
    at::Tensor out = grad_weight_rows.narrow(1, c0, c1 - c0);
    if (runs.empty()) out.zero_();
    for (size_t r = 0; r < runs.size(); ++r) {
      const at::Tensor a = run_rows(rows, feature, runs[r]).t();
      const at::Tensor b = as_dtype(run_matrix(feature, runs[r], c0, c1), rows.scalar_type());
      if (r == 0) {
        at::mm_out(out, a, b);
      } else {
        out.addmm_(a, b);
      }
    }
  });
}

// ----------------------------------------------------------------------------- per point

// The cells a point is classified with: distinct cells of non-zero location weight (weights of
// a repeated cell summed), its batch item and label; invalid points (batch index, label,
// coordinates or place) get NaN outputs and no gradient.
template <typename acc_t>
struct PointCells {
  bool valid;
  int64_t b, label, count;
  int64_t cell[4];
  acc_t alpha[4];
};

// The distinct cells of non-zero weight among `w`'s four, into pc's cells and alphas.
template <typename acc_t>
void hit_cells(const LocationWeights<acc_t>& w, PointCells<acc_t>* pc) {
  pc->count = 0;
  for (int q = 0; q < 4; ++q) {
    if (w.alpha[q] == acc_t(0)) continue;
    int64_t u = 0;
    while (u < pc->count && pc->cell[u] != w.cell[q]) ++u;
    if (u == pc->count) {
      pc->cell[u] = w.cell[q];
      pc->alpha[u] = acc_t(0);
      ++pc->count;
    }
    pc->alpha[u] += w.alpha[q];
  }
}

template <typename scalar_t, typename acc_t>
PointCells<acc_t> point_cells(const Classifier<scalar_t>& cls, const ImagePoint<acc_t>& point,
                              int64_t row) {
  PointCells<acc_t> pc;
  pc.b = 0;
  pc.label = 0;
  pc.count = 0;
  pc.valid = sample_batch(point, cls.batch, &pc.b) && std::isfinite(point.u) &&
             std::isfinite(point.v);
  if (cls.labels != nullptr) {
    pc.label = cls.labels[row * cls.label_stride];
    pc.valid = pc.valid && pc.label >= 0 && pc.label < cls.shape.classes;
  }
  if (pc.valid) hit_cells(location_weights<acc_t>(point.u, point.v, cls.shape.grid), &pc);
  return pc;
}

// A dot product with a fixed summation order (16 interleaved partial sums, then the tail), so
// that results do not depend on how the compiler vectorises or on alignment.
template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  constexpr int kLanes = 16;
  acc_t partial[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int k = 0; k < kLanes; ++k) partial[k] += a[c + k] * b[c + k];
  acc_t sum = 0;
  for (int k = 0; k < kLanes; ++k) sum += partial[k];
  for (; c < n; ++c) sum += a[c] * b[c];
  return sum;
}

template <typename acc_t>
struct BlockBuffers {
  std::vector<ImagePoint<acc_t>> points = std::vector<ImagePoint<acc_t>>(kPointBlock);
  std::vector<PointCells<acc_t>> cells = std::vector<PointCells<acc_t>>(kPointBlock);
  std::vector<SampleTaps<acc_t>> taps = std::vector<SampleTaps<acc_t>>(kPointBlock);
  std::vector<int64_t> tile_offsets = std::vector<int64_t>(kPointBlock);
  std::vector<acc_t> tile = std::vector<acc_t>(kPointBlock * kTileChannels);
  std::vector<acc_t> scores;  // (kPointBlock, 4, M)
};

// Points [start, start + count) of `source`: their cells, and (`with_scores`) the scores
// scores[(i * 4 + u) * M + m] of their hit cells u, bias plus every layer in order.
template <typename scalar_t, typename Source>
void block_scores(const Classifier<scalar_t>& cls, const Source& source, int64_t start,
                  int64_t count, bool with_scores, BlockBuffers<acc_type<scalar_t>>& buf) {
  using acc_t = acc_type<scalar_t>;
  const int64_t outputs = cls.shape.outputs;
  const int64_t per_row = source.points_per_row();
  for (int64_t i = 0; i < count; ++i) {
    buf.points[i] = source(start + i);
    buf.cells[i] = point_cells(cls, buf.points[i], (start + i) / per_row);
  }
  if (!with_scores) return;
  buf.scores.resize(kPointBlock * 4 * outputs);
  for (int64_t i = 0; i < count; ++i) {
    const PointCells<acc_t>& pc = buf.cells[i];
    if (!pc.valid) continue;
    const int64_t row = (start + i) / per_row;
    for (int64_t u = 0; u < pc.count; ++u) {
      acc_t* s = buf.scores.data() + (i * 4 + u) * outputs;
      for (int64_t m = 0; m < outputs; ++m) {
        s[m] = cls.bias == nullptr
                   ? acc_t(0)
                   : acc_t(cls.bias[row * cls.bias_stride[0] + pc.cell[u] * cls.bias_stride[1] +
                                    m * cls.bias_stride[2]]);
      }
    }
  }
  for (size_t l = 0; l < cls.maps.size(); ++l) {
    const FeatureMap<scalar_t>& map = cls.maps[l];
    if (cls.orders[l] == kOrderProjectScores) {
      const int64_t channels = cls.score_channels();
      const acc_t* scores = cls.score_maps[l].template const_data_ptr<acc_t>();
      for (int64_t i = 0; i < count; ++i) {
        const PointCells<acc_t>& pc = buf.cells[i];
        if (!pc.valid) continue;
        const SampleTaps<acc_t> t =
            sample_taps<acc_t>(map, buf.points[i].x, buf.points[i].y, cls.padding, pc.b,
                               map.height * map.width * channels, map.width * channels, channels);
        for (int64_t u = 0; u < pc.count; ++u) {
          const int64_t q = cls.score_row(pc.label, pc.cell[u]);
          acc_t* s = buf.scores.data() + (i * 4 + u) * outputs;
          for (int64_t m = 0; m < outputs; ++m) {
            s[m] += t.weight[0] * scores[t.offset[0] + q + m] + t.weight[1] * scores[t.offset[1] + q + m] +
                    t.weight[2] * scores[t.offset[2] + q + m] + t.weight[3] * scores[t.offset[3] + q + m];
          }
        }
      }
    } else {
      for (int64_t i = 0; i < count; ++i) {
        const PointCells<acc_t>& pc = buf.cells[i];
        buf.taps[i] = pc.valid ? sample_taps<acc_t>(map, buf.points[i].x, buf.points[i].y,
                                                    cls.padding, pc.b, map.stride_b,
                                                    map.stride_h, map.stride_w)
                               : invalid_taps<acc_t>();
      }
      const acc_t* weights = cls.weight_rows[l].template const_data_ptr<acc_t>();
      for (int64_t c0 = 0; c0 < map.channels; c0 += kTileChannels) {
        const int64_t width = std::min(kTileChannels, map.channels - c0);
        for (int64_t i = 0; i < count; ++i) buf.tile_offsets[i] = i * width;
        gather_channels(map, buf.taps.data(), buf.tile_offsets.data(), count, c0, c0 + width,
                        buf.tile.data(), 1);
        for (int64_t i = 0; i < count; ++i) {
          const PointCells<acc_t>& pc = buf.cells[i];
          if (!pc.valid) continue;
          for (int64_t u = 0; u < pc.count; ++u) {
            const acc_t* w = weights + cls.score_row(pc.label, pc.cell[u]) * map.channels + c0;
            acc_t* s = buf.scores.data() + (i * 4 + u) * outputs;
            for (int64_t m = 0; m < outputs; ++m)
              s[m] += dot(buf.tile.data() + i * width, w + m * map.channels, width);
          }
        }
      }
    }
  }
}

template <typename acc_t>
acc_t activate(acc_t s, int64_t activation) {
  return activation == kActivationSigmoid ? sigmoid(s) : s;
}

template <typename scalar_t>
void project_layers(Classifier<scalar_t>& cls, at::TensorList features) {
  for (size_t l = 0; l < features.size(); ++l) {
    if (cls.orders[l] == kOrderProjectScores)
      cls.score_maps[l] = project_scores(features[l], cls.weight_rows[l]);
  }
}

// out at `layout` (M channels): sum over hit cells of alpha * act(score), NaN for invalid points.
template <typename scalar_t, typename Source>
void fused_forward(Classifier<scalar_t>& cls, at::TensorList features, const Source& source,
                   scalar_t* out, const PointLayout& layout) {
  using acc_t = acc_type<scalar_t>;
  project_layers(cls, features);
  const int64_t outputs = cls.shape.outputs;
  at::parallel_for(0, source.size(), kPointBlock, [&](int64_t begin, int64_t end) {
    BlockBuffers<acc_t> buf;
    for (int64_t start = begin; start < end; start += kPointBlock) {
      const int64_t count = std::min(kPointBlock, end - start);
      block_scores(cls, source, start, count, true, buf);
      for (int64_t i = 0; i < count; ++i) {
        const PointCells<acc_t>& pc = buf.cells[i];
        scalar_t* o = out + layout.offset(start + i);
        for (int64_t m = 0; m < outputs; ++m) {
          acc_t value = quiet_nan<acc_t>();
          if (pc.valid) {
            value = acc_t(0);
            for (int64_t u = 0; u < pc.count; ++u)
              value += pc.alpha[u] * activate(buf.scores[(i * 4 + u) * outputs + m], cls.activation);
          }
          o[m * layout.channel_stride] = scalar_t(value);
        }
      }
    }
  });
}

// Grid rows per box_fused_forward work item: a block's hit cells (the same for every box) are
// found once per block and thread, and a 50 x 50 grid makes 5 blocks to share between threads.
constexpr int64_t kBoxRows = 10;

// One projected layer on one box: its x taps at the grid's columns, the distinct map columns
// they read and, per grid column, where its two map columns are in that list; y taps per grid row.
template <typename acc_t>
struct BoxLayerTaps {
  BoxAxis<acc_t> along_x, along_y;
  std::vector<int64_t> columns, slot0, slot1;
  // Per grid row: the label's score channels of the row's cells at every distinct column,
  // (columns, channels of the row's cells): score maps interpolated along y (forward), or
  // score gradients summed along x (backward).
  std::vector<acc_t> line;

  // The taps of a box's grid columns xs and grid rows ys on `map`.
  template <typename scalar_t>
  void set(const FeatureMap<scalar_t>& map, const std::vector<acc_t>& xs, const std::vector<acc_t>& ys,
           int64_t padding) {
    along_x.set(xs, map.scale_x, map.width, padding);
    along_y.set(ys, map.scale_y, map.height, padding);
    distinct_indices(along_x, map.width, &columns, &slot0, &slot1);
  }
};

// Box r's image (*b) and label (*label, 0 without labels); false where its batch index or label
// is out of range: its points get NaN outputs and no gradient.
template <typename scalar_t, typename acc_t>
bool box_row(const Classifier<scalar_t>& cls, const BoxGrid<acc_t>& source, int64_t r, int64_t* b, int64_t* label) {
  *label = 0;
  bool valid = batch_index<acc_t>(source.boxes[5 * r], cls.batch, b);
  if (cls.labels != nullptr) {
    *label = cls.labels[r * cls.label_stride];
    valid = valid && *label >= 0 && *label < cls.shape.classes;
  }
  return valid;
}

// The cells a grid row at relative height v can hit: those of its one or two rows of the K x K
// grid, one contiguous run [first, end) of cells (and so of score channels).
struct CellRun {
  int64_t first, end;
};

template <typename acc_t>
CellRun row_cells(acc_t v, int64_t grid) {
  const LocationWeights<acc_t> w = location_weights<acc_t>(acc_t(0.5), v, grid);
  return {std::min(w.cell[0], w.cell[2]) / grid * grid, (std::max(w.cell[0], w.cell[2]) / grid + 1) * grid};
}

// fused_forward on box grids where every layer is projected, into (R, M, oh, ow) at `layout`.
// A box's grid is separable (a grid column has one x and u, a grid row one y and v): per box,
// every layer's x taps are found once per grid column; per grid row, each layer's score maps are
// interpolated along y at the distinct map columns the grid reads, for the cells the row can
// hit; each point then takes two taps per layer and cell. Work items are (block of rows, box),
// so that a thread finds a block's hit cells once for all boxes; a point's sums do not depend
// on the item it is in.
template <typename scalar_t>
void box_fused_forward(Classifier<scalar_t>& cls, at::TensorList features,
                       const BoxGrid<acc_type<scalar_t>>& source, scalar_t* out,
                       const PointLayout& layout) {
  using acc_t = acc_type<scalar_t>;
  project_layers(cls, features);
  const ClassifierShape& shape = cls.shape;
  const int64_t oh = source.output_height, ow = source.output_width;
  const int64_t outputs = shape.outputs, channels = cls.score_channels();
  const int64_t row_blocks = (oh + kBoxRows - 1) / kBoxRows;
  const size_t layers = cls.maps.size();
  const auto bias_at = [&](int64_t r, int64_t cell, int64_t m) {
    return cls.bias == nullptr ? acc_t(0)
                               : acc_t(cls.bias[r * cls.bias_stride[0] + cell * cls.bias_stride[1] +
                                                m * cls.bias_stride[2]]);
  };
  at::parallel_for(0, source.rows() * row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xs, ys, us, vs, scores(outputs), values(outputs);
    std::vector<PointCells<acc_t>> block_cells(kBoxRows * ow);
    int64_t cells_block = -1;
    std::vector<BoxLayerTaps<acc_t>> taps(layers);
    std::vector<const acc_t*> lines(layers), wx0(layers), wx1(layers);
    std::vector<int64_t> left(layers * ow), right(layers * ow);
    int64_t taps_box = -1, b = 0, label = 0;
    bool box_valid = false;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t block = item / source.rows(), r = item - block * source.rows();
      const int64_t i0 = block * kBoxRows, i1 = std::min(i0 + kBoxRows, oh);
      if (r != taps_box) {
        taps_box = r;
        box_valid = box_row(cls, source, r, &b, &label);
        source.axes(r, &xs, &ys, &us, &vs);
        for (size_t l = 0; l < layers; ++l) taps[l].set(cls.maps[l], xs, ys, cls.padding);
      }
      if (block != cells_block) {  // u and v do not depend on the box
        cells_block = block;
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = 0; j < ow; ++j)
            hit_cells(location_weights<acc_t>(us[j], vs[i], shape.grid), &block_cells[(i - i0) * ow + j]);
      }
      scalar_t* box_out = out + r * layout.row_stride;
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t* row_out = box_out + i * layout.i_stride;
        if (!box_valid || !std::isfinite(ys[i])) {
          for (int64_t j = 0; j < ow; ++j)
            for (int64_t m = 0; m < outputs; ++m)
              row_out[j * layout.j_stride + m * layout.channel_stride] = scalar_t(quiet_nan<acc_t>());
          continue;
        }
        const CellRun run = row_cells(vs[i], shape.grid);
        const int64_t first_cell = run.first;
        const int64_t q0 = cls.score_row(label, first_cell);
        const int64_t width = (run.end - first_cell) * outputs;
        for (size_t l = 0; l < layers; ++l) {
          const FeatureMap<scalar_t>& map = cls.maps[l];
          BoxLayerTaps<acc_t>& t = taps[l];
          const acc_t* map_scores = cls.score_maps[l].template const_data_ptr<acc_t>() + q0;
          const acc_t* top = map_scores + (b * map.height + t.along_y.index0[i]) * map.width * channels;
          const acc_t* bottom = map_scores + (b * map.height + t.along_y.index1[i]) * map.width * channels;
          const acc_t wy0 = t.along_y.weight0[i], wy1 = t.along_y.weight1[i];
          t.line.resize(t.columns.size() * width);
          for (size_t s = 0; s < t.columns.size(); ++s) {
            const acc_t* upper = top + t.columns[s] * channels;
            const acc_t* lower = bottom + t.columns[s] * channels;
            acc_t* to = t.line.data() + s * width;
#pragma omp simd
            for (int64_t k = 0; k < width; ++k) to[k] = wy0 * upper[k] + wy1 * lower[k];
          }
        }
        // Flat per-row tap tables: a point's sums read plain arrays.
        for (size_t l = 0; l < layers; ++l) {
          const BoxLayerTaps<acc_t>& t = taps[l];
          lines[l] = t.line.data();
          wx0[l] = t.along_x.weight0.data();
          wx1[l] = t.along_x.weight1.data();
          for (int64_t j = 0; j < ow; ++j) {
            left[l * ow + j] = t.slot0[j] * width - first_cell * outputs;
            right[l * ow + j] = t.slot1[j] * width - first_cell * outputs;
          }
        }
        for (int64_t j = 0; j < ow; ++j) {
          scalar_t* o = row_out + j * layout.j_stride;
          if (!std::isfinite(xs[j])) {
            for (int64_t m = 0; m < outputs; ++m) o[m * layout.channel_stride] = scalar_t(quiet_nan<acc_t>());
            continue;
          }
          const PointCells<acc_t>& pc = block_cells[(i - i0) * ow + j];
          std::fill(values.begin(), values.end(), acc_t(0));
          for (int64_t u = 0; u < pc.count; ++u) {
            const int64_t k0 = pc.cell[u] * outputs;
            if (outputs == 1) {  // one score: kept in a register across the layers
              acc_t score = bias_at(r, pc.cell[u], 0);
              for (size_t l = 0; l < layers; ++l)
                score += wx0[l][j] * lines[l][left[l * ow + j] + k0] + wx1[l][j] * lines[l][right[l * ow + j] + k0];
              values[0] += pc.alpha[u] * activate(score, cls.activation);
              continue;
            }
            for (int64_t m = 0; m < outputs; ++m) scores[m] = bias_at(r, pc.cell[u], m);
            for (size_t l = 0; l < layers; ++l) {  // several scores: each layer's M taps as vectors
              const acc_t* left_m = lines[l] + left[l * ow + j] + k0;
              const acc_t* right_m = lines[l] + right[l * ow + j] + k0;
              const acc_t w0 = wx0[l][j], w1 = wx1[l][j];
#pragma omp simd
              for (int64_t m = 0; m < outputs; ++m) scores[m] += w0 * left_m[m] + w1 * right_m[m];
            }
            for (int64_t m = 0; m < outputs; ++m)
              values[m] += pc.alpha[u] * activate(scores[m], cls.activation);
          }
          for (int64_t m = 0; m < outputs; ++m) o[m * layout.channel_stride] = scalar_t(values[m]);
        }
      }
    }
  });
}

// Projected layers: dL/ds (`grad_scores`, per point and hit cell) into the gradient score maps
// (B, H, W, NC * KK * M) of the `projected` layers. Bands of map rows are the work items; each
// scans every point in order and applies the taps that fall in its rows, so each element sums in
// one fixed order whatever the thread count.
template <typename scalar_t, typename Source>
void scatter_score_grads(const Classifier<scalar_t>& cls, const Source& source, const std::vector<int64_t>& projected,
                         const acc_type<scalar_t>* grad_scores, std::vector<at::Tensor>& grad_score_maps) {
  using acc_t = acc_type<scalar_t>;
  const int64_t bands = at::get_num_threads();
  const int64_t channels = cls.score_channels(), outputs = cls.shape.outputs;
  const int64_t count = source.size(), per_row = source.points_per_row();
  at::parallel_for(0, bands, 1, [&](int64_t band0, int64_t band1) {
    for (int64_t band = band0; band < band1; ++band) {
      for (int64_t p = 0; p < count; ++p) {
        const ImagePoint<acc_t> point = source(p);
        const PointCells<acc_t> pc = point_cells(cls, point, p / per_row);
        if (!pc.valid) continue;
        const acc_t* d = grad_scores + p * 4 * outputs;
        for (int64_t l : projected) {
          const FeatureMap<scalar_t>& map = cls.maps[l];
          const int64_t y_begin = map.height * band / bands;
          const int64_t y_end = map.height * (band + 1) / bands;
          const BilinearTaps<acc_t> t =
              bilinear_taps<acc_t>(point.x, point.y, acc_t(map.scale_y), acc_t(map.scale_x),
                                   map.height, map.width, cls.padding);
          const int64_t ys[4] = {t.y0, t.y0, t.y1, t.y1};
          const int64_t xs[4] = {t.x0, t.x1, t.x0, t.x1};
          const acc_t ws[4] = {t.w00, t.w01, t.w10, t.w11};
          acc_t* map_data = grad_score_maps[l].template data_ptr<acc_t>();
          for (int k = 0; k < 4; ++k) {
            if (ys[k] < y_begin || ys[k] >= y_end) continue;
            acc_t* pixel = map_data + ((pc.b * map.height + ys[k]) * map.width + xs[k]) * channels;
            for (int64_t u = 0; u < pc.count; ++u) {
              acc_t* to = pixel + cls.score_row(pc.label, pc.cell[u]);
              for (int64_t m = 0; m < outputs; ++m) to[m] += ws[k] * d[u * outputs + m];
            }
          }
        }
      }
    }
  });
}

// The same on a box grid, through its separability (as box_fused_forward): per box, layer and
// grid row, the row's dL/ds is first summed along x into the distinct map columns the grid reads
// (`line`, the label's score channels of the row's cells), then added into the row's two map
// rows, weighted along y. A point costs two multiply-adds per hit cell and output instead of
// its taps and eight. Bands of map rows are the work items; each takes the blocks of kBoxRows
// grid rows, in each the boxes, and in each box the block's rows, in order, so each element sums
// in one fixed order whatever the thread count. A block's hit cells (the same for every box) are
// found once per block and band.
template <typename scalar_t>
void scatter_score_grads(const Classifier<scalar_t>& cls, const BoxGrid<acc_type<scalar_t>>& source,
                         const std::vector<int64_t>& projected, const acc_type<scalar_t>* grad_scores,
                         std::vector<at::Tensor>& grad_score_maps) {
  using acc_t = acc_type<scalar_t>;
  const ClassifierShape& shape = cls.shape;
  const int64_t bands = at::get_num_threads();
  const int64_t oh = source.output_height, ow = source.output_width;
  const int64_t channels = cls.score_channels(), outputs = shape.outputs;
  at::parallel_for(0, bands, 1, [&](int64_t band0, int64_t band1) {
    std::vector<acc_t> xs, ys, us, vs;
    std::vector<PointCells<acc_t>> cells(kBoxRows * ow);  // the block's grid places
    BoxLayerTaps<acc_t> t;
    // Grid row i of box r (image b, label) on layer l, whose taps `t` holds, into the map rows of
    // [y_begin, y_end); the block of rows starts at i0.
    const auto add_row = [&](int64_t l, int64_t r, int64_t b, int64_t label, int64_t i, int64_t i0,
                             int64_t y_begin, int64_t y_end) {
      const FeatureMap<scalar_t>& map = cls.maps[l];
      const int64_t y[2] = {t.along_y.index0[i], t.along_y.index1[i]};
      const acc_t wy[2] = {t.along_y.weight0[i], t.along_y.weight1[i]};
      const bool in_band[2] = {y[0] >= y_begin && y[0] < y_end, y[1] >= y_begin && y[1] < y_end};
      if (!std::isfinite(ys[i]) || !(in_band[0] || in_band[1])) return;
      const CellRun run = row_cells(vs[i], shape.grid);
      const int64_t width = (run.end - run.first) * outputs;
      t.line.assign(t.columns.size() * width, acc_t(0));
      for (int64_t j = 0; j < ow; ++j) {
        if (!std::isfinite(xs[j])) continue;  // an invalid point: no gradient
        const PointCells<acc_t>& pc = cells[(i - i0) * ow + j];
        const acc_t* d = grad_scores + ((r * oh + i) * ow + j) * 4 * outputs;
        const acc_t wx0 = t.along_x.weight0[j], wx1 = t.along_x.weight1[j];
        acc_t* left = t.line.data() + t.slot0[j] * width - run.first * outputs;
        acc_t* right = t.line.data() + t.slot1[j] * width - run.first * outputs;
        for (int64_t u = 0; u < pc.count; ++u) {
          const int64_t k0 = pc.cell[u] * outputs;
          for (int64_t m = 0; m < outputs; ++m) {
            left[k0 + m] += wx0 * d[u * outputs + m];
            right[k0 + m] += wx1 * d[u * outputs + m];
          }
        }
      }
      acc_t* map_data = grad_score_maps[l].template data_ptr<acc_t>() + cls.score_row(label, run.first);
      for (int k = 0; k < 2; ++k) {
        if (!in_band[k]) continue;
        acc_t* map_row = map_data + (b * map.height + y[k]) * map.width * channels;
        for (size_t s = 0; s < t.columns.size(); ++s) {
          acc_t* to = map_row + t.columns[s] * channels;
          const acc_t* from = t.line.data() + s * width;
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) to[c] += wy[k] * from[c];
        }
      }
    };
    for (int64_t band = band0; band < band1; ++band) {
      for (int64_t i0 = 0; i0 < oh; i0 += kBoxRows) {
        const int64_t i1 = std::min(i0 + kBoxRows, oh);
        bool block_cells = false;
        for (int64_t r = 0; r < source.rows(); ++r) {
          int64_t b = 0, label = 0;
          if (!box_row(cls, source, r, &b, &label)) continue;  // its points have no gradient
          source.axes(r, &xs, &ys, &us, &vs);
          if (!block_cells) {  // u and v do not depend on the box
            block_cells = true;
            for (int64_t i = i0; i < i1; ++i)
              for (int64_t j = 0; j < ow; ++j)
                hit_cells(location_weights<acc_t>(us[j], vs[i], shape.grid), &cells[(i - i0) * ow + j]);
          }
          for (int64_t l : projected) {
            const int64_t height = cls.maps[l].height;
            t.set(cls.maps[l], xs, ys, cls.padding);
            for (int64_t i = i0; i < i1; ++i)
              add_row(l, r, b, label, i, i0, height * band / bands, height * (band + 1) / bands);
          }
        }
      }
    }
  });
}

// Gradients of the features, the weights and the per-row bias from `grad` (read at `layout`).
template <typename scalar_t, typename Source>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> fused_backward(
    Classifier<scalar_t>& cls, at::TensorList features, at::TensorList weights,
    const Source& source, const at::Tensor& grad, const PointLayout& layout) {
  using acc_t = acc_type<scalar_t>;
  const auto acc = accumulation_dtype(features[0].scalar_type());
  const ClassifierShape& shape = cls.shape;
  const int64_t outputs = shape.outputs, count = source.size(), per_row = source.points_per_row();
  const bool sigmoid_scores = cls.activation == kActivationSigmoid;
  if (sigmoid_scores) project_layers(cls, features);

  // dL/ds[p][u][m] of every point and hit cell: zero for invalid points.
  std::vector<acc_t> grad_scores(count * 4 * outputs, acc_t(0));
  const scalar_t* grad_data = grad.const_data_ptr<scalar_t>();
  at::parallel_for(0, count, kPointBlock, [&](int64_t begin, int64_t end) {
    BlockBuffers<acc_t> buf;
    for (int64_t start = begin; start < end; start += kPointBlock) {
      const int64_t n = std::min(kPointBlock, end - start);
      block_scores(cls, source, start, n, sigmoid_scores, buf);
      for (int64_t i = 0; i < n; ++i) {
        const PointCells<acc_t>& pc = buf.cells[i];
        if (!pc.valid) continue;
        const scalar_t* g = grad_data + layout.offset(start + i);
        acc_t* d = grad_scores.data() + (start + i) * 4 * outputs;
        for (int64_t u = 0; u < pc.count; ++u) {
          for (int64_t m = 0; m < outputs; ++m) {
            acc_t value = pc.alpha[u] * acc_t(g[m * layout.channel_stride]);
            if (sigmoid_scores) {
              const acc_t s = sigmoid(buf.scores[(i * 4 + u) * outputs + m]);
              value *= s * (acc_t(1) - s);
            }
            d[u * outputs + m] = value;
          }
        }
      }
    }
  });
  const auto point_cells_at = [&](int64_t p, ImagePoint<acc_t>* point) {
    *point = source(p);
    return point_cells(cls, *point, p / per_row);
  };

  // grad_bias rows: each row (a box, or a point) sums its points in order.
  at::Tensor grad_bias_acc =
      at::zeros({source.rows(), shape.cells, outputs}, features[0].options().dtype(acc));
  acc_t* grad_bias = grad_bias_acc.data_ptr<acc_t>();
  at::parallel_for(0, source.rows(), std::max<int64_t>(kPointBlock / per_row, 1), [&](int64_t r0, int64_t r1) {
    for (int64_t p = r0 * per_row; p < r1 * per_row; ++p) {
      ImagePoint<acc_t> point;
      const PointCells<acc_t> pc = point_cells_at(p, &point);
      const acc_t* d = grad_scores.data() + p * 4 * outputs;
      for (int64_t u = 0; u < pc.count; ++u)
        for (int64_t m = 0; m < outputs; ++m)
          grad_bias[((p / per_row) * shape.cells + pc.cell[u]) * outputs + m] += d[u * outputs + m];
    }
  });

  std::vector<at::Tensor> grad_features, grad_weights, grad_weight_rows;
  for (size_t l = 0; l < features.size(); ++l) {
    grad_features.push_back(at::empty_like(features[l]));
    grad_weights.push_back(at::empty_like(weights[l]));
    const at::Tensor& gw = grad_weights.back();
    // Accumulate straight into the gradient where it already is the (Q, C) rows in acc dtype.
    if (gw.scalar_type() == acc && gw.is_contiguous()) {
      grad_weight_rows.push_back(gw.view({cls.score_channels(), gw.size(3)}));
    } else {
      grad_weight_rows.push_back(at::empty({cls.score_channels(), gw.size(3)}, gw.options().dtype(acc)));
    }
  }

  // Projected layers: dL/ds into gradient score maps, then two GEMMs each.
  std::vector<int64_t> projected, sampled;
  for (size_t l = 0; l < features.size(); ++l)
    (cls.orders[l] == kOrderProjectScores ? projected : sampled).push_back(static_cast<int64_t>(l));
  std::vector<at::Tensor> grad_score_maps(features.size());
  for (int64_t l : projected) {
    const FeatureMap<scalar_t>& map = cls.maps[l];
    grad_score_maps[l] = at::zeros({map.batch, map.height, map.width, cls.score_channels()},
                                   features[0].options().dtype(acc));
  }
  if (!projected.empty()) scatter_score_grads(cls, source, projected, grad_scores.data(), grad_score_maps);
  for (int64_t l : projected) {
    project_grad_features(grad_score_maps[l], cls.weight_rows[l], grad_features[l]);
    project_grad_weights(grad_score_maps[l], features[l], grad_weight_rows[l]);
  }

  // Sampled layers: channel blocks are the work items; each scans every point in order.
  for (int64_t l : sampled) grad_weight_rows[l].zero_();
  const std::vector<ChannelBlock> blocks = channel_blocks(features, sampled);
  run_items(static_cast<int64_t>(blocks.size()), [&](int64_t item) {
    const ChannelBlock& block = blocks[item];
    const FeatureMap<scalar_t>& map = cls.maps[block.layer];
    const int64_t width = block.c1 - block.c0;
    const acc_t* weight = cls.weight_rows[block.layer].template const_data_ptr<acc_t>();
    acc_t* grad_weight = grad_weight_rows[block.layer].template data_ptr<acc_t>();
    std::vector<acc_t> accumulator(map.batch * map.height * map.width * width, acc_t(0));
    std::vector<acc_t> column(width), grad_column(width);
    for (int64_t p = 0; p < count; ++p) {
      ImagePoint<acc_t> point;
      const PointCells<acc_t> pc = point_cells_at(p, &point);
      if (!pc.valid) continue;
      const SampleTaps<acc_t> taps =
          sample_taps<acc_t>(map, point.x, point.y, cls.padding, pc.b, map.stride_b,
                             map.stride_h, map.stride_w);
      const int64_t zero = 0;
      gather_channels(map, &taps, &zero, 1, block.c0, block.c1, column.data(), 1);
      std::fill(grad_column.begin(), grad_column.end(), acc_t(0));
      const acc_t* d = grad_scores.data() + p * 4 * outputs;
      for (int64_t u = 0; u < pc.count; ++u) {
        for (int64_t m = 0; m < outputs; ++m) {
          const int64_t row = (cls.score_row(pc.label, pc.cell[u]) + m) * map.channels + block.c0;
          const acc_t g = d[u * outputs + m];
          const acc_t* w = weight + row;
          acc_t* gw = grad_weight + row;
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) {
            grad_column[c] += g * w[c];
            gw[c] += g * column[c];
          }
        }
      }
      const SampleTaps<acc_t> to =
          sample_taps<acc_t>(map, point.x, point.y, cls.padding, pc.b,
                             map.height * map.width * width, map.width * width, width);
      for (int k = 0; k < 4; ++k) {
        acc_t* a = accumulator.data() + to.offset[k];
        const acc_t weight_k = to.weight[k];
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) a[c] += weight_k * grad_column[c];
      }
    }
    write_channel_block<scalar_t>(accumulator, grad_features[block.layer], block.c0, block.c1);
  });

  for (size_t l = 0; l < features.size(); ++l) {
    if (grad_weight_rows[l].data_ptr() != grad_weights[l].data_ptr())
      grad_weights[l].copy_(grad_weight_rows[l].view(grad_weights[l].sizes()));
  }
  at::Tensor grad_bias_out = grad_bias_acc.to(features[0].scalar_type());
  return {grad_features, grad_weights, grad_bias_out};
}

// ----------------------------------------------------------------------------- operators

at::Tensor fused_hypercolumn_cpu(at::TensorList features, const at::Tensor& boxes,
                                 at::TensorList weights, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& labels, int64_t output_height,
                                 int64_t output_width, at::ArrayRef<double> scale_y,
                                 at::ArrayRef<double> scale_x, int64_t padding,
                                 int64_t activation, at::IntArrayRef orders) {
  check_features(features);
  check_output_size(output_height, output_width);
  const at::Tensor coords = check_coordinates("boxes", boxes, 5, features[0].scalar_type());
  const int64_t count = coords.size(0);
  const ClassifierShape shape = check_fused(features, weights, bias, labels, count, scale_y,
                                            scale_x, padding, activation, orders);
  at::Tensor out =
      new_output({count, shape.outputs, output_height, output_width}, features[0].options());
  if (count == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fused_hypercolumn", [&] {
    using acc_t = acc_type<scalar_t>;
    Classifier<scalar_t> cls = make_classifier<scalar_t>(features, weights, bias, labels, shape,
                                                         scale_y, scale_x, padding, activation, orders);
    const BoxGrid<acc_t> source{coords.const_data_ptr<acc_t>(), count, output_height, output_width};
    const bool all_projected = std::all_of(cls.orders.begin(), cls.orders.end(),
                                           [](int64_t order) { return order == kOrderProjectScores; });
    if (all_projected) {
      box_fused_forward(cls, features, source, out.data_ptr<scalar_t>(), grid_layout(out));
    } else {
      fused_forward(cls, features, source, out.data_ptr<scalar_t>(), grid_layout(out));
    }
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
fused_hypercolumn_backward_cpu(const at::Tensor& grad, at::TensorList features,
                               const at::Tensor& boxes, at::TensorList weights,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& labels, int64_t output_height,
                               int64_t output_width, at::ArrayRef<double> scale_y,
                               at::ArrayRef<double> scale_x, int64_t padding, int64_t activation,
                               at::IntArrayRef orders) {
  check_features(features);
  check_output_size(output_height, output_width);
  const at::Tensor coords = check_coordinates("boxes", boxes, 5, features[0].scalar_type());
  const int64_t count = coords.size(0);
  const ClassifierShape shape = check_fused(features, weights, bias, labels, count, scale_y,
                                            scale_x, padding, activation, orders);
  check_grad(grad, {count, shape.outputs, output_height, output_width}, features[0].scalar_type());
  std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fused_hypercolumn_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    Classifier<scalar_t> cls = make_classifier<scalar_t>(features, weights, bias, labels, shape,
                                                         scale_y, scale_x, padding, activation, orders);
    const BoxGrid<acc_t> source{coords.const_data_ptr<acc_t>(), count, output_height, output_width};
    grads = fused_backward(cls, features, weights, source, grad, grid_layout(grad));
  });
  return grads;
}

// Checked coordinates of the points form: points (N, 3) and places (N, 2) or an undefined tensor.
std::pair<at::Tensor, at::Tensor> point_coordinates(at::TensorList features,
                                                    const at::Tensor& points,
                                                    const std::optional<at::Tensor>& locations,
                                                    const ClassifierShape& shape) {
  const auto dtype = features[0].scalar_type();
  at::Tensor coords = check_coordinates("points", points, 3, dtype);
  at::Tensor places;
  if (locations.has_value() && locations->defined()) {
    places = check_coordinates("locations", *locations, 2, dtype);
    TORCH_CHECK(places.size(0) == coords.size(0), "locations: expected ", coords.size(0),
                " rows (one per point), got ", places.size(0));
  } else {
    TORCH_CHECK(shape.cells == 1, "locations: required when K > 1 (KK = ", shape.cells, ")");
  }
  return {coords, places};
}

// The checked arguments of the point operators (forward and backward alike).
struct PointArguments {
  int64_t count;
  ClassifierShape shape;
  at::Tensor coords, places;

  template <typename acc_t>
  PointList<acc_t> points() const {
    return {coords.const_data_ptr<acc_t>(), places.defined() ? places.const_data_ptr<acc_t>() : nullptr,
            count};
  }
};

PointArguments check_point_arguments(at::TensorList features, const at::Tensor& points,
                                     const std::optional<at::Tensor>& locations,
                                     at::TensorList weights, const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& labels,
                                     at::ArrayRef<double> scale_y, at::ArrayRef<double> scale_x,
                                     int64_t padding, int64_t activation, at::IntArrayRef orders) {
  check_features(features);
  TORCH_CHECK(points.defined() && points.dim() == 2, "points: expected shape (N, 3), got ",
              points.sizes());
  PointArguments args;
  args.count = points.size(0);
  args.shape = check_fused(features, weights, bias, labels, args.count, scale_y, scale_x, padding,
                           activation, orders);
  std::tie(args.coords, args.places) = point_coordinates(features, points, locations, args.shape);
  return args;
}

at::Tensor fused_hypercolumn_points_cpu(at::TensorList features, const at::Tensor& points,
                                        const std::optional<at::Tensor>& locations,
                                        at::TensorList weights,
                                        const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& labels,
                                        at::ArrayRef<double> scale_y, at::ArrayRef<double> scale_x,
                                        int64_t padding, int64_t activation,
                                        at::IntArrayRef orders) {
  const PointArguments args = check_point_arguments(features, points, locations, weights, bias,
                                                    labels, scale_y, scale_x, padding, activation,
                                                    orders);
  at::Tensor out = new_output({args.count, args.shape.outputs}, features[0].options());
  if (args.count == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fused_hypercolumn_points", [&] {
    using acc_t = acc_type<scalar_t>;
    Classifier<scalar_t> cls = make_classifier<scalar_t>(features, weights, bias, labels, args.shape,
                                                         scale_y, scale_x, padding, activation, orders);
    fused_forward(cls, features, args.points<acc_t>(), out.data_ptr<scalar_t>(),
                  row_layout(args.shape.outputs, 1));
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
fused_hypercolumn_points_backward_cpu(const at::Tensor& grad, at::TensorList features,
                                      const at::Tensor& points,
                                      const std::optional<at::Tensor>& locations,
                                      at::TensorList weights,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& labels,
                                      at::ArrayRef<double> scale_y, at::ArrayRef<double> scale_x,
                                      int64_t padding, int64_t activation, at::IntArrayRef orders) {
  const PointArguments args = check_point_arguments(features, points, locations, weights, bias,
                                                    labels, scale_y, scale_x, padding, activation,
                                                    orders);
  check_grad(grad, {args.count, args.shape.outputs}, features[0].scalar_type());
  std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fused_hypercolumn_points_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    Classifier<scalar_t> cls = make_classifier<scalar_t>(features, weights, bias, labels, args.shape,
                                                         scale_y, scale_x, padding, activation, orders);
    grads = fused_backward(cls, features, weights, args.points<acc_t>(), grad,
                           row_layout(grad.stride(0), grad.stride(1)));
  });
  return grads;
}

}  // namespace
}  // namespace cpu
}  // namespace hypercolumn_ops

TORCH_LIBRARY_IMPL(hypercolumn_ops, CPU, m) {
  using namespace hypercolumn_ops::cpu;
  m.impl("fused_hypercolumn", TORCH_FN(fused_hypercolumn_cpu));
  m.impl("fused_hypercolumn_backward", TORCH_FN(fused_hypercolumn_backward_cpu));
  m.impl("fused_hypercolumn_points", TORCH_FN(fused_hypercolumn_points_cpu));
  m.impl("fused_hypercolumn_points_backward", TORCH_FN(fused_hypercolumn_points_backward_cpu));
}
