// CPU kernels of fused_hypercolumn and fused_hypercolumn_points, backward (the classifier's math
// in csrc/cpu/classifier.h).
//
// Backward recomputes the scores where the sigmoid needs them, stores dL/ds per point and hit
// cell, then: projected layers scatter dL/ds into gradient score maps (parallel over bands of
// map rows; box grids a grid row at a time, through their separability) followed by two GEMMs
// (csrc/cpu/projection.h); sampled layers scatter per channel block (parallel over blocks). Every
// GEMM is split into fixed tiles, each one single-threaded product, so no result depends on the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/classifier.h"

namespace hypercolumn_ops {
namespace cpu {
namespace {

using FusedGrads = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>;

// Projected layers: dL/ds (`grad_scores`, per point and hit cell) into the gradient score maps
// (B, H, W, NC * KK * M) of the `projected` layers. Bands of map rows are the work items; each
// scans every point in order and applies the taps that fall in its rows, so each element sums in
// one fixed order whatever the thread count.
template <typename scalar_t>
void scatter_score_grads(const Classifier<scalar_t>& cls, const PointList<acc_type<scalar_t>>& source,
                         const SourceCells<scalar_t, PointList<acc_type<scalar_t>>>& cells,
                         const std::vector<int64_t>& projected, const acc_type<scalar_t>* grad_scores,
                         std::vector<at::Tensor>& grad_score_maps) {
  using acc_t = acc_type<scalar_t>;
  const int64_t bands = at::get_num_threads();
  const int64_t channels = cls.score_channels(), outputs = cls.shape.outputs;
  const int64_t count = source.size();
  at::parallel_for(0, bands, 1, [&](int64_t band0, int64_t band1) {
    for (int64_t band = band0; band < band1; ++band) {
      for (int64_t p = 0; p < count; ++p) {
        ImagePoint<acc_t> point;
        const PointCells<acc_t> pc = cells(p, &point);
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
// (`line`, the label's score channels of the row's cells), then added into the row's map rows,
// weighted along y. With the default sampling a point costs two multiply-adds per hit cell and
// output instead of its taps and eight. Bands of map rows are the work items; each takes the
// blocks of kBoxRows grid rows, in each the boxes, and in each box the block's rows, in order, so
// each element sums in one fixed order whatever the thread count. The points' hit cells are the
// grid's (`cells`, found once per call).
template <typename scalar_t>
void scatter_score_grads(const Classifier<scalar_t>& cls, const BoxGrid<acc_type<scalar_t>>& source,
                         const SourceCells<scalar_t, BoxGrid<acc_type<scalar_t>>>& cells,
                         const std::vector<int64_t>& projected, const acc_type<scalar_t>* grad_scores,
                         std::vector<at::Tensor>& grad_score_maps) {
  using acc_t = acc_type<scalar_t>;
  const ClassifierShape& shape = cls.shape;
  const int64_t bands = at::get_num_threads();
  const int64_t oh = source.output_height, ow = source.output_width;
  const int64_t channels = cls.score_channels(), outputs = shape.outputs;
  at::parallel_for(0, bands, 1, [&](int64_t band0, int64_t band1) {
    std::vector<acc_t> us, vs;
    source.places(&us, &vs);
    BoxLayerTaps<acc_t> t;
    // Grid row i of box r (image b, label) on layer l, whose taps `t` holds, into the map rows of
    // [y_begin, y_end).
    const auto add_row = [&](int64_t l, int64_t r, int64_t b, int64_t label, int64_t i, int64_t y_begin,
                             int64_t y_end, auto two) {
      const FeatureMap<scalar_t>& map = cls.maps[l];
      const int64_t ty = two ? 2 : t.box.along_y.taps, tx = two ? 2 : t.box.along_x.taps;
      const int64_t* ys = t.box.along_y.index.data() + i * ty;
      const acc_t* wy = t.box.along_y.weight.data() + i * ty;
      bool in_band = false;
      for (int64_t a = 0; a < ty; ++a) in_band = in_band || (ys[a] >= y_begin && ys[a] < y_end && wy[a] != acc_t(0));
      if (!in_band) return;
      const CellRun run = row_cells(vs[i], shape.grid);
      const int64_t width = (run.end - run.first) * outputs;
      t.line.assign(t.columns.size() * width, acc_t(0));
      for (int64_t j = 0; j < ow; ++j) {
        const PointCells<acc_t>& pc = cells.place(i, j);
        const acc_t* d = grad_scores + ((r * oh + i) * ow + j) * 4 * outputs;
        for (int64_t x = 0; x < tx; ++x) {
          const acc_t wx = t.box.along_x.weight[j * tx + x];
          acc_t* to = t.line.data() + t.slots[j * tx + x] * width - run.first * outputs;
          for (int64_t u = 0; u < pc.count; ++u) {
            const int64_t k0 = pc.cell[u] * outputs;
            for (int64_t m = 0; m < outputs; ++m) to[k0 + m] += wx * d[u * outputs + m];
          }
        }
      }
      acc_t* map_data = grad_score_maps[l].template data_ptr<acc_t>() + cls.score_row(label, run.first);
      for (int64_t a = 0; a < ty; ++a) {
        // A padded tap (weight 0) adds nothing.
        if (ys[a] < y_begin || ys[a] >= y_end || wy[a] == acc_t(0)) continue;
        acc_t* map_row = map_data + (b * map.height + ys[a]) * map.width * channels;
        const acc_t w = wy[a];
        for (size_t s = 0; s < t.columns.size(); ++s) {
          acc_t* to = map_row + t.columns[s] * channels;
          const acc_t* from = t.line.data() + s * width;
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) to[c] += w * from[c];
        }
      }
    };
    for (int64_t band = band0; band < band1; ++band) {
      for (int64_t i0 = 0; i0 < oh; i0 += kBoxRows) {
        const int64_t i1 = std::min(i0 + kBoxRows, oh);
        for (int64_t r = 0; r < source.rows(); ++r) {
          int64_t b = 0, label = 0;
          if (!box_row(cls, source, r, &b, &label)) continue;  // its points have no gradient
          for (int64_t l : projected) {
            const int64_t height = cls.maps[l].height;
            t.set(source, r, cls.maps[l]);
            with_two_taps(t.box.along_x.taps == 2 && t.box.along_y.taps == 2, [&](auto two) {
              for (int64_t i = i0; i < i1; ++i)
                add_row(l, r, b, label, i, height * band / bands, height * (band + 1) / bands, two);
            });
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

  const SourceCells<scalar_t, Source> cells(cls, source);
  // dL/ds[p][u][m] of every point and hit cell: zero for invalid points.
  std::vector<acc_t> grad_scores(count * 4 * outputs, acc_t(0));
  const scalar_t* grad_data = grad.const_data_ptr<scalar_t>();
  at::parallel_for(0, count, kPointBlock, [&](int64_t begin, int64_t end) {
    BlockBuffers<acc_t> buf(std::min(kPointBlock, end - begin));
    for (int64_t start = begin; start < end; start += kPointBlock) {
      const int64_t n = std::min(kPointBlock, end - start);
      block_scores(cls, source, cells, start, n, sigmoid_scores, buf);
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
  // grad_bias rows: each row (a box, or a point) sums its points in order.
  at::Tensor grad_bias_acc =
      at::zeros({source.rows(), shape.cells, outputs}, features[0].options().dtype(acc));
  acc_t* grad_bias = grad_bias_acc.data_ptr<acc_t>();
  at::parallel_for(0, source.rows(), std::max<int64_t>(kPointBlock / per_row, 1), [&](int64_t r0, int64_t r1) {
    for (int64_t p = r0 * per_row; p < r1 * per_row; ++p) {
      ImagePoint<acc_t> point;
      const PointCells<acc_t> pc = cells(p, &point);
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
  if (!projected.empty()) scatter_score_grads(cls, source, cells, projected, grad_scores.data(), grad_score_maps);
  for (int64_t l : projected) {
    project_grad_features(grad_score_maps[l], cls.weight_rows(l), grad_features[l]);
    project_grad_weights(grad_score_maps[l], features[l], grad_weight_rows[l]);
  }

  // Sampled layers: channel blocks are the work items; each scans every point in order.
  for (int64_t l : sampled) grad_weight_rows[l].zero_();
  const std::vector<ChannelBlock> blocks = channel_blocks(features, sampled);
  run_items(static_cast<int64_t>(blocks.size()), [&](int64_t item) {
    const ChannelBlock& block = blocks[item];
    const FeatureMap<scalar_t>& map = cls.maps[block.layer];
    const int64_t width = block.c1 - block.c0;
    const acc_t* weight = cls.weights[block.layer].template const_data_ptr<acc_t>();
    acc_t* grad_weight = grad_weight_rows[block.layer].template data_ptr<acc_t>();
    std::vector<acc_t> accumulator(map.batch * map.height * map.width * width, acc_t(0));
    std::vector<acc_t> column(width), grad_column(width);
    BlockTaps<acc_t> taps;  // one point's, on the map
    std::vector<SampleTaps<acc_t>> to;  // the same taps, on the accumulator
    PointTapper<acc_t> tapper;
    for (int64_t p = 0; p < count; ++p) {
      ImagePoint<acc_t> point;
      const PointCells<acc_t> pc = cells(p, &point);
      if (!pc.valid) continue;
      taps.clear();
      tapper.append(source, p, point, map, block.layer, cls.padding, pc.b, map.stride_b, map.stride_h, map.stride_w,
                    &taps.groups);
      taps.close();
      const int64_t zero = 0;
      gather_channels(map, taps, &zero, 1, block.c0, block.c1, column.data(), 1);
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
      to.clear();
      tapper.append(source, p, point, map, block.layer, cls.padding, pc.b, map.height * map.width * width,
                    map.width * width, width, &to);
      for (const SampleTaps<acc_t>& group : to) {
        for (int k = 0; k < 4; ++k) {
          acc_t* a = accumulator.data() + group.offset[k];
          const acc_t weight_k = group.weight[k];
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) a[c] += weight_k * grad_column[c];
        }
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

FusedGrads fused_hypercolumn_backward_cpu(const at::Tensor& grad, at::TensorList features, const at::Tensor& boxes,
                                          at::TensorList weights, const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& labels, int64_t output_height,
                                          int64_t output_width, at::IntArrayRef image_size,
                                          at::ArrayRef<double> spatial_scale, int64_t padding, int64_t activation,
                                          at::IntArrayRef orders, int64_t sampling_ratio, bool aligned) {
  const FusedArguments args =
      check_fused_boxes(features, c10::DeviceType::CPU, boxes, weights, bias, labels, output_height, output_width,
                        image_size, spatial_scale, padding, activation, orders);
  check_sampling_ratio(sampling_ratio);
  check_grad(grad, {args.count, args.shape.outputs, output_height, output_width}, features[0]);
  FusedGrads grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fused_hypercolumn_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    Classifier<scalar_t> cls = make_classifier<scalar_t>(features, weights, bias, labels, args.shape, args.scales,
                                                         padding, activation, orders);
    const BoxGrid<acc_t> source{args.rows.const_data_ptr<acc_t>(), args.count, output_height, output_width,
                                BoxSampling{padding, sampling_ratio, aligned}};
    grads = fused_backward(cls, features, weights, source, grad, grid_layout(grad));
  });
  return grads;
}

FusedGrads fused_hypercolumn_points_backward_cpu(const at::Tensor& grad, at::TensorList features,
                                                 const at::Tensor& points, const std::optional<at::Tensor>& locations,
                                                 at::TensorList weights, const std::optional<at::Tensor>& bias,
                                                 const std::optional<at::Tensor>& labels, at::IntArrayRef image_size,
                                                 at::ArrayRef<double> spatial_scale, int64_t padding,
                                                 int64_t activation, at::IntArrayRef orders) {
  const FusedArguments args = check_fused_points(features, c10::DeviceType::CPU, points, locations, weights, bias,
                                                 labels, image_size, spatial_scale, padding, activation, orders);
  check_grad(grad, {args.count, args.shape.outputs}, features[0]);
  FusedGrads grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fused_hypercolumn_points_backward", [&] {
    Classifier<scalar_t> cls = make_classifier<scalar_t>(features, weights, bias, labels, args.shape, args.scales,
                                                         padding, activation, orders);
    grads = fused_backward(cls, features, weights, point_list<acc_type<scalar_t>>(args), grad,
                           row_layout(grad.stride(0), grad.stride(1)));
  });
  return grads;
}

}  // namespace
}  // namespace cpu
}  // namespace hypercolumn_ops

TORCH_LIBRARY_IMPL(hypercolumn_ops, CPU, m) {
  using namespace hypercolumn_ops::cpu;
  m.impl("fused_hypercolumn_backward", TORCH_FN(fused_hypercolumn_backward_cpu));
  m.impl("fused_hypercolumn_points_backward", TORCH_FN(fused_hypercolumn_points_backward_cpu));
}
