// CPU kernels of fused_hypercolumn and fused_hypercolumn_points, forward (the classifier's math
// in csrc/cpu/classifier.h).
//
// Each layer is evaluated in the order `orders` names:
//   sample features (0): gather a block of points' features, a channel chunk at a time, and
//     take dot products with the hit cells' classifier rows;
//   project scores (1): one GEMM maps the layer to NC * KK * M score channels, (B, H, W, Q) in
//     the accumulation dtype (csrc/cpu/projection.h), which the points then sample. Box grids
//     whose layers are all projected use the grid's separability instead (box_fused_forward):
//     taps per grid column and per grid row, score maps interpolated along y once per grid row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/classifier.h"
#include "poison.h"

namespace hypercolumn_ops {
namespace cpu {
namespace {

// out at `layout` (M channels): sum over hit cells of alpha * act(score), NaN for invalid points.
template <typename scalar_t, typename Source>
void fused_forward(Classifier<scalar_t>& cls, at::TensorList features, const Source& source,
                   scalar_t* out, const PointLayout& layout) {
  using acc_t = acc_type<scalar_t>;
  project_layers(cls, features);
  const int64_t outputs = cls.shape.outputs;
  const SourceCells<scalar_t, Source> cells(cls, source);
  at::parallel_for(0, source.size(), kPointBlock, [&](int64_t begin, int64_t end) {
    BlockBuffers<acc_t> buf(std::min(kPointBlock, end - begin));
    for (int64_t start = begin; start < end; start += kPointBlock) {
      const int64_t count = std::min(kPointBlock, end - start);
      block_scores(cls, source, cells, start, count, true, buf);
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

// fused_forward on box grids where every layer is projected, into (R, M, oh, ow) at `layout`.
// A box's grid is separable (BoxTaps: a grid column has its x taps and u, a grid row its y taps
// and v): per box, every layer's taps are found once; per grid row, each layer's score maps are
// interpolated along y at the distinct map columns the grid reads, for the cells the row can
// hit; each point then takes its x taps per layer and cell (two with the default sampling), and
// its hit cells from the grid's (SourceCells, found once per call). Work items are (box, block of
// rows), so that a thread finds a box's taps once for its blocks; a point's sums do not depend on
// the item it is in.
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
  const SourceCells<scalar_t, BoxGrid<acc_t>> cells(cls, source);
  at::parallel_for(0, source.rows() * row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> us, vs, scores(outputs), values(outputs);
    source.places(&us, &vs);
    std::vector<BoxLayerTaps<acc_t>> taps(layers);
    std::vector<const acc_t*> lines(layers), wx(layers), wy(layers), map_rows;
    std::vector<int64_t> x_taps(layers), y_taps(layers);
    // Per layer, grid column and x tap: where the tap's scores start in the layer's line.
    std::vector<std::vector<int64_t>> tap_offsets(layers);
    int64_t taps_box = -1, b = 0, label = 0;
    bool box_valid = false, two = true;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / row_blocks, block = item - r * row_blocks;
      const int64_t i0 = block * kBoxRows, i1 = std::min(i0 + kBoxRows, oh);
      if (r != taps_box) {
        taps_box = r;
        box_valid = box_row(cls, source, r, &b, &label);
        two = true;
        for (size_t l = 0; box_valid && l < layers; ++l) {
          taps[l].set(source, r, cls.maps[l]);
          x_taps[l] = taps[l].box.along_x.taps;
          y_taps[l] = taps[l].box.along_y.taps;
          wx[l] = taps[l].box.along_x.weight.data();
          wy[l] = taps[l].box.along_y.weight.data();
          two = two && x_taps[l] == 2 && y_taps[l] == 2;
        }
      }
      scalar_t* box_out = out + r * layout.row_stride;
      if (!box_valid) {
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = 0; j < ow; ++j)
            for (int64_t m = 0; m < outputs; ++m)
              box_out[i * layout.i_stride + j * layout.j_stride + m * layout.channel_stride] =
                  scalar_t(quiet_nan<acc_t>());
        continue;
      }
      with_two_taps(two, [&](auto two_taps) {
        // Two taps a line: the loops below take both taps in one pass, their weights in registers.
        constexpr bool pairs = std::is_same_v<decltype(two_taps), std::true_type>;
        for (int64_t i = i0; i < i1; ++i) {
          scalar_t* row_out = box_out + i * layout.i_stride;
          const CellRun run = row_cells(vs[i], shape.grid);
          const int64_t first_cell = run.first;
          const int64_t q0 = cls.score_row(label, first_cell);
          const int64_t width = (run.end - first_cell) * outputs;
          for (size_t l = 0; l < layers; ++l) {
            const FeatureMap<scalar_t>& map = cls.maps[l];
            BoxLayerTaps<acc_t>& t = taps[l];
            const int64_t ty = two_taps ? 2 : y_taps[l];
            const acc_t* map_scores = cls.score_maps[l].template const_data_ptr<acc_t>() + q0;
            const int64_t* ys = t.box.along_y.index.data() + i * ty;
            const acc_t* weights = wy[l] + i * ty;
            map_rows.resize(ty);
            for (int64_t a = 0; a < ty; ++a)
              map_rows[a] = map_scores + (b * map.height + ys[a]) * map.width * channels;
            t.line.resize(t.columns.size() * width);
            for (size_t s = 0; s < t.columns.size(); ++s) {
              const int64_t column = t.columns[s] * channels;
              acc_t* to = t.line.data() + s * width;
              if constexpr (pairs) {
                const acc_t w0 = weights[0], w1 = weights[1];
                const acc_t* upper = map_rows[0] + column;
                const acc_t* lower = map_rows[1] + column;
#pragma omp simd
                for (int64_t k = 0; k < width; ++k) to[k] = w0 * upper[k] + w1 * lower[k];
              } else {
#pragma omp simd
                for (int64_t k = 0; k < width; ++k) {
                  acc_t value = weights[0] * map_rows[0][column + k];
                  for (int64_t a = 1; a < ty; ++a) value += weights[a] * map_rows[a][column + k];
                  to[k] = value;
                }
              }
            }
          }
          // Flat per-row tap tables: a point's sums read plain arrays.
          for (size_t l = 0; l < layers; ++l) {
            const BoxLayerTaps<acc_t>& t = taps[l];
            lines[l] = t.line.data();
            tap_offsets[l].resize(t.slots.size());
            for (size_t k = 0; k < t.slots.size(); ++k) tap_offsets[l][k] = t.slots[k] * width - first_cell * outputs;
          }
          for (int64_t j = 0; j < ow; ++j) {
            scalar_t* o = row_out + j * layout.j_stride;
            const PointCells<acc_t>& pc = cells.place(i, j);
            std::fill(values.begin(), values.end(), acc_t(0));
            for (int64_t u = 0; u < pc.count; ++u) {
              const int64_t k0 = pc.cell[u] * outputs;
              if (outputs == 1) {  // one score: kept in a register across the layers
                acc_t score = bias_at(r, pc.cell[u], 0);
                for (size_t l = 0; l < layers; ++l) {
                  const int64_t tx = two_taps ? 2 : x_taps[l];
                  const int64_t* offsets = tap_offsets[l].data() + j * tx;
                  const acc_t* weights = wx[l] + j * tx;
                  for (int64_t t = 0; t < tx; ++t) score += weights[t] * lines[l][offsets[t] + k0];
                }
                values[0] += pc.alpha[u] * activate(score, cls.activation);
                continue;
              }
              for (int64_t m = 0; m < outputs; ++m) scores[m] = bias_at(r, pc.cell[u], m);
              for (size_t l = 0; l < layers; ++l) {  // several scores: each layer's M taps as vectors
                if constexpr (pairs) {
                  const acc_t* left = lines[l] + tap_offsets[l][j * 2] + k0;
                  const acc_t* right = lines[l] + tap_offsets[l][j * 2 + 1] + k0;
                  const acc_t w0 = wx[l][j * 2], w1 = wx[l][j * 2 + 1];
#pragma omp simd
                  for (int64_t m = 0; m < outputs; ++m) scores[m] += w0 * left[m] + w1 * right[m];
                } else {
                  const int64_t tx = x_taps[l];
                  for (int64_t t = 0; t < tx; ++t) {
                    const acc_t* tap = lines[l] + tap_offsets[l][j * tx + t] + k0;
                    const acc_t w = wx[l][j * tx + t];
#pragma omp simd
                    for (int64_t m = 0; m < outputs; ++m) scores[m] += w * tap[m];
                  }
                }
              }
              for (int64_t m = 0; m < outputs; ++m)
                values[m] += pc.alpha[u] * activate(scores[m], cls.activation);
            }
            for (int64_t m = 0; m < outputs; ++m) o[m * layout.channel_stride] = scalar_t(values[m]);
          }
        }
      });
    }
  });
}

at::Tensor fused_hypercolumn_cpu(at::TensorList features, const at::Tensor& boxes, at::TensorList weights,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& labels,
                                 int64_t output_height, int64_t output_width, at::IntArrayRef image_size,
                                 at::ArrayRef<double> spatial_scale, int64_t padding, int64_t activation,
                                 at::IntArrayRef orders, int64_t sampling_ratio, bool aligned) {
  const FusedArguments args =
      check_fused_boxes(features, c10::DeviceType::CPU, boxes, weights, bias, labels, output_height, output_width,
                        image_size, spatial_scale, padding, activation, orders);
  check_sampling_ratio(sampling_ratio);
  at::Tensor out = new_output({args.count, args.shape.outputs, output_height, output_width}, features[0].options());
  if (args.count == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fused_hypercolumn", [&] {
    using acc_t = acc_type<scalar_t>;
    Classifier<scalar_t> cls = make_classifier<scalar_t>(features, weights, bias, labels, args.shape, args.scales,
                                                         padding, activation, orders);
    const BoxGrid<acc_t> source{args.rows.const_data_ptr<acc_t>(), args.count, output_height, output_width,
                                BoxSampling{padding, sampling_ratio, aligned}};
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

at::Tensor fused_hypercolumn_points_cpu(at::TensorList features, const at::Tensor& points,
                                        const std::optional<at::Tensor>& locations, at::TensorList weights,
                                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& labels,
                                        at::IntArrayRef image_size, at::ArrayRef<double> spatial_scale,
                                        int64_t padding, int64_t activation, at::IntArrayRef orders) {
  const FusedArguments args = check_fused_points(features, c10::DeviceType::CPU, points, locations, weights, bias,
                                                 labels, image_size, spatial_scale, padding, activation, orders);
  at::Tensor out = new_output({args.count, args.shape.outputs}, features[0].options());
  if (args.count == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fused_hypercolumn_points", [&] {
    Classifier<scalar_t> cls = make_classifier<scalar_t>(features, weights, bias, labels, args.shape, args.scales,
                                                         padding, activation, orders);
    fused_forward(cls, features, point_list<acc_type<scalar_t>>(args), out.data_ptr<scalar_t>(),
                  row_layout(args.shape.outputs, 1));
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace hypercolumn_ops

TORCH_LIBRARY_IMPL(hypercolumn_ops, CPU, m) {
  using namespace hypercolumn_ops::cpu;
  m.impl("fused_hypercolumn", TORCH_FN(fused_hypercolumn_cpu));
  m.impl("fused_hypercolumn_points", TORCH_FN(fused_hypercolumn_points_cpu));
}
