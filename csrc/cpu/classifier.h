// The classifier of the CPU fused kernels, shared by their forward and backward passes: the
// weights, bias and labels of a call, the cells each point is classified with, the scores of a
// block of points (every layer in its order), and the separable taps of a box grid.
//
// Score of cell k at point p: s_k(p) = sum_l W_l[label, k] @ f_l(p) + b[row(p), k]; output
// out(p) = sum_k alpha_k(p) * act(s_k(p)) over the (at most four) cells with non-zero location
// weight.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/points.h"
#include "cpu/projection.h"
#include "cpu/sampling.h"
#include "cpu/work.h"
#include "hypercolumn_math.h"

namespace hypercolumn_ops {
namespace cpu {

// Channels gathered per chunk when sampling features: a block's tile is
// kPointBlock x kTileChannels. Fixed, so a score's summation order never depends on the block.
constexpr int64_t kTileChannels = 128;

// The classifier of a call, in the accumulation dtype: weights as (NC * KK * M, C_l) rows,
// bias rows, labels, and the score maps of the projected layers once computed.
template <typename scalar_t>
struct Classifier {
  using acc_t = acc_type<scalar_t>;
  ClassifierShape shape;
  int64_t padding, activation, batch;
  std::vector<FeatureMap<scalar_t>> maps;
  std::vector<int64_t> orders;
  std::vector<at::Tensor> weights;      // (NC, KK, M, C_l) contiguous: rows (NC * KK * M, C_l)
  std::vector<at::Tensor> score_maps;   // (B, H_l, W_l, NC * KK * M) where projected
  const scalar_t* bias = nullptr;
  int64_t bias_stride[3] = {0, 0, 0};
  const int64_t* labels = nullptr;
  int64_t label_stride = 0;

  int64_t score_channels() const { return shape.classes * shape.cells * shape.outputs; }
  int64_t score_row(int64_t label, int64_t cell) const {
    return (label * shape.cells + cell) * shape.outputs;
  }
  // Layer l's weights as the (NC * KK * M, C_l) matrix of the score-map products.
  at::Tensor weight_rows(size_t l) const { return weights[l].view({score_channels(), weights[l].size(3)}); }
};

template <typename scalar_t>
Classifier<scalar_t> make_classifier(at::TensorList features, at::TensorList weights,
                                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& labels,
                                     const ClassifierShape& shape, const LayerScales& scales, int64_t padding,
                                     int64_t activation, at::IntArrayRef orders) {
  Classifier<scalar_t> cls;
  cls.shape = shape;
  cls.padding = padding;
  cls.activation = activation;
  cls.batch = features[0].size(0);
  const auto acc = accumulation_dtype(features[0].scalar_type());
  for (size_t l = 0; l < features.size(); ++l) {
    cls.maps.push_back(feature_map<scalar_t>(features[l], scales.y[l], scales.x[l]));
    cls.orders.push_back(orders[l]);
    const at::Tensor& w = weights[l];  // no copy (and no dispatch) where it is already as needed
    cls.weights.push_back(w.scalar_type() == acc ? w.contiguous() : w.to(acc).contiguous());
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

// The points of a fused_hypercolumn_points call and their places in their boxes, if given.
template <typename acc_t>
PointList<acc_t> point_list(const FusedArguments& args) {
  return {args.rows.const_data_ptr<acc_t>(),
          args.locations.defined() ? args.locations.const_data_ptr<acc_t>() : nullptr, args.count};
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

// Box r's image (*b) and label (*label, 0 without labels); false where its batch index or label
// is out of range, or its extents are not finite: its points get NaN outputs and no gradient.
template <typename scalar_t, typename acc_t>
bool box_row(const Classifier<scalar_t>& cls, const BoxGrid<acc_t>& source, int64_t r, int64_t* b, int64_t* label) {
  *label = 0;
  bool valid = batch_index<acc_t>(source.boxes[5 * r], cls.batch, b) && source.extents_finite(r);
  if (cls.labels != nullptr) {
    *label = cls.labels[r * cls.label_stride];
    valid = valid && *label >= 0 && *label < cls.shape.classes;
  }
  return valid;
}

// The hit cells of every point of a call's source, as point_cells finds them: a list's per point;
// a box grid's once per grid place (a place's u and v are the same in every box), with each box's
// image, label and validity (box_row). Built once per call, read by every thread.
template <typename scalar_t, typename Source>
class SourceCells;

template <typename scalar_t>
class SourceCells<scalar_t, PointList<acc_type<scalar_t>>> {
 public:
  using acc_t = acc_type<scalar_t>;
  SourceCells(const Classifier<scalar_t>& cls, const PointList<acc_t>& source) : cls_(cls), source_(source) {}

  // Point p's cells; *point = source(p).
  PointCells<acc_t> operator()(int64_t p, ImagePoint<acc_t>* point) const {
    *point = source_(p);
    return point_cells(cls_, *point, p);
  }

 private:
  const Classifier<scalar_t>& cls_;
  const PointList<acc_t>& source_;
};

template <typename scalar_t>
class SourceCells<scalar_t, BoxGrid<acc_type<scalar_t>>> {
 public:
  using acc_t = acc_type<scalar_t>;
  SourceCells(const Classifier<scalar_t>& cls, const BoxGrid<acc_t>& source)
      : cls_(cls), source_(source), places_(source.points_per_row()) {
    std::vector<acc_t> us, vs;
    source.places(&us, &vs);
    for (int64_t i = 0; i < source.output_height; ++i) {
      for (int64_t j = 0; j < source.output_width; ++j) {
        PointCells<acc_t>& pc = places_[i * source.output_width + j];
        pc = PointCells<acc_t>{};
        hit_cells(location_weights<acc_t>(us[j], vs[i], cls.shape.grid), &pc);
      }
    }
  }

  // The cells of grid row i, column j (in any box: valid, b and label unset).
  const PointCells<acc_t>& place(int64_t i, int64_t j) const { return places_[i * source_.output_width + j]; }

  // Point p's cells. *point is not set: a box grid's taps come from its box (PointTapper).
  PointCells<acc_t> operator()(int64_t p, ImagePoint<acc_t>*) const {
    const int64_t cells = static_cast<int64_t>(places_.size()), r = p / cells;
    PointCells<acc_t> pc = places_[p - r * cells];
    pc.valid = box_row(cls_, source_, r, &pc.b, &pc.label);
    if (!pc.valid) pc.count = 0;
    return pc;
  }

 private:
  const Classifier<scalar_t>& cls_;
  const BoxGrid<acc_t>& source_;
  std::vector<PointCells<acc_t>> places_;  // (oh * ow), valid unset
};

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

// A thread's buffers for blocks of at most `points` points (kPointBlock, or fewer where the
// thread has fewer: a call of a few points does not clear 160 KiB of buffers).
template <typename acc_t>
struct BlockBuffers {
  explicit BlockBuffers(int64_t points)
      : points(points), cells(points), tile_offsets(points), tile(points * kTileChannels) {}
  std::vector<ImagePoint<acc_t>> points;
  std::vector<PointCells<acc_t>> cells;
  BlockTaps<acc_t> taps;
  PointTapper<acc_t> tapper;
  std::vector<SampleTaps<acc_t>> groups;  // one point's
  std::vector<int64_t> tile_offsets;
  std::vector<acc_t> tile;
  std::vector<acc_t> scores;  // (points, 4, M)
};

// Points [start, start + count) of `source`: their cells (`cells`, the source's SourceCells), and
// (`with_scores`) the scores scores[(i * 4 + u) * M + m] of their hit cells u, bias plus every
// layer in order.
template <typename scalar_t, typename Source>
void block_scores(const Classifier<scalar_t>& cls, const Source& source, const SourceCells<scalar_t, Source>& cells,
                  int64_t start, int64_t count, bool with_scores, BlockBuffers<acc_type<scalar_t>>& buf) {
  using acc_t = acc_type<scalar_t>;
  const int64_t outputs = cls.shape.outputs;
  const int64_t per_row = source.points_per_row();
  for (int64_t i = 0; i < count; ++i) buf.cells[i] = cells(start + i, &buf.points[i]);
  if (!with_scores) return;
  buf.scores.resize(count * 4 * outputs);
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
      // Adds one group of taps of the score maps to the scores of point i's hit cells. `t` is
      // taken by value: in a local the compiler keeps its weights in registers across the
      // stores to the scores.
      const auto add_group = [&](int64_t i, const PointCells<acc_t>& pc, const SampleTaps<acc_t> t) {
        for (int64_t u = 0; u < pc.count; ++u) {
          const int64_t q = cls.score_row(pc.label, pc.cell[u]);
          acc_t* s = buf.scores.data() + (i * 4 + u) * outputs;
          for (int64_t m = 0; m < outputs; ++m) {
            s[m] += t.weight[0] * scores[t.offset[0] + q + m] + t.weight[1] * scores[t.offset[1] + q + m] +
                    t.weight[2] * scores[t.offset[2] + q + m] + t.weight[3] * scores[t.offset[3] + q + m];
          }
        }
      };
      const int64_t stride_b = map.height * map.width * channels, stride_h = map.width * channels;
      for (int64_t i = 0; i < count; ++i) {
        const PointCells<acc_t>& pc = buf.cells[i];
        if (!pc.valid) continue;
        if (source.one_group()) {  // a point, or a grid cell of one sample
          add_group(i, pc, buf.tapper.single(source, start + i, buf.points[i], map, l, cls.padding, pc.b, stride_b,
                                             stride_h, channels));
        } else {  // a box grid's cell: the groups of its samples, in order
          buf.groups.clear();
          buf.tapper.append(source, start + i, buf.points[i], map, l, cls.padding, pc.b, stride_b, stride_h,
                            channels, &buf.groups);
          for (const SampleTaps<acc_t>& t : buf.groups) add_group(i, pc, t);
        }
      }
    } else {
      buf.taps.clear();
      for (int64_t i = 0; i < count; ++i) {
        const PointCells<acc_t>& pc = buf.cells[i];
        if (pc.valid) {
          buf.tapper.append(source, start + i, buf.points[i], map, l, cls.padding, pc.b, map.stride_b, map.stride_h,
                            map.stride_w, &buf.taps.groups);
        } else {
          buf.taps.groups.push_back(invalid_taps<acc_t>());
        }
        buf.taps.close();
      }
      const acc_t* weights = cls.weights[l].template const_data_ptr<acc_t>();
      for (int64_t c0 = 0; c0 < map.channels; c0 += kTileChannels) {
        const int64_t width = std::min(kTileChannels, map.channels - c0);
        for (int64_t i = 0; i < count; ++i) buf.tile_offsets[i] = i * width;
        gather_channels(map, buf.taps, buf.tile_offsets.data(), count, c0, c0 + width, buf.tile.data(), 1);
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
      cls.score_maps[l] = project_scores(features[l], cls.weight_rows(l));
  }
}

// ----------------------------------------------------------------------------- box grids

// Grid rows per box_fused_forward work item: a block's hit cells (the same for every box) are
// found once per block and thread, and a 50 x 50 grid makes 5 blocks to share between threads.
constexpr int64_t kBoxRows = 10;

// One projected layer on one box: its taps (BoxTaps), the distinct map columns they read and, per
// grid column and x tap, where its map column is in that list.
template <typename acc_t>
struct BoxLayerTaps {
  BoxTaps<acc_t> box;
  std::vector<int64_t> columns, slots;
  // Per grid row: the label's score channels of the row's cells at every distinct column,
  // (columns, channels of the row's cells): score maps interpolated along y (forward), or
  // score gradients summed along x (backward).
  std::vector<acc_t> line;

  // The taps of box r of `grid` on `map`.
  template <typename scalar_t>
  void set(const BoxGrid<acc_t>& grid, int64_t r, const FeatureMap<scalar_t>& map) {
    box.set(grid, r, map);
    distinct_indices(box.along_x, map.width, &columns, &slots);
  }
};

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

}  // namespace cpu
}  // namespace hypercolumn_ops
