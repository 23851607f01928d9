// Bilinear sampling on the CPU: a map as the kernels see it, the taps of a point (computed once
// per point and layer, reused for every channel), the separable taps of a box grid's axes, and
// the channel gather.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/points.h"
#include "hypercolumn_math.h"

namespace hypercolumn_ops {
namespace cpu {

// Bytes of channel planes a gather keeps in use at once (half an L2 of this machine's cores).
constexpr int64_t kGatherPlaneBytes = int64_t(1) << 19;

template <typename scalar_t>
struct FeatureMap {
  const scalar_t* data;
  int64_t batch, channels, height, width;
  int64_t stride_b, stride_c, stride_h, stride_w;
  double scale_y, scale_x;
};

template <typename scalar_t>
FeatureMap<scalar_t> feature_map(const at::Tensor& f, double scale_y, double scale_x) {
  return FeatureMap<scalar_t>{f.const_data_ptr<scalar_t>(), f.size(0), f.size(1), f.size(2),
                              f.size(3), f.stride(0), f.stride(1), f.stride(2), f.stride(3),
                              scale_y, scale_x};
}

// The four corners of a bilinear sample as element offsets into some (B, H, W) indexed buffer
// (channel 0), and their weights.
template <typename acc_t>
struct SampleTaps {
  int64_t offset[4];
  acc_t weight[4];
};

// A point samples a map only if its batch index is valid and its coordinates (a box grid's: its
// box's extents) finite; the others get NaN outputs and no gradient.
template <typename acc_t>
bool sample_batch(const ImagePoint<acc_t>& point, int64_t batch, int64_t* b) {
  return batch_index<acc_t>(point.batch_value, batch, b) && point.finite;
}

// Taps of point (x, y) in batch item b of a (height, width) map, as offsets with strides
// (stride_b, stride_h, stride_w).
template <typename acc_t, typename scalar_t>
SampleTaps<acc_t> sample_taps(const FeatureMap<scalar_t>& map, acc_t x, acc_t y, int64_t padding,
                              int64_t b, int64_t stride_b, int64_t stride_h, int64_t stride_w) {
  const BilinearTaps<acc_t> t =
      bilinear_taps<acc_t>(x, y, acc_t(map.scale_y), acc_t(map.scale_x), map.height, map.width,
                           padding);
  const int64_t base = b * stride_b;
  return SampleTaps<acc_t>{{base + t.y0 * stride_h + t.x0 * stride_w,
                            base + t.y0 * stride_h + t.x1 * stride_w,
                            base + t.y1 * stride_h + t.x0 * stride_w,
                            base + t.y1 * stride_h + t.x1 * stride_w},
                           {t.w00, t.w01, t.w10, t.w11}};
}

// One axis of a box grid on one map: per grid line k (a column along x, a row along y) the map
// indices that its cells' samples tap and their weights, the samples' bilinear weights divided
// by their count and summed per index (with the defaults: one sample, two taps). Every line has
// `taps` entries, an even number of at least 2: shorter lists are padded with weight 0 at an index
// they read, so that a grid point's taps are (taps / 2) x (taps / 2) groups of four (BoxTaps).
template <typename acc_t>
struct BoxAxis {
  int64_t taps = 0;
  std::vector<int64_t> index;  // (lines, taps), in [0, size)
  std::vector<acc_t> weight;   // (lines, taps)

  // Grid lines [0, lines) of a box side [start, end] (image pixels) on a map axis of `size`
  // pixels and `scale`.
  void set(acc_t start, acc_t end, double scale, int64_t lines, int64_t size, const BoxSampling& sampling) {
    CellAxis<acc_t> axis =
        cell_axis<acc_t>(start, end, acc_t(scale), 0, lines, sampling.sampling_ratio, sampling.aligned);
    if (axis.count == 1) {  // one sample a line: its two taps, merged where they coincide (as below)
      taps = 2;
      index.resize(lines * 2);
      weight.resize(lines * 2);
      for (int64_t k = 0; k < lines; ++k) {
        axis.cell = k;
        int64_t lo, hi;
        acc_t w_lo, w_hi;
        cell_sample_taps<acc_t>(axis, 0, size, sampling.padding, sampling.aligned, &lo, &hi, &w_lo, &w_hi);
        const bool same = lo == hi;
        index[2 * k] = lo;
        index[2 * k + 1] = hi;
        weight[2 * k] = same ? w_lo + w_hi : w_lo;
        weight[2 * k + 1] = same ? acc_t(0) : w_hi;
      }
      return;
    }
    slot_of_index_.assign(size, -1);
    line_end_.clear();
    merged_index_.clear();
    merged_weight_.clear();
    int64_t longest = 0, line_begin = 0;
    for (int64_t k = 0; k < lines; ++k) {
      axis.cell = k;
      for (int64_t s = 0; s < axis.count; ++s) {
        int64_t lo, hi;
        acc_t w_lo, w_hi;
        cell_sample_taps<acc_t>(axis, s, size, sampling.padding, sampling.aligned, &lo, &hi, &w_lo, &w_hi);
        add(lo, w_lo, line_begin);
        add(hi, w_hi, line_begin);
      }
      const int64_t line_end = static_cast<int64_t>(merged_index_.size());
      for (int64_t e = line_begin; e < line_end; ++e) slot_of_index_[merged_index_[e]] = -1;
      longest = std::max(longest, line_end - line_begin);
      line_end_.push_back(line_end);
      line_begin = line_end;
    }
    taps = std::max<int64_t>(2, (longest + 1) / 2 * 2);
    index.assign(lines * taps, 0);
    weight.assign(lines * taps, acc_t(0));
    for (int64_t k = 0; k < lines; ++k) {
      const int64_t first = k == 0 ? 0 : line_end_[k - 1];
      for (int64_t e = first; e < line_end_[k]; ++e) {
        index[k * taps + e - first] = merged_index_[e];
        weight[k * taps + e - first] = merged_weight_[e];
      }
      for (int64_t e = line_end_[k] - first; e < taps && e > 0; ++e) index[k * taps + e] = index[k * taps];
    }
  }

 private:
  // Adds weight w at map index i to the line whose entries start at line_begin.
  void add(int64_t i, acc_t w, int64_t line_begin) {
    if (slot_of_index_[i] < 0) {
      slot_of_index_[i] = static_cast<int64_t>(merged_index_.size()) - line_begin;
      merged_index_.push_back(i);
      merged_weight_.push_back(w);
    } else {
      merged_weight_[line_begin + slot_of_index_[i]] += w;
    }
  }

  // Scratch of set(), kept between calls.
  std::vector<int64_t> slot_of_index_, line_end_, merged_index_;
  std::vector<acc_t> merged_weight_;
};

// Calls fn(two) with two = std::true_type where every grid line has two taps (the default
// sampling: loops over taps unroll), else with false (loops run to each axis's `taps`).
template <typename Fn>
void with_two_taps(bool two, const Fn& fn) {
  if (two) {
    fn(std::true_type());
  } else {
    fn(false);
  }
}

// The taps of one box's grid points on one map: grid point (i, j) takes the products of grid row
// i's y taps and grid column j's x taps.
template <typename acc_t>
struct BoxTaps {
  BoxAxis<acc_t> along_y, along_x;

  template <typename scalar_t>
  void set(const BoxGrid<acc_t>& grid, int64_t r, const FeatureMap<scalar_t>& map) {
    const acc_t* box = grid.boxes + 5 * r;
    along_y.set(box[2], box[4], map.scale_y, grid.output_height, map.height, grid.sampling);
    along_x.set(box[1], box[3], map.scale_x, grid.output_width, map.width, grid.sampling);
  }

  // Grid point (i, j)'s group of its y taps a, a + 1 and x taps c, c + 1, with offsets
  // base + y * stride_h + x * stride_w.
  SampleTaps<acc_t> group(int64_t i, int64_t j, int64_t a, int64_t c, int64_t base, int64_t stride_h,
                          int64_t stride_w) const {
    const int64_t* ys = along_y.index.data() + i * along_y.taps + a;
    const acc_t* wy = along_y.weight.data() + i * along_y.taps + a;
    const int64_t* xs = along_x.index.data() + j * along_x.taps + c;
    const acc_t* wx = along_x.weight.data() + j * along_x.taps + c;
    const int64_t top = base + ys[0] * stride_h, bottom = base + ys[1] * stride_h;
    const int64_t left = xs[0] * stride_w, right = xs[1] * stride_w;
    return SampleTaps<acc_t>{{top + left, top + right, bottom + left, bottom + right},
                             {wy[0] * wx[0], wy[0] * wx[1], wy[1] * wx[0], wy[1] * wx[1]}};
  }

  // Grid point (i, j)'s taps, as groups of four, appended to *out.
  void groups(int64_t i, int64_t j, int64_t base, int64_t stride_h, int64_t stride_w,
              std::vector<SampleTaps<acc_t>>* out) const {
    for (int64_t a = 0; a < along_y.taps; a += 2)
      for (int64_t c = 0; c < along_x.taps; c += 2) out->push_back(group(i, j, a, c, base, stride_h, stride_w));
  }
};

// The taps of the points of a source on its layers' maps, as groups of four (SampleTaps) whose sum
// is each point's sample: one group for a point of a list (bilinear_taps), (ty / 2) x (tx / 2) for
// a box grid's (BoxTaps, found once per box and layer and kept while the points stay in that box).
// One per thread.
template <typename acc_t>
struct PointTapper {
  int64_t row = -1, layer = -1;
  BoxTaps<acc_t> box;

  // Point p (`point` = source(p), in image b) on layer `l`'s map.
  template <typename scalar_t>
  void append(const PointList<acc_t>& list, int64_t p, const ImagePoint<acc_t>& point, const FeatureMap<scalar_t>& map,
              int64_t l, int64_t padding, int64_t b, int64_t stride_b, int64_t stride_h, int64_t stride_w,
              std::vector<SampleTaps<acc_t>>* out) {
    out->push_back(single(list, p, point, map, l, padding, b, stride_b, stride_h, stride_w));
  }

  template <typename scalar_t>
  void append(const BoxGrid<acc_t>& grid, int64_t p, const ImagePoint<acc_t>&, const FeatureMap<scalar_t>& map,
              int64_t l, int64_t, int64_t b, int64_t stride_b, int64_t stride_h, int64_t stride_w,
              std::vector<SampleTaps<acc_t>>* out) {
    int64_t i, j;
    locate(grid, p, map, l, &i, &j);
    box.groups(i, j, b * stride_b, stride_h, stride_w, out);
  }

  // The one group of point p's taps, where the source's points have one each (one_group()).
  template <typename scalar_t>
  SampleTaps<acc_t> single(const PointList<acc_t>&, int64_t, const ImagePoint<acc_t>& point,
                           const FeatureMap<scalar_t>& map, int64_t, int64_t padding, int64_t b, int64_t stride_b,
                           int64_t stride_h, int64_t stride_w) {
    return sample_taps<acc_t>(map, point.x, point.y, padding, b, stride_b, stride_h, stride_w);
  }

  template <typename scalar_t>
  SampleTaps<acc_t> single(const BoxGrid<acc_t>& grid, int64_t p, const ImagePoint<acc_t>&,
                           const FeatureMap<scalar_t>& map, int64_t l, int64_t, int64_t b, int64_t stride_b,
                           int64_t stride_h, int64_t stride_w) {
    int64_t i, j;
    locate(grid, p, map, l, &i, &j);
    return box.group(i, j, 0, 0, b * stride_b, stride_h, stride_w);
  }

 private:
  // Box grid point p's grid row *i and column *j; `box` holds its box's taps on layer l.
  template <typename scalar_t>
  void locate(const BoxGrid<acc_t>& grid, int64_t p, const FeatureMap<scalar_t>& map, int64_t l, int64_t* i,
              int64_t* j) {
    const int64_t cells = grid.points_per_row(), r = p / cells;
    *i = (p - r * cells) / grid.output_width;
    *j = p - r * cells - *i * grid.output_width;
    if (r != row || l != layer) {
      box.set(grid, r, map);
      row = r;
      layer = l;
    }
  }
};

// The distinct map indices a box grid's axis reads (`indices`, in [0, size)) and, per grid line
// and tap, where its map index is in that list (`slots`, (lines, taps)).
template <typename acc_t>
void distinct_indices(const BoxAxis<acc_t>& axis, int64_t size, std::vector<int64_t>* indices,
                      std::vector<int64_t>* slots) {
  std::vector<int64_t> slot_of_index(size, -1);
  const size_t count = axis.index.size();
  indices->clear();
  slots->resize(count);
  for (size_t k = 0; k < count; ++k) {
    const int64_t index = axis.index[k];
    if (slot_of_index[index] < 0) {
      slot_of_index[index] = static_cast<int64_t>(indices->size());
      indices->push_back(index);
    }
    (*slots)[k] = slot_of_index[index];
  }
}

// Taps of a point that samples nothing: offset 0 (in range of any non-empty map) and NaN weights,
// so branch-free gathers give NaN.
template <typename acc_t>
SampleTaps<acc_t> invalid_taps() {
  const acc_t nan = quiet_nan<acc_t>();
  return SampleTaps<acc_t>{{0, 0, 0, 0}, {nan, nan, nan, nan}};
}

// The taps of a block of points on one map: point i's are groups [first(i), end[i]) of `groups`.
template <typename acc_t>
struct BlockTaps {
  std::vector<SampleTaps<acc_t>> groups;
  std::vector<int64_t> end;

  void clear() {
    groups.clear();
    end.clear();
  }
  // Closes the current point: the groups appended since the previous one are its.
  void close() { end.push_back(static_cast<int64_t>(groups.size())); }
  int64_t first(int64_t i) const { return i == 0 ? 0 : end[i - 1]; }
};

// Bilinear samples of channels [c0, c1) of `map` at `count` points:
// dst[dst_offset[i] + (c - c0) * dst_stride] for point i, the sum of its groups of taps (the first
// written, the others added in order in out_t: several groups only for sampled box grids, which
// gather into accumulation-dtype tiles). Channels are the inner loop, as contiguous runs where the
// map is channels_last; where channels are far apart (NCHW) they go in chunks whose planes fit in
// cache while every point of the block reads them, so each point loads its taps once per chunk
// and writes a run of its channels.
template <typename scalar_t, typename acc_t, typename out_t>
void gather_channels(const FeatureMap<scalar_t>& map, const BlockTaps<acc_t>& taps, const int64_t* dst_offset,
                     int64_t count, int64_t c0, int64_t c1, out_t* dst, int64_t dst_stride) {
  const int64_t channels = c1 - c0;
  if (map.batch == 0) {  // an empty map has no valid point and nothing to read
    for (int64_t i = 0; i < count; ++i)
      for (int64_t c = 0; c < channels; ++c) dst[dst_offset[i] + c * dst_stride] = out_t(quiet_nan<acc_t>());
    return;
  }
  const int64_t sc = map.stride_c;
  const scalar_t* data = map.data + c0 * sc;
  if (sc == 1 && dst_stride == 1) {
    for (int64_t i = 0; i < count; ++i) {
      out_t* out = dst + dst_offset[i];
      for (int64_t g = taps.first(i); g < taps.end[i]; ++g) {
        const SampleTaps<acc_t>& t = taps.groups[g];
        const scalar_t* f0 = data + t.offset[0];
        const scalar_t* f1 = data + t.offset[1];
        const scalar_t* f2 = data + t.offset[2];
        const scalar_t* f3 = data + t.offset[3];
        const auto blend = [&](int64_t c) {
          return t.weight[0] * acc_t(f0[c]) + t.weight[1] * acc_t(f1[c]) + t.weight[2] * acc_t(f2[c]) +
                 t.weight[3] * acc_t(f3[c]);
        };
        if (g == taps.first(i)) {
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) out[c] = out_t(blend(c));
        } else {
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) out[c] = out_t(acc_t(out[c]) + blend(c));
        }
      }
    }
    return;
  }
  const int64_t plane_bytes = std::max<int64_t>(sc, 1) * int64_t(sizeof(scalar_t));
  const int64_t chunk = sc < std::max(map.stride_w, map.stride_h)
                            ? std::max<int64_t>(channels, 1)
                            : std::min<int64_t>(std::max<int64_t>(kGatherPlaneBytes / plane_bytes, 1), 64);
  for (int64_t k0 = 0; k0 < channels; k0 += chunk) {
    const int64_t k1 = std::min(k0 + chunk, channels);
    for (int64_t i = 0; i < count; ++i) {
      out_t* out = dst + dst_offset[i];
      if (taps.end[i] - taps.first(i) == 1) {  // a point: its one group written as it is blended
        const SampleTaps<acc_t>& t = taps.groups[taps.first(i)];
        const acc_t w0 = t.weight[0], w1 = t.weight[1], w2 = t.weight[2], w3 = t.weight[3];
        const int64_t o0 = t.offset[0], o1 = t.offset[1], o2 = t.offset[2], o3 = t.offset[3];
        for (int64_t c = k0; c < k1; ++c) {
          const scalar_t* f = data + c * sc;
          out[c * dst_stride] = out_t(w0 * acc_t(f[o0]) + w1 * acc_t(f[o1]) + w2 * acc_t(f[o2]) + w3 * acc_t(f[o3]));
        }
        continue;
      }
      for (int64_t g = taps.first(i); g < taps.end[i]; ++g) {
        const SampleTaps<acc_t>& t = taps.groups[g];
        const acc_t w0 = t.weight[0], w1 = t.weight[1], w2 = t.weight[2], w3 = t.weight[3];
        const int64_t o0 = t.offset[0], o1 = t.offset[1], o2 = t.offset[2], o3 = t.offset[3];
        const bool first = g == taps.first(i);
        for (int64_t c = k0; c < k1; ++c) {
          const scalar_t* f = data + c * sc;
          const acc_t value = w0 * acc_t(f[o0]) + w1 * acc_t(f[o1]) + w2 * acc_t(f[o2]) + w3 * acc_t(f[o3]);
          out[c * dst_stride] = out_t(first ? value : acc_t(out[c * dst_stride]) + value);
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace hypercolumn_ops
