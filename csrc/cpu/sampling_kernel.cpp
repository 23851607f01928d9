// CPU kernels of sparse_hypercolumn and box_hypercolumn, forward and backward.
//
// Forward: parallel over blocks of points; per block and layer the bilinear taps are computed
// once per point, then every channel is gathered with them (no copy of the features, but for a
// channels_last copy of a small NCHW map read by many points). box_hypercolumn on planar
// (NCHW-like) maps, and wherever its cells average several samples (sampling_ratio,
// aligned=false), instead goes box by box, channel plane by channel plane, in the output's order,
// using the separability of a box grid.
// Backward: parallel over channel blocks of each layer; an item scatters all points, in order,
// into a float accumulator of its channels and writes that into the gradient, so each gradient
// element has one writer and a fixed summation order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/points.h"
#include "cpu/sampling.h"
#include "cpu/work.h"
#include "poison.h"

namespace hypercolumn_ops {
namespace cpu {
namespace {

// Points per forward block: with channel-strided (NCHW) features one channel plane is read by
// this many points while it is in cache.
constexpr int64_t kSampleBlock = 1024;

std::vector<int64_t> first_channels(at::TensorList features) {
  std::vector<int64_t> first;
  int64_t channel = 0;
  for (const auto& f : features) {
    first.push_back(channel);
    channel += f.size(1);
  }
  return first;
}

// Hypercolumns of every point of `source` into `out` at `layout` (layer l's channels start at
// the sum of the earlier layers' channel counts): points, or box grids of one sample a cell (whose
// taps are one group: the output is written in its dtype, never summed there). Each element is
// written once; points that sample nothing (invalid batch index, non-finite coordinates) get NaN.
template <typename scalar_t, typename Source>
void sample_forward(at::TensorList features, const Source& source, at::ArrayRef<double> scale_y,
                    at::ArrayRef<double> scale_x, int64_t padding, scalar_t* out,
                    const PointLayout& layout) {
  using acc_t = acc_type<scalar_t>;
  // A small map whose channel planes are far apart (NCHW at a deep layer: 16 x 16 pixels, 4096
  // channels) is read from a channels_last copy made once per call, so that each point reads
  // contiguous runs of channels instead of one element per plane. Made where the map has no
  // more pixels than there are points: the copy is at most the layer's part of the output.
  std::vector<at::Tensor> layers;
  std::vector<FeatureMap<scalar_t>> maps;
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor& f = features[l];
    const int64_t pixels = f.size(0) * f.size(2) * f.size(3);
    const bool transpose = f.stride(1) != 1 && pixels > 0 && pixels <= source.size();
    layers.push_back(transpose ? f.contiguous(at::MemoryFormat::ChannelsLast) : f);
    maps.push_back(feature_map<scalar_t>(layers.back(), scale_y[l], scale_x[l]));
  }
  const std::vector<int64_t> first = first_channels(features);
  at::parallel_for(0, source.size(), kSampleBlock, [&](int64_t begin, int64_t end) {
    // Sized to the work, not the block: a call of a few points does not clear 76 KiB.
    const int64_t block = std::min(kSampleBlock, end - begin);
    std::vector<ImagePoint<acc_t>> points(block);
    std::vector<int64_t> offsets(block);
    BlockTaps<acc_t> taps;
    PointTapper<acc_t> tapper;
    for (int64_t start = begin; start < end; start += kSampleBlock) {
      const int64_t count = std::min(kSampleBlock, end - start);
      for (int64_t i = 0; i < count; ++i) {
        points[i] = source(start + i);
        offsets[i] = layout.offset(start + i);
      }
      for (size_t l = 0; l < maps.size(); ++l) {
        const FeatureMap<scalar_t>& map = maps[l];
        taps.clear();
        for (int64_t i = 0; i < count; ++i) {
          int64_t b;
          if (!sample_batch(points[i], map.batch, &b)) {
            taps.groups.push_back(invalid_taps<acc_t>());
          } else {
            tapper.append(source, start + i, points[i], map, l, padding, b, map.stride_b, map.stride_h,
                          map.stride_w, &taps.groups);
          }
          taps.close();
        }
        gather_channels(map, taps, offsets.data(), count, 0, map.channels, out + first[l] * layout.channel_stride,
                        layout.channel_stride);
      }
    }
  });
}

// Channels of one layer per box forward work item: a box has ~75 items on the layers
// (enough to split a few boxes between threads), each long enough to amortise its box's taps.
constexpr int64_t kBoxChannelBlock = 64;

// A map whose channel planes do not interleave (NCHW-like): a plane is read as one block.
template <typename scalar_t>
bool planar(const FeatureMap<scalar_t>& map) {
  return map.stride_c >= std::max(map.stride_w, map.stride_h);
}

// box_hypercolumn into a contiguous (R, C, oh, ow) `out`, from planar maps (and, for sampled
// grids, from any: their cells' sums are kept in the accumulation dtype until written). Work
// items are (box, block of channels) in the output's order, so each thread writes (and
// first-touches) its own contiguous part of the output. A box's grid is separable (BoxTaps): per
// channel plane, every map row the grid reads is interpolated along x at the grid's columns, then
// each grid row is one weighted sum of its rows' interpolations, written as a contiguous run of
// ow values.
template <typename scalar_t>
void box_forward(at::TensorList features, const BoxGrid<acc_type<scalar_t>>& source,
                 at::ArrayRef<double> scale_y, at::ArrayRef<double> scale_x, scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  std::vector<FeatureMap<scalar_t>> maps;
  std::vector<ChannelBlock> blocks;
  for (size_t l = 0; l < features.size(); ++l) {
    maps.push_back(feature_map<scalar_t>(features[l], scale_y[l], scale_x[l]));
    for (int64_t c0 = 0; c0 < features[l].size(1); c0 += kBoxChannelBlock)
      blocks.push_back(ChannelBlock{static_cast<int64_t>(l), c0,
                                    std::min(c0 + kBoxChannelBlock, features[l].size(1))});
  }
  const std::vector<int64_t> first = first_channels(features);
  const int64_t oh = source.output_height, ow = source.output_width, cells = oh * ow;
  const int64_t channels = total_channels(features);
  const int64_t block_count = static_cast<int64_t>(blocks.size());
  at::parallel_for(0, source.rows() * block_count, 1, [&](int64_t begin, int64_t end) {
    BoxTaps<acc_t> taps;
    std::vector<acc_t> interpolated;
    std::vector<int64_t> x_offsets, rows, row_slots;
    int64_t taps_row = -1, taps_layer = -1, batch_offset = 0;
    bool valid = false;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / block_count;
      const ChannelBlock& block = blocks[item - r * block_count];
      const FeatureMap<scalar_t>& map = maps[block.layer];
      scalar_t* dst = out + (r * channels + first[block.layer] + block.c0) * cells;
      if (r != taps_row || block.layer != taps_layer) {
        int64_t b;
        valid = batch_index<acc_t>(source.boxes[5 * r], map.batch, &b) && source.extents_finite(r);
        if (valid) {
          taps.set(source, r, map);
          x_offsets.resize(taps.along_x.index.size());
          for (size_t k = 0; k < x_offsets.size(); ++k) x_offsets[k] = taps.along_x.index[k] * map.stride_w;
          distinct_indices(taps.along_y, map.height, &rows, &row_slots);
          interpolated.resize(rows.size() * ow);
          batch_offset = b * map.stride_b;
        }
        taps_row = r;
        taps_layer = block.layer;
      }
      if (!valid) {  // an invalid batch index or box: the box samples nothing
        std::fill(dst, dst + (block.c1 - block.c0) * cells, scalar_t(quiet_nan<acc_t>()));
        continue;
      }
      with_two_taps(taps.along_x.taps == 2 && taps.along_y.taps == 2, [&](auto two) {
        const int64_t tx = two ? 2 : taps.along_x.taps, ty = two ? 2 : taps.along_y.taps;
        const acc_t* wx = taps.along_x.weight.data();
        const acc_t* wy = taps.along_y.weight.data();
        scalar_t* to_plane = dst;
        for (int64_t c = block.c0; c < block.c1; ++c, to_plane += cells) {
          const scalar_t* plane = map.data + batch_offset + c * map.stride_c;
          for (size_t s = 0; s < rows.size(); ++s) {
            const scalar_t* line = plane + rows[s] * map.stride_h;
            acc_t* to = interpolated.data() + s * ow;
            for (int64_t j = 0; j < ow; ++j) {
              acc_t value = wx[j * tx] * acc_t(line[x_offsets[j * tx]]);
              for (int64_t t = 1; t < tx; ++t) value += wx[j * tx + t] * acc_t(line[x_offsets[j * tx + t]]);
              to[j] = value;
            }
          }
          for (int64_t i = 0; i < oh; ++i) {
            scalar_t* row = to_plane + i * ow;
            const int64_t* slots = row_slots.data() + i * ty;
            const acc_t* weights = wy + i * ty;
#pragma omp simd
            for (int64_t j = 0; j < ow; ++j) {
              acc_t value = weights[0] * interpolated[slots[0] * ow + j];
              for (int64_t a = 1; a < ty; ++a) value += weights[a] * interpolated[slots[a] * ow + j];
              row[j] = scalar_t(value);
            }
          }
        }
      });
    }
  });
}

// Gradients of every feature map from `grad` (the output's gradient, read at `layout`).
template <typename scalar_t, typename Source>
std::vector<at::Tensor> sample_backward(const at::Tensor& grad, const PointLayout& layout,
                                        at::TensorList features, const Source& source,
                                        at::ArrayRef<double> scale_y,
                                        at::ArrayRef<double> scale_x, int64_t padding) {
  using acc_t = acc_type<scalar_t>;
  std::vector<at::Tensor> grads;
  std::vector<int64_t> layers;
  for (size_t l = 0; l < features.size(); ++l) {
    grads.push_back(at::empty_like(features[l]));  // every element written by one block
    layers.push_back(static_cast<int64_t>(l));
  }
  const std::vector<int64_t> first = first_channels(features);
  const std::vector<ChannelBlock> blocks = channel_blocks(features, layers);
  const scalar_t* grad_data = grad.const_data_ptr<scalar_t>();
  run_items(static_cast<int64_t>(blocks.size()), [&](int64_t item) {
    const ChannelBlock& block = blocks[item];
    const FeatureMap<scalar_t> map =
        feature_map<scalar_t>(features[block.layer], scale_y[block.layer], scale_x[block.layer]);
    const int64_t channels = block.c1 - block.c0;
    std::vector<acc_t> accumulator(map.batch * map.height * map.width * channels, acc_t(0));
    std::vector<acc_t> column(channels);
    std::vector<SampleTaps<acc_t>> groups;
    PointTapper<acc_t> tapper;
    const scalar_t* grad_block =
        grad_data + (first[block.layer] + block.c0) * layout.channel_stride;
    for (int64_t p = 0; p < source.size(); ++p) {
      const ImagePoint<acc_t> point = source(p);
      int64_t b;
      if (!sample_batch(point, map.batch, &b)) continue;  // no gradient from points that sample nothing
      groups.clear();
      tapper.append(source, p, point, map, block.layer, padding, b, map.height * map.width * channels,
                    map.width * channels, channels, &groups);
      const scalar_t* g = grad_block + layout.offset(p);
      for (int64_t c = 0; c < channels; ++c) column[c] = acc_t(g[c * layout.channel_stride]);
      for (const SampleTaps<acc_t>& taps : groups) {
        for (int t = 0; t < 4; ++t) {
          const acc_t weight = taps.weight[t];
          acc_t* to = accumulator.data() + taps.offset[t];
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) to[c] += weight * column[c];
        }
      }
    }
    write_channel_block<scalar_t>(accumulator, grads[block.layer], block.c0, block.c1);
  });
  return grads;
}

at::Tensor sparse_hypercolumn_cpu(at::TensorList features, const at::Tensor& points, at::IntArrayRef image_size,
                                  at::ArrayRef<double> spatial_scale, int64_t padding) {
  const SamplingArguments args = check_sampling(features, c10::DeviceType::CPU, "points", points, 3, image_size,
                                                spatial_scale, padding);
  at::Tensor out = new_output({args.count, args.channels}, features[0].options());
  if (args.count == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "sparse_hypercolumn", [&] {
    using acc_t = acc_type<scalar_t>;
    const PointList<acc_t> source{args.rows.const_data_ptr<acc_t>(), nullptr, args.count};
    sample_forward<scalar_t>(features, source, args.scales.y, args.scales.x, padding, out.data_ptr<scalar_t>(),
                             row_layout(args.channels, 1));
  });
  return out;
}

std::vector<at::Tensor> sparse_hypercolumn_backward_cpu(const at::Tensor& grad, at::TensorList features,
                                                        const at::Tensor& points, at::IntArrayRef image_size,
                                                        at::ArrayRef<double> spatial_scale, int64_t padding) {
  const SamplingArguments args = check_sampling(features, c10::DeviceType::CPU, "points", points, 3, image_size,
                                                spatial_scale, padding);
  check_grad(grad, {args.count, args.channels}, features[0]);
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "sparse_hypercolumn_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const PointList<acc_t> source{args.rows.const_data_ptr<acc_t>(), nullptr, args.count};
    grads = sample_backward<scalar_t>(grad, row_layout(grad.stride(0), grad.stride(1)), features, source,
                                      args.scales.y, args.scales.x, padding);
  });
  return grads;
}

at::Tensor box_hypercolumn_cpu(at::TensorList features, const at::Tensor& boxes, int64_t output_height,
                               int64_t output_width, at::IntArrayRef image_size, at::ArrayRef<double> spatial_scale,
                               int64_t padding, int64_t sampling_ratio, bool aligned) {
  const SamplingArguments args = check_sampling(features, c10::DeviceType::CPU, "boxes", boxes, 5, image_size,
                                                spatial_scale, padding);
  check_output_size(output_height, output_width);
  check_sampling_ratio(sampling_ratio);
  at::Tensor out = new_output({args.count, args.channels, output_height, output_width}, features[0].options());
  if (args.count == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "box_hypercolumn", [&] {
    using acc_t = acc_type<scalar_t>;
    const BoxGrid<acc_t> source{args.rows.const_data_ptr<acc_t>(), args.count, output_height, output_width,
                                BoxSampling{padding, sampling_ratio, aligned}};
    bool all_planar = true;
    for (size_t l = 0; l < features.size(); ++l)
      all_planar = all_planar && planar(feature_map<scalar_t>(features[l], args.scales.y[l], args.scales.x[l]));
    if (all_planar || !source.sampling.single()) {
      box_forward<scalar_t>(features, source, args.scales.y, args.scales.x, out.data_ptr<scalar_t>());
    } else {
      sample_forward<scalar_t>(features, source, args.scales.y, args.scales.x, padding, out.data_ptr<scalar_t>(),
                               grid_layout(out));
    }
  });
  return out;
}

std::vector<at::Tensor> box_hypercolumn_backward_cpu(const at::Tensor& grad, at::TensorList features,
                                                     const at::Tensor& boxes, int64_t output_height,
                                                     int64_t output_width, at::IntArrayRef image_size,
                                                     at::ArrayRef<double> spatial_scale, int64_t padding,
                                                     int64_t sampling_ratio, bool aligned) {
  const SamplingArguments args = check_sampling(features, c10::DeviceType::CPU, "boxes", boxes, 5, image_size,
                                                spatial_scale, padding);
  check_output_size(output_height, output_width);
  check_sampling_ratio(sampling_ratio);
  check_grad(grad, {args.count, args.channels, output_height, output_width}, features[0]);
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "box_hypercolumn_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const BoxGrid<acc_t> source{args.rows.const_data_ptr<acc_t>(), args.count, output_height, output_width,
                                BoxSampling{padding, sampling_ratio, aligned}};
    grads = sample_backward<scalar_t>(grad, grid_layout(grad), features, source, args.scales.y, args.scales.x,
                                      padding);
  });
  return grads;
}

}  // namespace
}  // namespace cpu
}  // namespace hypercolumn_ops

TORCH_LIBRARY_IMPL(hypercolumn_ops, CPU, m) {
  using namespace hypercolumn_ops::cpu;
  m.impl("sparse_hypercolumn", TORCH_FN(sparse_hypercolumn_cpu));
  m.impl("sparse_hypercolumn_backward", TORCH_FN(sparse_hypercolumn_backward_cpu));
  m.impl("box_hypercolumn", TORCH_FN(box_hypercolumn_cpu));
  m.impl("box_hypercolumn_backward", TORCH_FN(box_hypercolumn_backward_cpu));
}
