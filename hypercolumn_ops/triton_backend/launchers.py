"""Launchers of the Triton kernels: buffers, block sizes, warps, and the per-layer steps of the
four operators and their backward passes, over the normalised arguments of ``csrc/ops.cpp``.

Extra memory: per layer of a fused operator either nothing channel-sized (sample-features order)
or the projected score map ``(B, NC * KK * M, H_l, W_l)`` (project-scores order); per point the
``(P, 4, M)`` scores of its <= 4 cells; in backward the tap entries ``(P, S, 4)`` of one layer at a
time (``S`` samples a point: 1, ``sampling_ratio ** 2``, or adaptive sampling's largest
``ny * nx`` on that layer) and the sorted entries of the deterministic path. No buffer scales
with ``P x C``, and the forward passes hold no sub-samples beyond a block.

Host synchronisation: none, except for adaptive sampling (``sampling_ratio <= 0``) in the backward
pass, which reads the largest sample count of each layer back to size the tap entries
(:meth:`Points.samples_per_point`).
"""

import contextlib
import functools
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import kernels
from ..planning import PROJECT_SCORES
from .._codes import ACTIVATION_SIGMOID
from ..reference import accumulation_dtype

_TL_DTYPES = {torch.float64: tl.float64, torch.float32: tl.float32}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _poison() -> bool:
    return os.environ.get("HYPERCOLUMN_OPS_POISON") == "1"


def new_output(shape, like: Tensor) -> Tensor:
    """An output the kernels fill completely: NaN-filled under HYPERCOLUMN_OPS_POISON=1 so an
    element a kernel forgets shows up (as csrc/poison.h does for the compiled kernels)."""
    out = like.new_empty(shape)
    return out.fill_(float("nan")) if _poison() else out


def _pow2(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(value, 1))))


class _Blocks:
    """Tile sizes. The interpreter runs programs one after another with numpy, so it wants few,
    large tiles; a GPU wants many tiles whose 3-D products stay within the registers."""

    def __init__(self, channels: int, outputs: int = 1):
        interpreting = _interpreting()
        self.points = 128 if interpreting else 32
        self.entries = 64 if interpreting else 16
        self.channels = _pow2(channels, 16, 128 if interpreting else 64)
        self.outputs = _pow2(outputs, 1, 16)
        budget = (1 << 16) if interpreting else 8192  # elements of a [points, outputs, channels] product
        self.dot_points = 64 if interpreting else 16
        self.dot_channels = _pow2(budget // (self.dot_points * self.outputs), 16, self.channels)
        self.warps = 4


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _scales(scale_y: List[float], scale_x: List[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Per-layer (sy, sx) in the accumulation dtype, read by the kernels (a Python float argument
    would reach a kernel as float32). Made once per scales, dtype and device: a copy from the host
    on every call would wait for the device, and could not be captured in a CUDA graph."""
    return _device_scales(tuple(scale_y), tuple(scale_x), dtype, device)


@functools.lru_cache(maxsize=64)
def _device_scales(scale_y: Tuple[float, ...], scale_x: Tuple[float, ...], dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    return torch.tensor([s for pair in zip(scale_y, scale_x) for s in pair], dtype=dtype, device=device)


class Points:
    """Where the points of an operator come from: ``P`` points, their coordinate rows, and how a
    point maps to its row and output cell (box form: ``R * oh * ow`` grid points)."""

    def __init__(self, coords: Tensor, is_box: bool, output_height: int = 1, output_width: int = 1,
                 locations: Optional[Tensor] = None, labels: Optional[Tensor] = None, sampling_ratio: int = 1,
                 aligned: bool = True):
        self.coords = coords
        self.is_box = is_box
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        # Output cells that average several samples, or whose one sample is not the grid point,
        # take the kernels' sub-sample loops; the default grid keeps its one-tap path.
        self.sampled = is_box and (sampling_ratio != 1 or not aligned)
        self.output_height = output_height if is_box else 1
        self.output_width = output_width if is_box else 1
        self.cells_per_box = self.output_height * self.output_width
        self.rows = coords.shape[0]
        self.count = self.rows * self.cells_per_box
        self.locations = locations
        self.labels = labels

    def output_strides(self, out: Tensor) -> Tuple[int, int, int, int]:
        """(row, i, j, channel) strides of an output ``(rows, X, oh, ow)`` or ``(rows, X)``."""
        if self.is_box:
            return out.stride(0), out.stride(2), out.stride(3), out.stride(1)
        return out.stride(0), 0, 0, out.stride(1)

    def flags(self, padding: int):
        """The sampling constexprs of the kernels that sample."""
        return dict(IS_BOX=self.is_box, SAMPLED=self.sampled, ALIGNED=self.aligned, PADDING=padding)

    def samples_per_point(self, features: List[Tensor], scales: Tensor) -> List[int]:
        """Samples ``S`` of each point per layer, the room its tap entries need: 1 unsampled,
        ``sampling_ratio ** 2``, or with adaptive sampling the largest ``ny * nx`` of any box on
        the layer. That one is computed on the device and read back to size the entries: the
        backend's only host synchronisation, adaptive sampling's backward pass only."""
        if not self.sampled:
            return [1] * len(features)
        if self.sampling_ratio > 0:
            return [self.sampling_ratio * self.sampling_ratio] * len(features)
        if self.rows == 0:
            return [1] * len(features)
        # Zeros, not empty: a compile-only run (tools/triton_sm90_check.py) launches nothing, and
        # must not size the entries by whatever the memory held.
        counts = torch.zeros(len(features), self.rows, dtype=torch.int32, device=self.coords.device)
        blocks = _Blocks(1)
        kernels.sample_counts_kernel[(_cdiv(self.rows, blocks.points), len(features))](
            self.coords, scales, self.rows, features[0].shape[0], self.output_height, self.output_width,
            self.sampling_ratio, counts, ACC=_TL_DTYPES[scales.dtype], ALIGNED=self.aligned, BLOCK_P=blocks.points,
            num_warps=blocks.warps)
        return [max(count, 1) for count in counts.amax(1).tolist()]


def device_guard(tensor: Tensor):
    """Kernels launch on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


# ----------------------------------------------------------------------------- sampling


def sample_hypercolumns(features: List[Tensor], points: Points, scale_y, scale_x, padding: int, out: Tensor) -> None:
    """Fills ``out`` ((P, sum C_l) or (R, sum C_l, oh, ow)) with the hypercolumns of the points."""
    acc = accumulation_dtype(features[0].dtype)
    scales = _scales(scale_y, scale_x, acc, out.device)
    offset = 0
    for layer, feature in enumerate(features):
        batch, channels, height, width = feature.shape
        part = out.narrow(1, offset, channels)
        offset += channels
        if points.count == 0 or channels == 0:
            continue
        blocks = _Blocks(channels)
        grid = (_cdiv(points.count, blocks.points), _cdiv(channels, blocks.channels))
        kernels.sample_features_kernel[grid](
            feature, *feature.stride(), batch, channels, height, width, points.coords, scales[2 * layer:],
            points.count, points.cells_per_box, points.output_height, points.output_width, points.sampling_ratio,
            part, *points.output_strides(part), ACC=_TL_DTYPES[acc], BLOCK_P=blocks.points, BLOCK_C=blocks.channels,
            num_warps=blocks.warps, **points.flags(padding))


class _TapEntries:
    """The taps of every point on one layer, four per sample and ``samples`` samples a point
    (``keys``, ``weights``: ``(P * samples * 4,)``) and, for the deterministic path, the entries
    sorted by key and cut into one segment per pixel."""

    def __init__(self, feature: Tensor, points: Points, scales: Tensor, padding: int, num_classes: int,
                 deterministic: bool, samples: int):
        batch, _, height, width = feature.shape
        acc = scales.dtype
        self.sentinel = batch * height * width
        self.samples = samples
        self.keys = torch.empty(points.count * samples * 4, dtype=torch.int64, device=feature.device)
        self.weights = torch.empty(points.count * samples * 4, dtype=acc, device=feature.device)
        if points.count:
            blocks = _Blocks(1)
            labels = points.labels
            kernels.tap_entries_kernel[(_cdiv(points.count, blocks.points),)](
                points.coords, points.coords if labels is None else labels, scales, points.count,
                points.cells_per_box, points.output_height, points.output_width, batch, height, width,
                points.sampling_ratio, samples, num_classes, self.keys, self.weights, ACC=_TL_DTYPES[acc],
                HAS_LABELS=labels is not None, BLOCK_P=blocks.points, num_warps=blocks.warps, **points.flags(padding))
        self.segments = _segments(self.keys, self.sentinel) if deterministic else None


def _segments(keys: Tensor, num_keys: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Entries sorted by key (stable, so the order is reproducible) -> (order, segment starts,
    segment counts), one segment for every key ``0 .. num_keys - 1`` (empty where no entry has it;
    ``num_keys`` itself, the sentinel, is left out). Bounds come from ``searchsorted`` on the
    device: no host synchronisation. Keys sort as int32 where they fit."""
    sort_keys = keys.to(torch.int32) if num_keys <= torch.iinfo(torch.int32).max else keys
    sorted_keys, order = torch.sort(sort_keys, stable=True)
    # Key k's entries end where key k + 1's begin.
    bounds = torch.searchsorted(sorted_keys, torch.arange(num_keys + 1, dtype=sorted_keys.dtype, device=keys.device))
    return order, bounds[:-1], bounds.diff()


class _CellGrads:
    """What the fused backward scatters: ``grads (P, 4, M)`` of the cells' scores, their keys
    ``label * KK + cell`` (``(P, 4)``; ``NC * KK`` where a point takes no gradient) and weights."""

    def __init__(self, grads: Tensor, keys: Tensor, num_classes: int, cells: int, outputs: int):
        self.grads = grads
        self.keys = keys
        self.cells = cells
        self.sentinel = num_classes * cells
        self.outputs = outputs


def scatter_to_taps(entries: _TapEntries, points: Points, target: Tensor, channels: int, mode, grad=None,
                    cell_grads: Optional[_CellGrads] = None, weight: Optional[Tensor] = None) -> None:
    """Adds every point's channel gradients (``mode``, see ``kernels.point_channel_grads``) to its
    taps in ``target`` ``(B, channels, H, W)`` (zero-filled), by atomics or, with
    ``entries.segments``, deterministically."""
    if points.count == 0 or target.numel() == 0:
        return
    blocks = _Blocks(channels)
    _, _, height, width = target.shape
    grad_args = (grad, *points.output_strides(grad)) if grad is not None else (target, 0, 0, 0, 0)
    if cell_grads is not None:
        cell_args = (cell_grads.grads, cell_grads.keys)
        weight_args = (weight, *weight.stride()) if weight is not None else (target, 0, 0, 0, 0)
        cell_args += weight_args + (cell_grads.cells, cell_grads.sentinel, cell_grads.outputs)
    else:
        cell_args = (target, entries.keys, target, 0, 0, 0, 0, 1, 0, 1)
    common = (target, *target.stride(), channels, height, width, *grad_args, points.cells_per_box,
              points.output_width, *cell_args)
    acc = _TL_DTYPES[target.dtype]
    if entries.segments is None:
        grid = (_cdiv(points.count, blocks.points), _cdiv(channels, blocks.channels))
        kernels.scatter_taps_atomic_kernel[grid](
            entries.keys, entries.weights, points.count, entries.samples, entries.sentinel, *common, ACC=acc, MODE=mode,
            BLOCK_P=blocks.points, BLOCK_C=blocks.channels, num_warps=blocks.warps)
    else:
        order, starts, counts = entries.segments
        grid = (starts.shape[0], _cdiv(channels, blocks.channels))
        kernels.scatter_segments_kernel[grid](
            starts, counts, order, entries.weights, entries.samples, *common, ACC=acc, MODE=mode,
            BLOCK_E=blocks.entries, BLOCK_C=blocks.channels, num_warps=blocks.warps)


def _feature_grad(feature: Tensor, accumulated: Tensor) -> Tensor:
    """The gradient of ``feature`` with ``torch.empty_like(feature)``'s dtype and strides (what the
    fake kernels promise)."""
    expected = torch.empty_like(feature)
    if accumulated.dtype == feature.dtype and accumulated.stride() == expected.stride():
        return accumulated
    return expected.copy_(accumulated)


def _accumulation_buffer(feature: Tensor, acc: torch.dtype, channels: Optional[int] = None) -> Tensor:
    """Zeros of ``feature``'s shape (``channels`` channels if given) in the accumulation dtype,
    channels_last: the channel lanes of a scatter then add to consecutive addresses."""
    batch, own_channels, height, width = feature.shape
    return torch.empty(batch, own_channels if channels is None else channels, height, width, dtype=acc,
                       device=feature.device, memory_format=torch.channels_last).zero_()


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def sample_hypercolumns_backward(grad: Tensor, features: List[Tensor], points: Points, scale_y, scale_x,
                                 padding: int) -> List[Tensor]:
    """Gradients of the features of :func:`sample_hypercolumns` given the output's ``grad``."""
    acc = accumulation_dtype(features[0].dtype)
    scales = _scales(scale_y, scale_x, acc, grad.device)
    deterministic = _deterministic()
    samples = points.samples_per_point(features, scales)
    grads = []
    offset = 0
    for layer, feature in enumerate(features):
        channels = feature.shape[1]
        target = _accumulation_buffer(feature, acc)
        entries = _TapEntries(feature, points, scales[2 * layer:], padding, 1, deterministic, samples[layer])
        scatter_to_taps(entries, points, target, channels, kernels.SAMPLE_GRADS, grad=grad.narrow(1, offset, channels))
        offset += channels
        grads.append(_feature_grad(feature, target))
    return grads


# ----------------------------------------------------------------------------- fused


class FusedOp:
    """The normalised arguments of a fused operator, and its steps."""

    def __init__(self, features: List[Tensor], points: Points, weights: List[Tensor], bias: Optional[Tensor],
                 scale_y, scale_x, padding: int, activation: int, orders: List[int]):
        self.features = features
        self.points = points
        self.weights = weights
        self.bias = bias
        self.padding = padding
        self.activation = activation
        self.orders = orders
        self.num_classes, self.cells, self.outputs, _ = weights[0].shape
        self.grid = round(self.cells ** 0.5)
        self.acc = accumulation_dtype(features[0].dtype)
        self.scales = _scales(scale_y, scale_x, self.acc, features[0].device)
        self.blocks = _Blocks(max(f.shape[1] for f in features), self.outputs)

    def _point_args(self):
        p = self.points
        return (p.coords, p.coords if p.locations is None else p.locations,
                p.coords if p.labels is None else p.labels)

    def _flags(self):
        p = self.points
        return dict(ACC=_TL_DTYPES[self.acc], IS_BOX=p.is_box, HAS_LOCATIONS=p.locations is not None,
                    HAS_LABELS=p.labels is not None)

    def _sampling_flags(self):
        flags = self._flags()
        flags.update(self.points.flags(self.padding))
        return flags

    def projected_scores(self, layer: int) -> Tensor:
        """Score map ``(B, NC * KK * M, H, W)`` of a project-scores layer: a 1x1 convolution."""
        feature, weight = self.features[layer], self.weights[layer]
        return torch.einsum("qc,bchw->bqhw", weight.flatten(0, -2), feature)

    def cell_scores(self) -> Tensor:
        """``(P, 4, M)`` scores (without bias) of each point's <= 4 cells, summed over layers."""
        p = self.points
        scores = torch.zeros(p.count, 4, self.outputs, dtype=self.acc, device=p.coords.device)
        if p.count == 0:
            return scores
        coords, locations, labels = self._point_args()
        blocks = self.blocks
        for layer, (feature, weight, order) in enumerate(zip(self.features, self.weights, self.orders)):
            batch, channels, height, width = feature.shape
            source = self.projected_scores(layer) if order == PROJECT_SCORES else feature
            grid = (_cdiv(p.count, blocks.dot_points), _cdiv(self.outputs, blocks.outputs))
            kernels.cell_scores_kernel[grid](
                source, *source.stride(), channels, height, width, weight, *weight.stride(), coords, locations,
                labels, self.scales[2 * layer:], p.count, p.cells_per_box, p.output_height, p.output_width, batch,
                p.sampling_ratio, self.grid, self.num_classes, self.outputs, scores, ORDER=int(order),
                BLOCK_P=blocks.dot_points, BLOCK_M=blocks.outputs, BLOCK_C=blocks.dot_channels,
                num_warps=blocks.warps, **self._sampling_flags())
        return scores

    def _blend(self, scores: Tensor, out: Tensor, cell_keys: Tensor, gradients: bool) -> None:
        p = self.points
        if p.count == 0:
            return
        coords, locations, labels = self._point_args()
        bias = self.bias
        bias_args = (bias, *bias.stride()) if bias is not None else (scores, 0, 0, 0)
        blocks = self.blocks
        grid = (_cdiv(p.count, blocks.points), _cdiv(self.outputs, blocks.outputs))
        kernels.blend_cells_kernel[grid](
            scores, *bias_args, labels, coords, locations, p.count, p.cells_per_box, p.output_height,
            p.output_width, self.features[0].shape[0], self.grid, self.num_classes, self.outputs, out,
            *p.output_strides(out), cell_keys, GRADIENTS=gradients, HAS_BIAS=bias is not None,
            ACTIVATION=self.activation, BLOCK_P=blocks.points, BLOCK_M=blocks.outputs, num_warps=blocks.warps,
            **self._flags())

    def forward(self, out: Tensor) -> Tensor:
        self._blend(self.cell_scores(), out, out, gradients=False)
        return out

    def backward(self, grad: Tensor) -> Tuple[List[Tensor], List[Tensor], Tensor]:
        p = self.points
        device = grad.device
        if self.activation == ACTIVATION_SIGMOID:
            scores = self.cell_scores()
        else:  # the gradient of a linear blend does not depend on the scores
            scores = torch.zeros(p.count, 4, self.outputs, dtype=self.acc, device=device)
        cell_keys = torch.empty(p.count * 4, dtype=torch.int64, device=device)
        self._blend(scores, grad, cell_keys, gradients=True)
        cell_grads = _CellGrads(scores, cell_keys, self.num_classes, self.cells, self.outputs)
        grad_bias = self._bias_grad(cell_grads)
        deterministic = _deterministic()
        samples = p.samples_per_point(self.features, self.scales)
        grad_features, grad_weights = [], []
        for layer, (feature, weight, order) in enumerate(zip(self.features, self.weights, self.orders)):
            entries = _TapEntries(feature, p, self.scales[2 * layer:], self.padding, self.num_classes,
                                  deterministic, samples[layer])
            if order == PROJECT_SCORES:
                grad_feature, grad_weight = self._project_scores_grads(feature, weight, entries, cell_grads)
            else:
                grad_feature, grad_weight = self._sample_features_grads(feature, weight, entries, cell_grads)
            grad_features.append(_feature_grad(feature, grad_feature))
            grad_weights.append(torch.empty_like(weight).copy_(grad_weight.reshape(weight.shape)))
        return grad_features, grad_weights, grad_bias

    def _bias_grad(self, cell_grads: _CellGrads) -> Tensor:
        """``(rows, KK, M)``: each point's cell gradients summed into its row's cells (over the
        whole grid of a box). Segments of each row's slots give partial sums in parallel
        (``bias_grad_partials_kernel``), then the segments are summed in order: deterministic."""
        p = self.points
        if p.count == 0:
            return torch.zeros(p.rows, self.cells, self.outputs, dtype=self.features[0].dtype, device=p.coords.device)
        slots_per_row = 4 * p.cells_per_box
        # Enough programs to fill a GPU (about 2,048), each segment at least 512 slots.
        segments = max(1, min(-(-2048 // (p.rows * self.outputs)), -(-slots_per_row // 512)))
        segment_slots = -(-slots_per_row // segments)
        segments = -(-slots_per_row // segment_slots)
        partials = torch.empty(segments, p.rows, self.cells, self.outputs, dtype=self.acc, device=p.coords.device)
        kernels.bias_grad_partials_kernel[(segments * p.rows, self.outputs)](
            cell_grads.grads, cell_grads.keys, p.rows, slots_per_row, segment_slots, self.cells, self.outputs,
            partials, ACC=_TL_DTYPES[self.acc], BLOCK_S=128, BLOCK_K=triton.next_power_of_2(self.cells))
        return partials.sum(0).to(self.features[0].dtype)

    def _project_scores_grads(self, feature: Tensor, weight: Tensor, entries: _TapEntries,
                              cell_grads: _CellGrads) -> Tuple[Tensor, Tensor]:
        """Scatter the cell gradients into the score map's gradient, then the 1x1 convolution's
        two matrix products give the feature's and the weight's gradients."""
        _, _, height, width = feature.shape
        channels = self.num_classes * self.cells * self.outputs
        target = _accumulation_buffer(feature, self.acc, channels)
        p = self.points
        if p.count and entries.segments is None:
            blocks = self.blocks
            grid = (_cdiv(p.count, blocks.points), _cdiv(self.outputs, blocks.outputs))
            kernels.scatter_cell_grads_atomic_kernel[grid](
                entries.keys, entries.weights, p.count, entries.samples, entries.sentinel, target, *target.stride(),
                height, width, cell_grads.grads, cell_grads.keys, cell_grads.sentinel, self.outputs,
                BLOCK_P=blocks.points, BLOCK_M=blocks.outputs, num_warps=blocks.warps)
        else:
            scatter_to_taps(entries, p, target, channels, kernels.SCORE_MAP_GRADS, cell_grads=cell_grads)
        score_grad = target.to(feature.dtype)
        matrix = weight.flatten(0, -2)
        grad_feature = torch.einsum("qc,bqhw->bchw", matrix, score_grad)
        grad_weight = torch.einsum("bqhw,bchw->qc", score_grad, feature)
        return grad_feature, grad_weight

    def _sample_features_grads(self, feature: Tensor, weight: Tensor, entries: _TapEntries,
                               cell_grads: _CellGrads) -> Tuple[Tensor, Tensor]:
        """Feature gradient: each point's ``sum grad_cell x W[cell]`` scattered to its taps. Weight
        gradient: per cell key, ``sum_p grad_cell[p] x f(p)`` (deterministic segments)."""
        _, channels, height, width = feature.shape
        target = _accumulation_buffer(feature, self.acc)
        scatter_to_taps(entries, self.points, target, channels, kernels.FEATURE_GRADS, cell_grads=cell_grads,
                        weight=weight)
        grad_weight = torch.zeros(self.num_classes * self.cells, self.outputs, channels, dtype=self.acc,
                                  device=feature.device)
        if self.points.count and channels:
            order, starts, counts = _segments(cell_grads.keys, cell_grads.sentinel)
            blocks = _Blocks(channels, self.outputs)
            grid = (starts.shape[0], _cdiv(channels, blocks.dot_channels), _cdiv(self.outputs, blocks.outputs))
            kernels.weight_grad_segments_kernel[grid](
                starts, counts, order, cell_grads.grads, self.outputs, entries.keys, entries.weights,
                entries.samples, entries.sentinel, feature, *feature.stride(), channels, height, width, grad_weight,
                ACC=_TL_DTYPES[self.acc], BLOCK_E=blocks.entries, BLOCK_M=blocks.outputs, BLOCK_C=blocks.dot_channels,
                num_warps=blocks.warps)
        return target, grad_weight
