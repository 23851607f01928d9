"""The ``@triton.jit`` kernels of the Triton backend.

Every kernel works on a tile of points times a block of channels (or of outputs ``M``); program
ids are widened to int64 before any offset is formed, every load is masked, and sums run in the
accumulation dtype ``ACC`` (float64 for float64 features, float32 otherwise). Feature maps are
read through their strides, so contiguous, channels_last and strided maps need no copy; with
channels_last the channel block of a tap is one contiguous run.

Forward: ``sample_features_kernel`` (sparse and box hypercolumns); ``cell_scores_kernel`` adds one
layer's scores of the <= 4 classifier cells of every point to a ``(P, 4, M)`` buffer, then
``blend_cells_kernel`` adds the bias, applies the activation, blends the cells and writes each
output once. With ``sampling_ratio != 1`` or ``aligned=False`` (``SAMPLED``) a box's output cell
averages its ``ny x nx`` samples: both forward kernels loop over them, to the largest counts in
their block of points, and hold no more than the one sample of a block of channels at a time.

Backward: ``tap_entries_kernel`` records the taps of every point of a layer (address key and
weight), four per sample, ``S`` samples a point (1 unsampled, ``sampling_ratio ** 2``, or the
largest ``ny * nx`` of adaptive sampling, from ``sample_counts_kernel``); the gradients are then
scattered to the taps either with atomics
(``scatter_taps_atomic_kernel``, ``scatter_cell_grads_atomic_kernel``) or, when deterministic
algorithms are requested, gathered per destination pixel from the entries sorted by key
(``scatter_segments_kernel``: one program owns a pixel and a channel block, in a fixed order).
``weight_grad_segments_kernel`` reduces the weight gradient of sample-features layers per
classifier cell the same way.
"""

import triton
import triton.language as tl

from .. import _codes
from .hypercolumn_math import (ACTIVATION_SIGMOID, bilinear_taps, box_geometry, box_grid_point, box_sample_counts,
                               box_sample_taps, is_finite, location_weights, point_geometry, sigmoid)

# What a scatter writes to a feature-shaped gradient.
SAMPLE_GRADS = tl.constexpr(0)  # rows of the gradient of sparse / box hypercolumns
FEATURE_GRADS = tl.constexpr(1)  # sum over cells and outputs of cell gradient x classifier weight
SCORE_MAP_GRADS = tl.constexpr(2)  # cell gradients into the channels of projected score maps

ORDER_SAMPLE_FEATURES = tl.constexpr(_codes.ORDER_SAMPLE_FEATURES)


@triton.jit
def bilinear_sample(source_ptr, point_offsets, channel_offsets, y0, y1, x0, x1, w00, w01, w10, w11, stride_h,
                    stride_w, mask, ACC: tl.constexpr):
    """Blend of the four taps of every point: ``[points, channels]`` in ``ACC``.

    ``point_offsets`` ``[P]`` (batch offset), ``channel_offsets`` ``[P or 1, X]`` (channel times
    its stride), taps ``[P]``; masked-off elements read nothing and give 0.
    """
    base = point_offsets[:, None] + channel_offsets
    v00 = tl.load(source_ptr + base + (y0 * stride_h + x0 * stride_w)[:, None], mask=mask, other=0.0).to(ACC)
    v01 = tl.load(source_ptr + base + (y0 * stride_h + x1 * stride_w)[:, None], mask=mask, other=0.0).to(ACC)
    v10 = tl.load(source_ptr + base + (y1 * stride_h + x0 * stride_w)[:, None], mask=mask, other=0.0).to(ACC)
    v11 = tl.load(source_ptr + base + (y1 * stride_h + x1 * stride_w)[:, None], mask=mask, other=0.0).to(ACC)
    return w00[:, None] * v00 + w01[:, None] * v01 + w10[:, None] * v10 + w11[:, None] * v11


@triton.jit
def tap_address(key, height, width, stride_b, stride_h, stride_w):
    """Key ``(b * H + y) * W + x`` of a tap -> its offset in a ``(B, C, H, W)`` map (channel 0)."""
    x = key % width
    rest = key // width
    return (rest // height) * stride_b + (rest % height) * stride_h + x * stride_w


@triton.jit
def grid_offsets(offs_p, cells_per_box, output_width, stride_row, stride_i, stride_j):
    """Offset of point ``p`` in an output ``(rows, ..., oh, ow)`` (box form) or ``(rows, ...)``
    (point form: ``cells_per_box = output_width = 1``, ``stride_i = stride_j = 0``)."""
    row = offs_p // cells_per_box
    cell = offs_p % cells_per_box
    return row * stride_row + (cell // output_width) * stride_i + (cell % output_width) * stride_j


@triton.jit
def point_labels(labels_ptr, row, valid, num_classes, HAS_LABELS: tl.constexpr):
    """Label of every point's row (0 without labels) and validity: a label outside
    ``[0, NC)`` invalidates the point, and is clamped into range so no address goes astray."""
    if HAS_LABELS:
        label = tl.load(labels_ptr + row, mask=valid, other=0)
        valid = valid & (label >= 0) & (label < num_classes)
        # Clamped rather than selected with `valid`: Triton 3.6 cannot compile a label that
        # depends on `valid` in cell_scores_kernel for sm_90 (TritonGPURemoveLayoutConversions
        # gives `valid` two layouts), and every use of an invalid point's label is masked anyway.
        label = tl.minimum(tl.maximum(label, 0), num_classes - 1)
    else:
        label = tl.zeros(row.shape, tl.int64)
    return label, valid


# ----------------------------------------------------------------------------- forward


@triton.jit
def sample_features_kernel(feature_ptr, stride_b, stride_c, stride_h, stride_w, batch, channels, height, width,
                           coords_ptr, scales_ptr, num_points, cells_per_box, output_height, output_width,
                           sampling_ratio, out_ptr, out_stride_row, out_stride_i, out_stride_j, out_stride_c,
                           ACC: tl.constexpr, IS_BOX: tl.constexpr, SAMPLED: tl.constexpr, ALIGNED: tl.constexpr,
                           PADDING: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Hypercolumn rows of one layer: ``out[p, c] = bilinear sample of channel c at point p``;
    NaN rows for invalid points. ``SAMPLED`` (box form): each output cell averages its
    ``ny x nx`` samples (``sampling_ratio``, ``ALIGNED``), in loops to the block's largest
    counts."""
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < num_points
    mask_c = offs_c < channels
    scale_y = tl.load(scales_ptr).to(ACC)
    scale_x = tl.load(scales_ptr + 1).to(ACC)
    channel_offsets = (offs_c * stride_c)[None, :]
    if SAMPLED:
        _, b, valid, i, j, x1, y1, x2, y2 = box_geometry(coords_ptr, offs_p, mask_p, cells_per_box, output_width,
                                                         batch, ACC)
        ny, nx = box_sample_counts(x1, y1, x2, y2, valid, scale_y, scale_x, output_height, output_width,
                                   sampling_ratio, ALIGNED)
        value = tl.zeros([BLOCK_P, BLOCK_C], ACC)
        for sample_y in range(0, tl.max(ny, 0)):
            for sample_x in range(0, tl.max(nx, 0)):
                top, bottom, left, right, w00, w01, w10, w11, taken = box_sample_taps(
                    x1, y1, x2, y2, i, j, sample_y, sample_x, ny, nx, scale_y, scale_x, height, width, output_height,
                    output_width, PADDING, ALIGNED)
                value += bilinear_sample(feature_ptr, b * stride_b, channel_offsets, top, bottom, left, right, w00,
                                         w01, w10, w11, stride_h, stride_w, (valid & taken)[:, None] & mask_c[None, :],
                                         ACC)
    else:
        _, b, valid, x, y, _, _ = point_geometry(coords_ptr, coords_ptr, offs_p, mask_p, cells_per_box,
                                                 output_height, output_width, batch, ACC, IS_BOX, False)
        y0, y1, x0, x1, w00, w01, w10, w11 = bilinear_taps(x, y, scale_y, scale_x, height, width, PADDING)
        value = bilinear_sample(feature_ptr, b * stride_b, channel_offsets, y0, y1, x0, x1, w00, w01, w10, w11,
                                stride_h, stride_w, valid[:, None] & mask_c[None, :], ACC)
    value = tl.where(valid[:, None], value, float("nan"))
    out = grid_offsets(offs_p, cells_per_box, output_width, out_stride_row, out_stride_i, out_stride_j)
    tl.store(out_ptr + out[:, None] + (offs_c * out_stride_c)[None, :], value.to(out_ptr.dtype.element_ty),
             mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def cell_weight_dot(weight_ptr, cell_offsets, weight_offsets, sample, mask, ACC: tl.constexpr):
    """``[P, M]`` dot products of sampled channels ``[P, C]`` with the classifier rows of each
    point's cell (``cell_offsets`` ``[P]``, ``weight_offsets`` ``[1, M, C]``)."""
    weight = tl.load(weight_ptr + cell_offsets[:, None, None] + weight_offsets, mask=mask, other=0.0).to(ACC)
    return tl.sum(sample[:, None, :] * weight, axis=2)


@triton.jit
def accumulate_cell_scores(scores_ptr, offs_p, cell, offs_m, num_outputs, value, mask):
    pointer = scores_ptr + (offs_p * 4 + cell)[:, None] * num_outputs + offs_m[None, :]
    tl.store(pointer, tl.load(pointer, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def cell_scores_kernel(source_ptr, stride_b, stride_c, stride_h, stride_w, channels, height, width,
                       weight_ptr, weight_stride_nc, weight_stride_k, weight_stride_m, weight_stride_c,
                       coords_ptr, locations_ptr, labels_ptr, scales_ptr, num_points, cells_per_box, output_height,
                       output_width, batch, sampling_ratio, grid, num_classes, num_outputs, scores_ptr,
                       ACC: tl.constexpr, ORDER: tl.constexpr, IS_BOX: tl.constexpr, SAMPLED: tl.constexpr,
                       ALIGNED: tl.constexpr, PADDING: tl.constexpr, HAS_LOCATIONS: tl.constexpr,
                       HAS_LABELS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """Adds one layer's scores of the <= 4 cells of every point to ``scores (P, 4, M)``.

    ``ORDER`` 0: sample the feature map ``source`` block of channels by block and take dot
    products with the cells' classifier rows. ``ORDER`` 1: ``source`` is the projected score map
    ``(B, NC * KK * M, H, W)``; sample its channels ``(label * KK + cell) * M + m``. ``SAMPLED``
    (box form): a point's sample is the average of its output cell's ``ny x nx`` samples, in loops
    to the block's largest counts (inside each channel block: only a block's worth is held).
    """
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_p = offs_p < num_points
    mask_m = offs_m < num_outputs
    scale_y = tl.load(scales_ptr).to(ACC)
    scale_x = tl.load(scales_ptr + 1).to(ACC)
    if SAMPLED:
        row, b, valid, i, j, box_x1, box_y1, box_x2, box_y2 = box_geometry(coords_ptr, offs_p, mask_p, cells_per_box,
                                                                           output_width, batch, ACC)
        _, _, u, v = box_grid_point(box_x1, box_y1, box_x2, box_y2, i, j, output_height, output_width)
    else:
        row, b, valid, x, y, u, v = point_geometry(coords_ptr, locations_ptr, offs_p, mask_p, cells_per_box,
                                                   output_height, output_width, batch, ACC, IS_BOX, HAS_LOCATIONS)
    label, valid = point_labels(labels_ptr, row, valid, num_classes, HAS_LABELS)
    cell0, cell1, cell2, cell3, _, _, _, _ = location_weights(u, v, grid)
    if SAMPLED:
        ny, nx = box_sample_counts(box_x1, box_y1, box_x2, box_y2, valid, scale_y, scale_x, output_height,
                                   output_width, sampling_ratio, ALIGNED)
    else:
        y0, y1, x0, x1, w00, w01, w10, w11 = bilinear_taps(x, y, scale_y, scale_x, height, width, PADDING)
    mask_pm = valid[:, None] & mask_m[None, :]
    point_offsets = b * stride_b
    if ORDER == ORDER_SAMPLE_FEATURES:
        score0 = tl.zeros([BLOCK_P, BLOCK_M], ACC)
        score1 = tl.zeros([BLOCK_P, BLOCK_M], ACC)
        score2 = tl.zeros([BLOCK_P, BLOCK_M], ACC)
        score3 = tl.zeros([BLOCK_P, BLOCK_M], ACC)
        class_offset = label * weight_stride_nc
        for start in range(0, channels, BLOCK_C):
            offs_c = start + tl.arange(0, BLOCK_C)
            mask_c = offs_c < channels
            channel_offsets = (offs_c * stride_c)[None, :]
            if SAMPLED:
                sample = tl.zeros([BLOCK_P, BLOCK_C], ACC)
                for sample_y in range(0, tl.max(ny, 0)):
                    for sample_x in range(0, tl.max(nx, 0)):
                        top, bottom, left, right, v00, v01, v10, v11, taken = box_sample_taps(
                            box_x1, box_y1, box_x2, box_y2, i, j, sample_y, sample_x, ny, nx, scale_y, scale_x,
                            height, width, output_height, output_width, PADDING, ALIGNED)
                        sample += bilinear_sample(source_ptr, point_offsets, channel_offsets, top, bottom, left,
                                                  right, v00, v01, v10, v11, stride_h, stride_w,
                                                  (valid & taken)[:, None] & mask_c[None, :], ACC)
            else:
                sample = bilinear_sample(source_ptr, point_offsets, channel_offsets, y0, y1, x0, x1, w00, w01, w10,
                                         w11, stride_h, stride_w, valid[:, None] & mask_c[None, :], ACC)
            weight_offsets = (offs_m * weight_stride_m)[None, :, None] + (offs_c * weight_stride_c)[None, None, :]
            mask = mask_pm[:, :, None] & mask_c[None, None, :]
            score0 += cell_weight_dot(weight_ptr, class_offset + cell0 * weight_stride_k, weight_offsets, sample,
                                      mask, ACC)
            score1 += cell_weight_dot(weight_ptr, class_offset + cell1 * weight_stride_k, weight_offsets, sample,
                                      mask, ACC)
            score2 += cell_weight_dot(weight_ptr, class_offset + cell2 * weight_stride_k, weight_offsets, sample,
                                      mask, ACC)
            score3 += cell_weight_dot(weight_ptr, class_offset + cell3 * weight_stride_k, weight_offsets, sample,
                                      mask, ACC)
    else:
        first = label * grid * grid
        output_offsets = (offs_m * stride_c)[None, :]
        channels0 = ((first + cell0) * num_outputs)[:, None] * stride_c + output_offsets
        channels1 = ((first + cell1) * num_outputs)[:, None] * stride_c + output_offsets
        channels2 = ((first + cell2) * num_outputs)[:, None] * stride_c + output_offsets
        channels3 = ((first + cell3) * num_outputs)[:, None] * stride_c + output_offsets
        if SAMPLED:
            score0 = tl.zeros([BLOCK_P, BLOCK_M], ACC)
            score1 = tl.zeros([BLOCK_P, BLOCK_M], ACC)
            score2 = tl.zeros([BLOCK_P, BLOCK_M], ACC)
            score3 = tl.zeros([BLOCK_P, BLOCK_M], ACC)
            for sample_y in range(0, tl.max(ny, 0)):
                for sample_x in range(0, tl.max(nx, 0)):
                    top, bottom, left, right, v00, v01, v10, v11, taken = box_sample_taps(
                        box_x1, box_y1, box_x2, box_y2, i, j, sample_y, sample_x, ny, nx, scale_y, scale_x, height,
                        width, output_height, output_width, PADDING, ALIGNED)
                    mask = mask_pm & taken[:, None]
                    score0 += bilinear_sample(source_ptr, point_offsets, channels0, top, bottom, left, right, v00,
                                              v01, v10, v11, stride_h, stride_w, mask, ACC)
                    score1 += bilinear_sample(source_ptr, point_offsets, channels1, top, bottom, left, right, v00,
                                              v01, v10, v11, stride_h, stride_w, mask, ACC)
                    score2 += bilinear_sample(source_ptr, point_offsets, channels2, top, bottom, left, right, v00,
                                              v01, v10, v11, stride_h, stride_w, mask, ACC)
                    score3 += bilinear_sample(source_ptr, point_offsets, channels3, top, bottom, left, right, v00,
                                              v01, v10, v11, stride_h, stride_w, mask, ACC)
        else:
            score0 = bilinear_sample(source_ptr, point_offsets, channels0, y0, y1, x0, x1, w00, w01, w10, w11,
                                     stride_h, stride_w, mask_pm, ACC)
            score1 = bilinear_sample(source_ptr, point_offsets, channels1, y0, y1, x0, x1, w00, w01, w10, w11,
                                     stride_h, stride_w, mask_pm, ACC)
            score2 = bilinear_sample(source_ptr, point_offsets, channels2, y0, y1, x0, x1, w00, w01, w10, w11,
                                     stride_h, stride_w, mask_pm, ACC)
            score3 = bilinear_sample(source_ptr, point_offsets, channels3, y0, y1, x0, x1, w00, w01, w10, w11,
                                     stride_h, stride_w, mask_pm, ACC)
    mask = mask_p[:, None] & mask_m[None, :]
    accumulate_cell_scores(scores_ptr, offs_p, 0, offs_m, num_outputs, score0, mask)
    accumulate_cell_scores(scores_ptr, offs_p, 1, offs_m, num_outputs, score1, mask)
    accumulate_cell_scores(scores_ptr, offs_p, 2, offs_m, num_outputs, score2, mask)
    accumulate_cell_scores(scores_ptr, offs_p, 3, offs_m, num_outputs, score3, mask)


@triton.jit
def cell_activation(scores_ptr, bias_ptr, bias_offsets, offs_p, cell, offs_m, num_outputs, mask,
                    ACC: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """Score of one cell plus its bias row -> (activated score, its derivative)."""
    score = tl.load(scores_ptr + (offs_p * 4 + cell)[:, None] * num_outputs + offs_m[None, :], mask=mask,
                    other=0.0).to(ACC)
    if HAS_BIAS:
        score += tl.load(bias_ptr + bias_offsets, mask=mask, other=0.0).to(ACC)
    if ACTIVATION == ACTIVATION_SIGMOID:
        score = sigmoid(score)
        slope = score * (1.0 - score)
    else:
        slope = tl.full(score.shape, 1.0, ACC)
    return score, slope


@triton.jit
def store_cell_grad(scores_ptr, cell_keys_ptr, offs_p, cell, offs_m, num_outputs, grad, alpha, slope, label,
                    cell_index, grid, cell_sentinel, ok, mask, write_keys):
    """Gradient of the score of one cell (over ``scores``, in place) and its key
    ``label * KK + cell`` (``cell_sentinel`` where the point takes no gradient)."""
    value = tl.where(ok[:, None], grad * alpha[:, None] * slope, 0.0)
    tl.store(scores_ptr + (offs_p * 4 + cell)[:, None] * num_outputs + offs_m[None, :], value, mask=mask)
    key = tl.where(ok, label * grid * grid + cell_index, cell_sentinel)
    tl.store(cell_keys_ptr + offs_p * 4 + cell, key, mask=write_keys)


@triton.jit
def blend_cells_kernel(scores_ptr, bias_ptr, bias_stride_row, bias_stride_k, bias_stride_m, labels_ptr, coords_ptr,
                       locations_ptr, num_points, cells_per_box, output_height, output_width, batch, grid,
                       num_classes, num_outputs, out_ptr, out_stride_row, out_stride_i, out_stride_j, out_stride_m,
                       cell_keys_ptr, ACC: tl.constexpr, GRADIENTS: tl.constexpr, IS_BOX: tl.constexpr,
                       HAS_LOCATIONS: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       ACTIVATION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """Forward (``GRADIENTS`` False): ``out(p) = sum_k alpha_k(p) * act(scores_k(p) + bias_k)``,
    NaN for invalid points, each output written once.

    Backward (``GRADIENTS`` True): ``out`` is the output's gradient; overwrites ``scores`` with the
    gradient of each cell's score, ``grad * alpha_k * act'``, and writes the cell keys
    ``(P, 4)`` (``label * KK + cell``, or ``NC * KK`` for points that take no gradient).
    """
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_p = offs_p < num_points
    mask_m = offs_m < num_outputs
    mask = mask_p[:, None] & mask_m[None, :]
    row, b, valid, x, y, u, v = point_geometry(coords_ptr, locations_ptr, offs_p, mask_p, cells_per_box,
                                               output_height, output_width, batch, ACC, IS_BOX, HAS_LOCATIONS)
    label, valid = point_labels(labels_ptr, row, valid, num_classes, HAS_LABELS)
    cell0, cell1, cell2, cell3, alpha0, alpha1, alpha2, alpha3 = location_weights(u, v, grid)
    bias_row = row * bias_stride_row
    bias_m = offs_m * bias_stride_m
    score0, slope0 = cell_activation(scores_ptr, bias_ptr, (bias_row + cell0 * bias_stride_k)[:, None] + bias_m,
                                     offs_p, 0, offs_m, num_outputs, mask, ACC, HAS_BIAS, ACTIVATION)
    score1, slope1 = cell_activation(scores_ptr, bias_ptr, (bias_row + cell1 * bias_stride_k)[:, None] + bias_m,
                                     offs_p, 1, offs_m, num_outputs, mask, ACC, HAS_BIAS, ACTIVATION)
    score2, slope2 = cell_activation(scores_ptr, bias_ptr, (bias_row + cell2 * bias_stride_k)[:, None] + bias_m,
                                     offs_p, 2, offs_m, num_outputs, mask, ACC, HAS_BIAS, ACTIVATION)
    score3, slope3 = cell_activation(scores_ptr, bias_ptr, (bias_row + cell3 * bias_stride_k)[:, None] + bias_m,
                                     offs_p, 3, offs_m, num_outputs, mask, ACC, HAS_BIAS, ACTIVATION)
    out_offsets = grid_offsets(offs_p, cells_per_box, output_width, out_stride_row, out_stride_i,
                               out_stride_j)[:, None] + (offs_m * out_stride_m)[None, :]
    if GRADIENTS:
        grad = tl.load(out_ptr + out_offsets, mask=mask, other=0.0).to(ACC)
        ok = valid & is_finite(u) & is_finite(v)
        cell_sentinel = num_classes * grid * grid
        # Every M block computes the same keys; the first one writes them.
        write_keys = mask_p & (tl.program_id(1) == 0)
        store_cell_grad(scores_ptr, cell_keys_ptr, offs_p, 0, offs_m, num_outputs, grad, alpha0, slope0, label, cell0,
                        grid, cell_sentinel, ok, mask, write_keys)
        store_cell_grad(scores_ptr, cell_keys_ptr, offs_p, 1, offs_m, num_outputs, grad, alpha1, slope1, label, cell1,
                        grid, cell_sentinel, ok, mask, write_keys)
        store_cell_grad(scores_ptr, cell_keys_ptr, offs_p, 2, offs_m, num_outputs, grad, alpha2, slope2, label, cell2,
                        grid, cell_sentinel, ok, mask, write_keys)
        store_cell_grad(scores_ptr, cell_keys_ptr, offs_p, 3, offs_m, num_outputs, grad, alpha3, slope3, label, cell3,
                        grid, cell_sentinel, ok, mask, write_keys)
    else:
        out = (alpha0[:, None] * score0 + alpha1[:, None] * score1 + alpha2[:, None] * score2
               + alpha3[:, None] * score3)
        out = tl.where(valid[:, None], out, float("nan"))
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- backward


@triton.jit
def store_taps(keys_ptr, tap_weights_ptr, entries, keep, mask_p, b, height, width, sentinel, y0, y1, x0, x1, w00,
               w01, w10, w11):
    """Writes four tap entries from ``entries``: keys ``(b * H + y) * W + x`` and weights, or
    the ``sentinel`` key and weight 0 where not ``keep``."""
    top = (b * height + y0) * width
    bottom = (b * height + y1) * width
    tl.store(keys_ptr + entries, tl.where(keep, top + x0, sentinel), mask=mask_p)
    tl.store(keys_ptr + entries + 1, tl.where(keep, top + x1, sentinel), mask=mask_p)
    tl.store(keys_ptr + entries + 2, tl.where(keep, bottom + x0, sentinel), mask=mask_p)
    tl.store(keys_ptr + entries + 3, tl.where(keep, bottom + x1, sentinel), mask=mask_p)
    tl.store(tap_weights_ptr + entries, tl.where(keep, w00, 0.0), mask=mask_p)
    tl.store(tap_weights_ptr + entries + 1, tl.where(keep, w01, 0.0), mask=mask_p)
    tl.store(tap_weights_ptr + entries + 2, tl.where(keep, w10, 0.0), mask=mask_p)
    tl.store(tap_weights_ptr + entries + 3, tl.where(keep, w11, 0.0), mask=mask_p)


@triton.jit
def tap_entries_kernel(coords_ptr, labels_ptr, scales_ptr, num_points, cells_per_box, output_height, output_width,
                       batch, height, width, sampling_ratio, samples, num_classes, keys_ptr, tap_weights_ptr,
                       ACC: tl.constexpr, IS_BOX: tl.constexpr, SAMPLED: tl.constexpr, ALIGNED: tl.constexpr,
                       PADDING: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK_P: tl.constexpr):
    """The taps of every point on one layer, four per sample, ``samples`` (``S``) samples a point:
    ``keys[(p * S + s) * 4 + t] = (b * H + y) * W + x`` and their weights (with ``SAMPLED``,
    sample ``s`` of an output cell is ``(s // nx, s % nx)``, weighted by its share
    ``1 / (ny * nx)``); invalid points and samples past a cell's ``ny * nx`` get the key
    ``B * H * W`` (past every pixel) and weight 0."""
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < num_points
    scale_y = tl.load(scales_ptr).to(ACC)
    scale_x = tl.load(scales_ptr + 1).to(ACC)
    if SAMPLED:
        row, b, valid, i, j, box_x1, box_y1, box_x2, box_y2 = box_geometry(coords_ptr, offs_p, mask_p, cells_per_box,
                                                                           output_width, batch, ACC)
    else:
        row, b, valid, x, y, _, _ = point_geometry(coords_ptr, coords_ptr, offs_p, mask_p, cells_per_box,
                                                   output_height, output_width, batch, ACC, IS_BOX, False)
    _, valid = point_labels(labels_ptr, row, valid, num_classes, HAS_LABELS)
    sentinel = (tl.zeros_like(b) + batch) * height * width
    if SAMPLED:
        ny, nx = box_sample_counts(box_x1, box_y1, box_x2, box_y2, valid, scale_y, scale_x, output_height,
                                   output_width, sampling_ratio, ALIGNED)
        per_row = tl.maximum(nx, 1)
        for sample in range(0, samples):
            y0, y1, x0, x1, w00, w01, w10, w11, taken = box_sample_taps(
                box_x1, box_y1, box_x2, box_y2, i, j, sample // per_row, sample % per_row, ny, nx, scale_y, scale_x,
                height, width, output_height, output_width, PADDING, ALIGNED)
            store_taps(keys_ptr, tap_weights_ptr, (offs_p * samples + sample) * 4, valid & taken, mask_p, b, height,
                       width, sentinel, y0, y1, x0, x1, w00, w01, w10, w11)
    else:
        y0, y1, x0, x1, w00, w01, w10, w11 = bilinear_taps(x, y, scale_y, scale_x, height, width, PADDING)
        store_taps(keys_ptr, tap_weights_ptr, offs_p * 4, valid, mask_p, b, height, width, sentinel, y0, y1, x0, x1,
                   w00, w01, w10, w11)


@triton.jit
def sample_counts_kernel(coords_ptr, scales_ptr, rows, batch, output_height, output_width, sampling_ratio,
                         counts_ptr, ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_P: tl.constexpr):
    """``counts[layer, row] = ny * nx``, the samples of each output cell of every box on each
    layer (program axis 1; ``scales`` holds ``(sy, sx)`` per layer), 0 for invalid boxes: what
    :func:`tap_entries_kernel` computes, so that the entries it is given have room for them."""
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    layer = tl.program_id(1).to(tl.int64)
    mask_p = offs_p < rows
    scale_y = tl.load(scales_ptr + 2 * layer).to(ACC)
    scale_x = tl.load(scales_ptr + 2 * layer + 1).to(ACC)
    _, _, valid, _, _, x1, y1, x2, y2 = box_geometry(coords_ptr, offs_p, mask_p, 1, 1, batch, ACC)
    ny, nx = box_sample_counts(x1, y1, x2, y2, valid, scale_y, scale_x, output_height, output_width, sampling_ratio,
                               ALIGNED)
    tl.store(counts_ptr + layer * rows + offs_p, ny * nx, mask=mask_p)


@triton.jit
def point_channel_grads(offs_p, offs_c, mask_p, mask_c, grad_ptr, grad_stride_row, grad_stride_i, grad_stride_j,
                        grad_stride_c, cells_per_box, output_width, cell_grads_ptr, cell_keys_ptr, weight_ptr,
                        weight_stride_nc, weight_stride_k, weight_stride_m, weight_stride_c, cells, cell_sentinel,
                        num_outputs, ACC: tl.constexpr, MODE: tl.constexpr):
    """``[P, C]`` gradient of each point's (unweighted) sample of channels ``offs_c``.

    ``SAMPLE_GRADS``: the point's row of the output gradient. ``FEATURE_GRADS``:
    ``sum_{cell, m} grad_cell[p, m] * W[label, cell, m, c]``. ``SCORE_MAP_GRADS``: channel
    ``q = (label * KK + cell) * M + m`` of the score map takes ``grad_cell[p, m]``.
    """
    mask = mask_p[:, None] & mask_c[None, :]
    if MODE == SAMPLE_GRADS:
        rows = grid_offsets(offs_p, cells_per_box, output_width, grad_stride_row, grad_stride_i, grad_stride_j)
        value = tl.load(grad_ptr + rows[:, None] + (offs_c * grad_stride_c)[None, :], mask=mask,
                        other=0.0).to(ACC)
    else:
        value = tl.zeros([offs_p.shape[0], offs_c.shape[0]], ACC)
        for cell in tl.static_range(4):
            key = tl.load(cell_keys_ptr + offs_p * 4 + cell, mask=mask_p, other=cell_sentinel)
            hit = mask_p & (key < cell_sentinel)
            grads = cell_grads_ptr + (offs_p * 4 + cell) * num_outputs
            if MODE == FEATURE_GRADS:
                rows = (key // cells) * weight_stride_nc + (key % cells) * weight_stride_k
                for m in range(num_outputs):
                    grad = tl.load(grads + m, mask=hit, other=0.0)
                    weight = tl.load(weight_ptr + (rows + m * weight_stride_m)[:, None]
                                     + (offs_c * weight_stride_c)[None, :], mask=hit[:, None] & mask_c[None, :],
                                     other=0.0).to(ACC)
                    value += grad[:, None] * weight
            else:
                m = offs_c[None, :] - (key * num_outputs)[:, None]
                take = hit[:, None] & mask_c[None, :] & (m >= 0) & (m < num_outputs)
                value += tl.load(grads[:, None] + m, mask=take, other=0.0)
    return value


@triton.jit
def scatter_taps_atomic_kernel(keys_ptr, tap_weights_ptr, num_points, samples, tap_sentinel, target_ptr,
                               target_stride_b,
                               target_stride_c, target_stride_h, target_stride_w, channels, height, width,
                               grad_ptr, grad_stride_row, grad_stride_i, grad_stride_j, grad_stride_c,
                               cells_per_box, output_width, cell_grads_ptr, cell_keys_ptr, weight_ptr,
                               weight_stride_nc, weight_stride_k, weight_stride_m, weight_stride_c, cells,
                               cell_sentinel, num_outputs, ACC: tl.constexpr, MODE: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Adds ``tap weight x point_channel_grads`` to the taps of every point, four per sample
    (``samples`` a point, see :func:`tap_entries_kernel`), with atomics."""
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < num_points
    mask_c = offs_c < channels
    value = point_channel_grads(offs_p, offs_c, mask_p, mask_c, grad_ptr, grad_stride_row, grad_stride_i,
                                grad_stride_j, grad_stride_c, cells_per_box, output_width, cell_grads_ptr,
                                cell_keys_ptr, weight_ptr, weight_stride_nc, weight_stride_k, weight_stride_m,
                                weight_stride_c, cells, cell_sentinel, num_outputs, ACC, MODE)
    channel_offsets = (offs_c * target_stride_c)[None, :]
    for sample in range(0, samples):
        entries = (offs_p * samples + sample) * 4
        for tap in tl.static_range(4):
            key = tl.load(keys_ptr + entries + tap, mask=mask_p, other=tap_sentinel)
            weight = tl.load(tap_weights_ptr + entries + tap, mask=mask_p, other=0.0)
            hit = mask_p & (key < tap_sentinel)
            address = tap_address(key, height, width, target_stride_b, target_stride_h, target_stride_w)
            tl.atomic_add(target_ptr + address[:, None] + channel_offsets, weight[:, None] * value,
                          mask=hit[:, None] & mask_c[None, :])


@triton.jit
def scatter_cell_grads_atomic_kernel(keys_ptr, tap_weights_ptr, num_points, samples, tap_sentinel, target_ptr,
                                     target_stride_b, target_stride_c, target_stride_h, target_stride_w, height,
                                     width, cell_grads_ptr, cell_keys_ptr, cell_sentinel, num_outputs,
                                     BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """Adds each cell's score gradient to the taps (four per sample) of its score-map channel
    ``(label * KK + cell) * M + m`` (atomics): only the <= 4 M channels a point touches."""
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_p = offs_p < num_points
    mask_m = offs_m < num_outputs
    for cell in tl.static_range(4):
        cell_key = tl.load(cell_keys_ptr + offs_p * 4 + cell, mask=mask_p, other=cell_sentinel)
        hit_cell = mask_p & (cell_key < cell_sentinel)
        grad = tl.load(cell_grads_ptr + ((offs_p * 4 + cell) * num_outputs)[:, None] + offs_m[None, :],
                       mask=hit_cell[:, None] & mask_m[None, :], other=0.0)
        channel_offsets = (cell_key * num_outputs)[:, None] * target_stride_c + (offs_m * target_stride_c)[None, :]
        for sample in range(0, samples):
            entries = (offs_p * samples + sample) * 4
            for tap in tl.static_range(4):
                key = tl.load(keys_ptr + entries + tap, mask=mask_p, other=tap_sentinel)
                weight = tl.load(tap_weights_ptr + entries + tap, mask=mask_p, other=0.0)
                hit = hit_cell & (key < tap_sentinel)
                address = tap_address(key, height, width, target_stride_b, target_stride_h, target_stride_w)
                tl.atomic_add(target_ptr + address[:, None] + channel_offsets, weight[:, None] * grad,
                              mask=hit[:, None] & mask_m[None, :])


@triton.jit
def scatter_segments_kernel(segment_starts_ptr, segment_counts_ptr, order_ptr, tap_weights_ptr, samples, target_ptr,
                            target_stride_b, target_stride_c, target_stride_h, target_stride_w, channels, height,
                            width, grad_ptr, grad_stride_row, grad_stride_i, grad_stride_j, grad_stride_c,
                            cells_per_box, output_width, cell_grads_ptr, cell_keys_ptr, weight_ptr,
                            weight_stride_nc, weight_stride_k, weight_stride_m, weight_stride_c, cells, cell_sentinel,
                            num_outputs, ACC: tl.constexpr, MODE: tl.constexpr, BLOCK_E: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    """Deterministic scatter: one program owns one pixel (key ``b * H * W + y * W + x``, its
    segment of the tap entries sorted by key, maybe empty; ``4 * samples`` entries a point) and a
    block of channels, sums
    ``tap weight x point_channel_grads`` over the segment in sorted order and stores the pixel's
    gradient once."""
    key = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    start = tl.load(segment_starts_ptr + key)
    count = tl.load(segment_counts_ptr + key)
    total = tl.zeros([BLOCK_C], ACC)
    for first in range(0, count, BLOCK_E):
        offs_e = first + tl.arange(0, BLOCK_E)
        mask_e = offs_e < count
        entry = tl.load(order_ptr + start + offs_e, mask=mask_e, other=0)
        weight = tl.load(tap_weights_ptr + entry, mask=mask_e, other=0.0)
        value = point_channel_grads(entry // (4 * samples), offs_c, mask_e, mask_c, grad_ptr, grad_stride_row,
                                    grad_stride_i, grad_stride_j, grad_stride_c, cells_per_box, output_width,
                                    cell_grads_ptr, cell_keys_ptr, weight_ptr, weight_stride_nc, weight_stride_k,
                                    weight_stride_m, weight_stride_c, cells, cell_sentinel, num_outputs, ACC, MODE)
        total += tl.sum(weight[:, None] * value, axis=0)
    address = tap_address(key, height, width, target_stride_b, target_stride_h, target_stride_w)
    tl.store(target_ptr + address + offs_c * target_stride_c, total, mask=mask_c)


@triton.jit
def bias_grad_partials_kernel(cell_grads_ptr, cell_keys_ptr, rows, slots_per_row, segment_slots, cells, num_outputs,
                              partials_ptr, ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """Bias gradient, first pass: program (segment * rows + row, output m) adds the cell
    gradients of one segment of the row's slots (4 per point; a row is one point or a box's grid)
    by cell ``key % KK``, in tiles of ``BLOCK_S`` slots in order: ``partials (segments, rows, KK,
    M)``. The segments are summed in order afterwards, so every run gives the same bits."""
    program = tl.program_id(0).to(tl.int64)
    output = tl.program_id(1).to(tl.int64)
    row = program % rows
    segment = program // rows
    begin = row * slots_per_row + segment * segment_slots
    end = tl.minimum(begin + segment_slots, (row + 1) * slots_per_row)
    offs_k = tl.arange(0, BLOCK_K)
    total = tl.zeros([BLOCK_K], ACC)
    for first in range(begin, end, BLOCK_S):
        offs_s = first + tl.arange(0, BLOCK_S)
        mask_s = offs_s < end
        cell = tl.load(cell_keys_ptr + offs_s, mask=mask_s, other=0) % cells
        grad = tl.load(cell_grads_ptr + offs_s * num_outputs + output, mask=mask_s, other=0.0)
        total += tl.sum(tl.where(cell[:, None] == offs_k[None, :], grad[:, None], 0.0), axis=0)
    out = partials_ptr + ((segment * rows + row) * cells + offs_k) * num_outputs + output
    tl.store(out, total, mask=offs_k < cells)


@triton.jit
def weight_grad_segments_kernel(segment_starts_ptr, segment_counts_ptr, order_ptr, cell_grads_ptr, num_outputs,
                                tap_keys_ptr, tap_weights_ptr, samples, tap_sentinel, feature_ptr, stride_b, stride_c,
                                stride_h,
                                stride_w, channels, height, width, grad_weight_ptr, ACC: tl.constexpr,
                                BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Gradient of one classifier cell's weights of a sample-features layer:
    ``grad_W[label * KK + cell, m, c] = sum_p grad_cell[p, m] * f(p)[c]`` over the (point, cell)
    entries sorted by cell key; one program per (cell key, M block, channel block), in a fixed
    order, with ``f(p)`` resampled from the layer's tap entries (``4 * samples`` a point).
    ``grad_weight`` is
    ``(NC * KK, M, C)``, contiguous."""
    key = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_m = tl.program_id(2).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_c = offs_c < channels
    mask_m = offs_m < num_outputs
    start = tl.load(segment_starts_ptr + key)
    count = tl.load(segment_counts_ptr + key)
    total = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for first in range(0, count, BLOCK_E):
        offs_e = first + tl.arange(0, BLOCK_E)
        mask_e = offs_e < count
        entry = tl.load(order_ptr + start + offs_e, mask=mask_e, other=0)
        grad = tl.load(cell_grads_ptr + (entry * num_outputs)[:, None] + offs_m[None, :],
                       mask=mask_e[:, None] & mask_m[None, :], other=0.0)
        taps = (entry // 4) * 4 * samples
        sample = tl.zeros([BLOCK_E, BLOCK_C], ACC)
        for step in range(0, samples):
            for tap in tl.static_range(4):
                tap_key = tl.load(tap_keys_ptr + taps + step * 4 + tap, mask=mask_e, other=tap_sentinel)
                weight = tl.load(tap_weights_ptr + taps + step * 4 + tap, mask=mask_e, other=0.0)
                hit = mask_e & (tap_key < tap_sentinel)
                address = tap_address(tap_key, height, width, stride_b, stride_h, stride_w)
                sample += weight[:, None] * tl.load(feature_ptr + address[:, None] + (offs_c * stride_c)[None, :],
                                                    mask=hit[:, None] & mask_c[None, :], other=0.0).to(ACC)
        total += tl.sum(grad[:, :, None] * sample[:, None, :], axis=0)
    out = grad_weight_ptr + (key * num_outputs + offs_m)[:, None] * channels + offs_c[None, :]
    tl.store(out, total, mask=mask_m[:, None] & mask_c[None, :])
