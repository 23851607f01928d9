"""ONNX export of models that call the operators: every forward operator written in standard ONNX
operators (opset 18), as ONNX Script translations for ``torch.onnx.export(..., dynamo=True)``.

torch's exporter (2.14) takes translations of custom operators only through the
``custom_translation_table`` argument of ``torch.onnx.export``: the registries it builds its own
translations from are private and rebuilt at every export. So this module gives the table and a
thin :func:`export` that passes it::

    import hypercolumn_ops.onnx

    program = hypercolumn_ops.onnx.export(model, (images, boxes), dynamic_shapes=...)
    program.save("model.onnx")        # runs in ONNX Runtime, no hypercolumn_ops needed

or ``torch.onnx.export(model, args, dynamo=True,
custom_translation_table=hypercolumn_ops.onnx.translation_table())``. Importing
``hypercolumn_ops`` does not import this module (nor onnx and onnxscript).

Each translation follows ``hypercolumn_ops.reference`` step by step, in float32 (float64 for
float64 features), so that an exported model matches the eager operators to float32 rounding:

- a layer's bilinear taps are explicit gathers of rows of the map laid out as ``(B*H*W, C)``,
  with the indices and weights of the reference's ``axis_taps`` (clamp, floor, the padding rule):
  every padding, per-axis scale and box sampling rule is exact, where ``GridSample`` and
  ``RoiAlign`` would compute the coordinates in another order of operations and know one padding
  rule each;
- the fused operators compute the scores of the (at most four) classifier cells blended at each
  output only, each layer in the call's evaluation order (``orders``): project the map to score
  rows first (``MatMul``, transposing the smaller of the map and its scores) and read each
  output's class's and cell's rows, or sample the features, ``MatMul``, and pick the rows;
- a box grid's blended cells and their weights depend on the grid only: constants computed at
  export time; at points they are computed in the graph from ``locations``;
- invalid rows (a batch index that is not an integer in ``[0, B)``, non-finite coordinates or
  places, a label outside ``[0, NC)``) give NaN, as in eager.

The number of boxes or points and the maps' sizes may be dynamic. What has no exact form raises
:class:`ExportUnsupportedError` while exporting, naming the option.
"""

import math
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from onnxscript import ir
from onnxscript import opset18 as op

from ._codes import (ACTIVATION_NONE, ACTIVATION_SIGMOID, ORDER_PROJECT_SCORES, ORDER_SAMPLE_FEATURES,
                     PADDING_BORDER, PADDING_ZEROS, PADDING_ZEROS_PER_TAP, PADDINGS)
from . import reference

OPSET = 18
OPERATORS = ("sparse_hypercolumn", "box_hypercolumn", "fused_hypercolumn", "fused_hypercolumn_points")


class ExportUnsupportedError(NotImplementedError):
    """An operator's option that has no exact form in standard ONNX operators."""


def translation_table() -> Dict[Callable, Callable]:
    """``{torch.ops.hypercolumn_ops.<operator>.default: translation}`` for the four forward
    operators, the ``custom_translation_table`` of ``torch.onnx.export(..., dynamo=True)``; also
    for ``torch.ops.hypercolumn_ops_triton`` (the same schema), where the Triton backend has
    registered it, since a model exported with CUDA tensors may call that backend."""
    table = {}
    for namespace in (torch.ops.hypercolumn_ops, torch.ops.hypercolumn_ops_triton):
        for name in OPERATORS:
            try:
                table[getattr(namespace, name).default] = _TRANSLATIONS[name]
            except AttributeError:  # the Triton backend was not imported
                break
    return table


def export(model, args: tuple = (), kwargs: Optional[dict] = None, *,
           custom_translation_table: Optional[Dict[Callable, Callable]] = None, **options) -> "torch.onnx.ONNXProgram":
    """``torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, ...)`` with this module's
    translations added to ``custom_translation_table`` (the caller's entries win). Every other
    keyword (``dynamic_shapes``, ``opset_version`` (18 or more), ``input_names``, ``f``, ...) is
    passed through. Returns the ``torch.onnx.ONNXProgram``."""
    if options.pop("dynamo", True) is not True:
        raise ValueError("dynamo: the translations are for torch.onnx.export(..., dynamo=True) only")
    opset = options.get("opset_version")
    if opset is not None and opset < OPSET:
        raise ValueError(f"opset_version: the translations need opset {OPSET} or newer, got {opset}")
    table = translation_table()
    table.update(custom_translation_table or {})
    return torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, custom_translation_table=table, **options)


# ----------------------------------------------------------------------------- arguments


def _bind(name: str, args: tuple, kwargs: dict) -> Dict[str, object]:
    """The call's arguments by name, defaults filled in, whatever the operator's schema."""
    schema = getattr(torch.ops.hypercolumn_ops, name).default._schema
    names = [argument.name for argument in schema.arguments]
    call = dict(zip(names, args))
    call.update(kwargs)
    for argument in schema.arguments:
        if argument.name not in call:
            call[argument.name] = argument.default_value
    return call


class _Graph:
    """Constants and casts in the compute dtype of one call: float64 for float64 features,
    float32 for the rest (as the kernels accumulate)."""

    def __init__(self, features: Sequence):
        self.output_dtype = features[0].dtype
        double = self.output_dtype == ir.DataType.DOUBLE
        self.dtype = ir.DataType.DOUBLE if double else ir.DataType.FLOAT
        self.numpy_dtype = np.float64 if double else np.float32

    def const(self, values):
        return op.Constant(value=ir.tensor(np.asarray(values, dtype=self.numpy_dtype)))

    @staticmethod
    def ints(values):
        return op.Constant(value=ir.tensor(np.asarray(values, dtype=np.int64)))

    def compute(self, value):
        """``value`` (a graph input of known dtype) in the compute dtype."""
        return value if value.dtype == self.dtype else op.Cast(value, to=self.dtype)

    def output(self, value):
        return value if self.output_dtype == self.dtype else op.Cast(value, to=self.output_dtype)

    def ratio(self, numerator, denominator):
        """``numerator / denominator`` of two sizes (int64 scalars or ints), divided in float64
        and rounded once to the compute dtype, as the kernels' scales are."""
        def as_double(size):
            if isinstance(size, int):
                return op.Constant(value=ir.tensor(np.asarray(size, dtype=np.float64)))
            return op.Cast(size, to=ir.DataType.DOUBLE)

        quotient = op.Div(as_double(numerator), as_double(denominator))
        return op.Cast(quotient, to=self.dtype)


def _size(value, axis: int):
    """Dimension ``axis`` of a graph input as an int64 scalar."""
    return op.Squeeze(op.Shape(value, start=axis, end=axis + 1), _Graph.ints([0]))


class _Sampling:
    """How every layer is sampled, parsed once from a call's normalised arguments: per-layer
    scales ``(sy, sx)`` as scalars of the compute dtype (``spatial_scale[l]``, or ``H_l / H``,
    ``W_l / W`` from ``image_size``, which may be symbolic), the padding code, and the box
    sampling options (``sampling_ratio``, ``aligned``; absent from the point operators)."""

    def __init__(self, name: str, call: Dict[str, object], graph: _Graph):
        features = call["features"]
        if call["spatial_scale"]:
            self.scales = [(graph.const(s), graph.const(s)) for s in call["spatial_scale"]]
        else:
            height, width = call["image_size"]
            self.scales = [(graph.ratio(_size(f, 2), height), graph.ratio(_size(f, 3), width)) for f in features]
        self.padding = int(call["padding"])
        if self.padding not in PADDINGS.values():
            raise ExportUnsupportedError(f"{name}: padding code {self.padding} is none of {PADDINGS}")
        self.sampling_ratio = int(call.get("sampling_ratio", 1))
        self.aligned = bool(call.get("aligned", True))


# ----------------------------------------------------------------------------- sampling


def _rows(feature):
    """A map ``(B, C, H, W)`` as rows of channels ``(B*H*W, C)``, row ``(b*H + y)*W + x``."""
    channels = op.Shape(feature, start=1, end=2)
    return op.Reshape(op.Transpose(feature, perm=[0, 2, 3, 1]), op.Concat(_Graph.ints([-1]), channels, axis=0))


def _finite(value):
    return op.Not(op.Or(op.IsNaN(value), op.IsInf(value)))


def _axis(graph: _Graph, f, size, padding: int):
    """The two taps of one axis of bilinear samples at feature coordinates ``f`` (any shape) on an
    axis of ``size`` (int64 scalar) pixels: lower and upper index (int64, in range) and their
    weights (``axis_taps`` of the reference: ``"border"`` clamps ``f`` to ``[0, size - 1]``,
    ``"zeros"`` also zeroes both weights where ``f < -1`` or ``f > size``, ``"zeros_per_tap"``
    zeroes each tap outside the map). NaN ``f`` gets index 0 and weight 0; infinite ``f`` clamps."""
    one = graph.const(1.0)
    size_f = op.Cast(size, to=graph.dtype)
    last = op.Sub(size_f, one)
    last_index = op.Sub(size, _Graph.ints(1))
    nan = op.IsNaN(f)
    f = op.Where(nan, graph.const(0.0), f)
    if padding == PADDING_ZEROS_PER_TAP:
        # Far coordinates clamp to just outside the map, where both taps are outside too.
        f = op.Clip(f, graph.const(-2.0), op.Add(size_f, one))
        lower = op.Floor(f)
        upper = op.Add(lower, one)
        fraction = op.Sub(f, lower)
        not_nan = op.Not(nan)

        def keep(tap):
            return op.Cast(op.And(not_nan, op.And(op.GreaterOrEqual(tap, graph.const(0.0)),
                                                  op.LessOrEqual(tap, last))), to=graph.dtype)

        zero = _Graph.ints(0)
        return (op.Clip(op.Cast(lower, to=ir.DataType.INT64), zero, last_index),
                op.Clip(op.Cast(upper, to=ir.DataType.INT64), zero, last_index),
                op.Mul(op.Sub(one, fraction), keep(lower)), op.Mul(fraction, keep(upper)))
    inside = op.Not(nan)
    if padding == PADDING_ZEROS:
        inside = op.And(inside, op.And(op.GreaterOrEqual(f, graph.const(-1.0)), op.LessOrEqual(f, size_f)))
    clamped = op.Clip(f, graph.const(0.0), last)
    lower_index = op.Min(op.Cast(op.Floor(clamped), to=ir.DataType.INT64), last_index)
    upper_index = op.Min(op.Add(lower_index, _Graph.ints(1)), last_index)
    fraction = op.Sub(clamped, op.Cast(lower_index, to=graph.dtype))
    keep = op.Cast(inside, to=graph.dtype)
    return lower_index, upper_index, op.Mul(op.Sub(one, fraction), keep), op.Mul(fraction, keep)


def _read_rows(table, row_width, index):
    """Rows ``index`` (any shape, flattened) of ``table`` ``(rows, Q)`` -> ``(N, Q)``. A table of
    single values (``row_width`` 1) is read with ``GatherElements`` of its values: 4x faster than
    ``Gather`` of one-value rows in ONNX Runtime 1.32's CPU provider."""
    index = op.Reshape(index, _Graph.ints([-1]))
    if row_width != 1:
        return op.Gather(table, index, axis=0)
    values = op.GatherElements(op.Reshape(table, _Graph.ints([-1])), index, axis=0)
    return op.Reshape(values, _Graph.ints([-1, 1]))


def _offset(row_offset, column_offset):
    """The sum of two offsets, None standing for 0."""
    if row_offset is None or column_offset is None:
        return column_offset if row_offset is None else row_offset
    return op.Add(row_offset, column_offset)


def _bilinear(table, row_width, first_row, y_axis, x_axis, width, stride: int = 1, offsets=((None, None),)):
    """Bilinear samples of rows of ``table``, one ``(N, Q)`` per pair of ``offsets``: ``first_row``
    (``b*H*W``) and the two axes of :func:`_axis` broadcast to the samples' shape, flattened to N
    in row-major order.

    Pixel ``p`` reads row ``p * stride + row_offset + column_offset``: a table of score rows holds
    ``stride`` rows per pixel (one per class and cell), and each pair picks one; the row offset
    broadcasts like the y axis, the column offset like the x axis (None: 0), so that only the
    final index has the samples' full shape. The four taps add in the reference's order."""
    y0, y1, wy0, wy1 = y_axis
    x0, x1, wx0, wx1 = x_axis
    totals = [None] * len(offsets)
    for y, wy in ((y0, wy0), (y1, wy1)):
        row = op.Add(first_row, op.Mul(y, width))
        if stride != 1:
            row = op.Mul(row, _Graph.ints(stride))
        for x, wx in ((x0, wx0), (x1, wx1)):
            column = x if stride == 1 else op.Mul(x, _Graph.ints(stride))
            weight = op.Reshape(op.Mul(wy, wx), _Graph.ints([-1, 1]))
            for k, (row_offset, column_offset) in enumerate(offsets):
                index = op.Add(_offset(row, row_offset), _offset(column, column_offset))
                term = op.Mul(weight, _read_rows(table, row_width, index))
                totals[k] = term if totals[k] is None else op.Add(totals[k], term)
    return totals


def _as_shape(count):
    """A count (an int, or an int64 ``(1,)`` tensor) as an int64 ``(1,)`` tensor, for shapes."""
    return _Graph.ints([count]) if isinstance(count, int) else count


def _batch_index(graph: _Graph, batch_values, batch_size):
    """Batch values -> (index, 0 where invalid; whether the value is an integer in ``[0, B)``)."""
    zero = graph.const(0.0)
    valid = op.And(op.And(op.GreaterOrEqual(batch_values, zero),
                          op.Less(batch_values, op.Cast(batch_size, to=graph.dtype))),
                   op.Equal(batch_values, op.Floor(batch_values)))  # NaN fails all three
    return op.Cast(op.Where(valid, batch_values, zero), to=ir.DataType.INT64), valid


def _column(values, index: int):
    """Column ``index`` of a 2-D tensor, as ``(rows, 1)``."""
    return op.Slice(values, _Graph.ints([index]), _Graph.ints([index + 1]), _Graph.ints([1]))


class _Points:
    """Points ``(N, 3)`` rows ``(batch_index, x, y)`` in image pixels, and a sampler of any layer at
    them. A point is valid when its batch value is an integer in ``[0, B)`` and its coordinates
    are finite; invalid points read image 0 and their outputs become NaN.

    The outputs of a call, one per point, are in "output space": ``(N,)``."""

    def __init__(self, graph: _Graph, sampling: _Sampling, rows, batch_size):
        self.graph, self.sampling = graph, sampling
        rows = graph.compute(rows)
        batch_values, self.x, self.y = (op.Squeeze(_column(rows, c), _Graph.ints([1])) for c in range(3))
        self.batch, batch_valid = _batch_index(graph, batch_values, batch_size)
        self.valid = op.And(batch_valid, op.And(_finite(self.x), _finite(self.y)))  # (N,)
        self.count = _size(rows, 0)

    def per_row(self, values):
        """Values of each row ``(N,)`` in output space."""
        return values

    def flatten(self, values):
        """Values in output space -> ``(N,)``."""
        return values

    def output_index(self):
        """Each output's index in ``[0, N)``, in output space."""
        return op.Range(_Graph.ints(0), self.count, _Graph.ints(1))

    def blend_shape(self, outputs: int):
        """The shape ``(N, M)`` in which outputs blend with location weights ``(N, 1)``."""
        return _Graph.ints([-1, outputs])

    def sample(self, table, row_width, layer: int, feature, stride: int = 1, offsets=((None, None),)):
        """Bilinear samples of ``table``, the rows of ``feature`` ``(B, C, H, W)`` or of its score
        maps: one ``(N, Q)`` per pair of ``offsets`` (:func:`_bilinear`, offsets in output space)."""
        graph = self.graph
        scale_y, scale_x = self.sampling.scales[layer]
        height, width = _size(feature, 2), _size(feature, 3)
        half = graph.const(0.5)
        y_axis = _axis(graph, op.Sub(op.Mul(self.y, scale_y), half), height, self.sampling.padding)
        x_axis = _axis(graph, op.Sub(op.Mul(self.x, scale_x), half), width, self.sampling.padding)
        first_row = op.Mul(self.batch, op.Mul(height, width))
        return _bilinear(table, row_width, first_row, y_axis, x_axis, width, stride, offsets)

    def location_cells(self, locations, grid: int):
        """The (at most four) classifier cells blended at each point's place ``(N, 2)``: a list of
        (cell index ``(N,)`` int64, None, weight ``(N, 1)``), and whether each place is finite
        (``location_weights`` of the reference: ``axis_taps`` of ``u * K - 0.5`` per axis, border
        padding; a repeated cell at the grid's edge keeps its share separately)."""
        graph = self.graph
        locations = graph.compute(locations)

        def axis(index):
            place = op.Squeeze(_column(locations, index), _Graph.ints([1]))
            f = op.Sub(op.Mul(place, graph.const(float(grid))), graph.const(0.5))
            lower, upper, lower_weight, upper_weight = _axis(graph, f, _Graph.ints(grid), PADDING_BORDER)
            return ((lower, lower_weight), (upper, upper_weight)), _finite(place)

        u_taps, u_finite = axis(0)
        v_taps, v_finite = axis(1)
        cells = [(op.Add(op.Mul(kv, _Graph.ints(grid)), ku), None, op.Reshape(op.Mul(wv, wu), _Graph.ints([-1, 1])))
                 for kv, wv in v_taps for ku, wu in u_taps]
        return cells, op.And(u_finite, v_finite)


class _BoxGrid:
    """The ``oh x ow`` output cells of boxes ``(R, 5)`` rows ``(batch_index, x1, y1, x2, y2)``, and
    a sampler of any layer on them (``box_columns`` of the reference): cell ``(i, j)`` averages
    ``n_y x n_x`` bilinear samples, ``torchvision.ops.roi_align``'s rule; with
    ``sampling_ratio=1, aligned=True`` one sample at ``x = x1 + (j + 0.5) * (x2 - x1) / ow``.

    Samples are laid out ``(R, oh, n_y, ow, n_x)``: each axis's coordinates and taps are computed
    per box and row or column of samples, ``(R, oh, n_y, 1, 1)`` and ``(R, 1, 1, ow, n_x)``, and
    broadcast. The outputs, one per cell, are in "output space" ``(R, oh, 1, ow, 1)``. A box is
    valid when its batch value is an integer in ``[0, B)`` and its corners are finite; an invalid
    box samples at 0 and its outputs become NaN."""

    def __init__(self, graph: _Graph, sampling: _Sampling, boxes, output_height: int, output_width: int,
                 batch_size):
        self.graph, self.sampling = graph, sampling
        self.output_height, self.output_width = output_height, output_width
        boxes = graph.compute(boxes)
        corners = op.Slice(boxes, _Graph.ints([1]), _Graph.ints([5]), _Graph.ints([1]))
        self.batch, batch_valid = _batch_index(graph, _column(boxes, 0), batch_size)  # (R, 1)
        corners_finite = [_finite(_column(corners, c)) for c in range(4)]
        box_valid = op.And(op.And(batch_valid, op.And(corners_finite[0], corners_finite[1])),
                           op.And(corners_finite[2], corners_finite[3]))  # (R, 1)
        safe = op.Where(box_valid, corners, graph.const(0.0))
        self.x1, self.y1, self.x2, self.y2 = (_column(safe, c) for c in range(4))  # (R, 1)
        self.count = _size(boxes, 0)
        self.shape = op.Concat(op.Shape(boxes, start=0, end=1), _Graph.ints([output_height, 1, output_width, 1]),
                               axis=0)
        self.valid = self.flatten(self.per_row(op.Reshape(box_valid, _Graph.ints([-1]))))

    def per_row(self, values):
        """Values of each box ``(R,)`` in output space."""
        return op.Reshape(values, _Graph.ints([-1, 1, 1, 1, 1]))

    def flatten(self, values):
        """Values in output space (broadcast) -> ``(R * oh * ow,)``, box-major then row-major."""
        return op.Reshape(op.Expand(values, self.shape), _Graph.ints([-1]))

    def output_index(self):
        cells = self.output_height * self.output_width
        every = op.Range(_Graph.ints(0), op.Mul(self.count, _Graph.ints(cells)), _Graph.ints(1))
        return op.Reshape(every, _Graph.ints([-1, self.output_height, 1, self.output_width, 1]))

    def blend_shape(self, outputs: int):
        """The shape ``(R, oh * ow, M)`` in which outputs blend with location weights
        ``(oh * ow, 1)``, the same for every box."""
        return _Graph.ints([-1, self.output_height * self.output_width, outputs])

    def _axis_samples(self, start, end, scale, cells: int):
        """One axis of every box's samples (``_axis_matrix`` of the reference): feature
        coordinates ``(R, cells, n)``, the weight of each sample ``(R, cells, n)`` (0 past a box's
        own count; None where every sample counts), the samples per cell ``n`` (an int, or an int64
        ``(1,)`` tensor for adaptive sampling), and the count of each box ``(R, 1)`` as a float
        (None where it is ``sampling_ratio``)."""
        graph, sampling = self.graph, self.sampling
        length = op.Sub(end, start)
        extent = op.Mul(length, scale)
        if not sampling.aligned:
            extent = op.Max(extent, graph.const(1.0))
        weight = counts_float = None
        if sampling.sampling_ratio > 0:
            most = sampling.sampling_ratio
            steps = graph.const(np.arange(most).reshape(1, 1, most))
            place = op.Add(graph.const(np.arange(cells).reshape(1, cells, 1)),
                           op.Div(op.Add(steps, graph.const(0.5)), graph.const(float(most))))
        else:
            counts = op.Clip(op.Ceil(op.Div(extent, graph.const(float(cells)))), graph.const(-1.0),
                             graph.const(float(reference.MAX_ADAPTIVE_SAMPLES)))
            counts = op.Cast(op.Where(op.IsNaN(counts), graph.const(0.0), counts), to=ir.DataType.INT64)  # (R, 1)
            # At least one sample, also for no boxes (ReduceMax of nothing is not 1).
            most = op.ReduceMax(op.Concat(op.Reshape(counts, _Graph.ints([-1])), _Graph.ints([1]), axis=0),
                                _Graph.ints([0]), keepdims=1)
            steps = op.Reshape(op.Cast(op.Range(_Graph.ints(0), op.Squeeze(most, _Graph.ints([0])), _Graph.ints(1)),
                                       to=graph.dtype), _Graph.ints([1, 1, -1]))
            counts_float = op.Cast(op.Max(counts, _Graph.ints(1)), to=graph.dtype)
            place = op.Add(graph.const(np.arange(cells).reshape(1, cells, 1)),
                           op.Div(op.Add(steps, graph.const(0.5)), op.Unsqueeze(counts_float, _Graph.ints([2]))))
            weight = op.Cast(op.Less(steps, op.Cast(op.Unsqueeze(counts, _Graph.ints([2])), to=graph.dtype)),
                             to=graph.dtype)
        start3, length3 = op.Unsqueeze(start, _Graph.ints([2])), op.Unsqueeze(length, _Graph.ints([2]))
        coordinate = op.Add(start3, op.Div(op.Mul(place, length3), graph.const(float(cells))))
        f = op.Mul(coordinate, scale)
        if sampling.aligned:
            f = op.Sub(f, graph.const(0.5))
        else:
            # A box under one feature pixel is widened to one, from its start (roi_align).
            narrow = op.Less(op.Mul(length3, scale), graph.const(1.0))
            f = op.Where(narrow, op.Add(op.Mul(start3, scale), op.Div(place, graph.const(float(cells)))), f)
        return f, weight, most, counts_float

    def sample(self, table, row_width, layer: int, feature, stride: int = 1, offsets=((None, None),)):
        """Every cell's average of its samples of ``table``, the rows of ``feature`` or of its score
        maps: one ``(R * oh * ow, Q)`` per pair of ``offsets`` (:func:`_bilinear`, offsets in
        output space)."""
        graph = self.graph
        scale_y, scale_x = self.sampling.scales[layer]
        height, width = _size(feature, 2), _size(feature, 3)
        oh, ow = self.output_height, self.output_width
        fy, weight_y, most_y, count_y = self._axis_samples(self.y1, self.y2, scale_y, oh)
        fx, weight_x, most_x, count_x = self._axis_samples(self.x1, self.x2, scale_x, ow)
        axes = []
        for f, weight, size, expand in ((fy, weight_y, height, [3, 4]), (fx, weight_x, width, [1, 2])):
            lower, upper, lower_weight, upper_weight = _axis(graph, f, size, self.sampling.padding)
            if weight is not None:
                lower_weight, upper_weight = op.Mul(lower_weight, weight), op.Mul(upper_weight, weight)
            axes.append([op.Unsqueeze(value, _Graph.ints(expand))
                         for value in (lower, upper, lower_weight, upper_weight)])
        first_row = op.Unsqueeze(op.Mul(self.batch, op.Mul(height, width)), _Graph.ints([2, 3, 4]))
        every = _bilinear(table, row_width, first_row, axes[0], axes[1], width, stride, offsets)
        if most_y == 1 and most_x == 1:
            return every
        if count_y is None:
            samples_per_cell = graph.const(float(self.sampling.sampling_ratio ** 2))
        else:
            samples_per_cell = op.Reshape(op.Mul(count_y, count_x), _Graph.ints([-1, 1, 1, 1]))
        averages = []
        for samples in every:  # (R*oh*n_y*ow*n_x, Q)
            channels = op.Shape(samples, start=1, end=2)
            grouped = op.Reshape(samples, op.Concat(_Graph.ints([-1, oh]), _as_shape(most_y), _Graph.ints([ow]),
                                                    _as_shape(most_x), channels, axis=0))
            total = op.ReduceSum(grouped, _Graph.ints([2, 4]), keepdims=0)  # (R, oh, ow, Q)
            averages.append(op.Reshape(op.Div(total, samples_per_cell), op.Concat(_Graph.ints([-1]), channels, axis=0)))
        return averages

    def location_cells(self, grid: int):
        """The (at most four) classifier cells blended at each output cell's place
        ``((j + 0.5) / ow, (i + 0.5) / oh)``, the same for every box: a list of (the cell's row
        ``kv * K`` as ``(1, oh, 1, 1, 1)``, its column ``ku`` as ``(1, 1, 1, ow, 1)``, weight
        ``(oh * ow, 1)``), computed at export time by the reference's ``axis_taps``, in the
        compute dtype."""
        graph = self.graph
        dtype = torch.float64 if graph.dtype == ir.DataType.DOUBLE else torch.float32
        anchor = torch.zeros(1, 5, dtype=dtype)
        _, _, _, u, v = reference.box_grid_points(anchor, self.output_height, self.output_width)
        u, v = u[: self.output_width], v[:: self.output_width]
        v_taps = reference.axis_taps(v * grid - 0.5, grid, PADDING_BORDER)
        u_taps = reference.axis_taps(u * grid - 0.5, grid, PADDING_BORDER)
        cells = []
        for kv, wv in ((v_taps[0], v_taps[2]), (v_taps[1], v_taps[3])):
            for ku, wu in ((u_taps[0], u_taps[2]), (u_taps[1], u_taps[3])):
                row = (kv * grid).reshape(1, self.output_height, 1, 1, 1)
                column = ku.reshape(1, 1, 1, self.output_width, 1)
                weight = (wv[:, None] * wu[None, :]).reshape(-1, 1)
                cells.append((_Graph.ints(row.numpy()), _Graph.ints(column.numpy()), graph.const(weight.numpy())))
        return cells


# ----------------------------------------------------------------------------- classifier


def _project(feature, channels, matrix, score_channels: int):
    """The 1x1 projection of a map ``(B, C, H, W)`` (``channels`` its C, an int or symbolic) by
    ``matrix`` ``(Q, C)`` to score rows ``(B*H*W, Q)``, transposing whichever of the map and its
    scores has fewer channels."""
    if isinstance(channels, int) and score_channels <= channels:
        scores = op.MatMul(matrix, op.Reshape(feature, _Graph.ints([0, 0, -1])))  # (B, Q, H*W)
        return op.Reshape(op.Transpose(scores, perm=[0, 2, 1]), _Graph.ints([-1, score_channels]))
    return op.MatMul(_rows(feature), op.Transpose(matrix, perm=[1, 0]))


def _activate(call: Dict[str, object], name: str, scores):
    activation = int(call["activation"])
    if activation == ACTIVATION_SIGMOID:
        return op.Sigmoid(scores)
    if activation != ACTIVATION_NONE:
        raise ExportUnsupportedError(f"{name}: activation code {activation} is none of 0 (none) and 1 (sigmoid)")
    return scores


def _fused(name: str, graph: _Graph, call: Dict[str, object], points, cells, valid):
    """The location-weighted classification of a fused call: ``(N, M)`` in output order, NaN where
    ``valid`` ``(N,)`` is false or the row's label is outside ``[0, NC)``.

    ``cells`` are the classifier cells blended at each output, (row offset, column offset in
    output space, weight in ``points.blend_shape``) as ``location_cells`` gives them, or None for
    K = 1. Only their scores are computed: ``s_k = sum_l W_l[label, k] @ f_l + b[k]`` per cell,
    each layer in the call's order. With the scores projected first, each output reads its
    class's and cell's row of the score maps laid out ``(B*H*W*NC*KK, M)``; with the features
    sampled first, all ``NC*KK*M`` scores of the output are computed, then its rows picked."""
    weights = call["weights"]
    classes, cell_count, outputs = (int(s) for s in weights[0].shape[:3])
    per_pixel = classes * cell_count  # rows of M scores per pixel
    # Each blended cell's row among a pixel's, split into the parts that broadcast like a box grid's
    # rows and columns (None: 0; K = 1 without labels reads row 0, the only one).
    cell_offsets = [(row, column) for row, column, _ in cells] if cells is not None else [(None, None)]
    offsets = cell_offsets
    labels = call["labels"]
    if labels is not None:
        label_valid = op.And(op.GreaterOrEqual(labels, _Graph.ints(0)), op.Less(labels, _Graph.ints(classes)))
        valid = op.And(valid, points.flatten(points.per_row(label_valid)))
        class_row = points.per_row(op.Mul(op.Clip(labels, _Graph.ints(0), _Graph.ints(classes - 1)),
                                          _Graph.ints(cell_count)))
        offsets = [(_offset(class_row, row), column) for row, column in offsets]
    scores = [None] * len(offsets)
    for layer, (feature, weight, order) in enumerate(zip(call["features"], weights, call["orders"])):
        channels = feature.shape[1]  # the input's: a value made in the graph has no shape yet
        feature, weight = graph.compute(feature), graph.compute(weight)
        matrix = op.Reshape(weight, op.Concat(_Graph.ints([per_pixel * outputs]), op.Shape(weight, start=3, end=4),
                                              axis=0))  # (NC*KK*M, C)
        if order == ORDER_PROJECT_SCORES:
            table = op.Reshape(_project(feature, channels, matrix, per_pixel * outputs), _Graph.ints([-1, outputs]))
            layer_scores = points.sample(table, outputs, layer, feature, per_pixel, offsets)
        elif order == ORDER_SAMPLE_FEATURES:
            columns, = points.sample(_rows(feature), channels, layer, feature)  # (N, C)
            every = op.Reshape(op.MatMul(columns, op.Transpose(matrix, perm=[1, 0])), _Graph.ints([-1, outputs]))
            first = op.Mul(points.output_index(), _Graph.ints(per_pixel))
            layer_scores = [_read_rows(every, outputs, points.flatten(_offset(first, _offset(*pair))))
                            for pair in offsets]
        else:
            raise ExportUnsupportedError(f"{name}: orders: layer {layer} has evaluation order {order}, none of "
                                         f"{ORDER_SAMPLE_FEATURES} and {ORDER_PROJECT_SCORES}")
        scores = [new if old is None else op.Add(old, new) for old, new in zip(scores, layer_scores)]
    if call["bias"] is not None:
        bias = op.Reshape(graph.compute(call["bias"]), _Graph.ints([-1, outputs]))  # (rows*KK, M)
        first = points.per_row(op.Mul(op.Range(_Graph.ints(0), points.count, _Graph.ints(1)),
                                      _Graph.ints(cell_count)))
        scores = [op.Add(s, _read_rows(bias, outputs, points.flatten(_offset(first, _offset(*pair)))))
                  for s, pair in zip(scores, cell_offsets)]
    scores = [_activate(call, name, s) for s in scores]
    if cells is None:
        out = scores[0]
    else:
        shape = points.blend_shape(outputs)
        out = None
        for s, (_, _, weight) in zip(scores, cells):
            term = op.Mul(op.Reshape(s, shape), weight)
            out = term if out is None else op.Add(out, term)
        out = op.Reshape(out, _Graph.ints([-1, outputs]))
    return _nan_where_invalid(graph, valid, out)


# ----------------------------------------------------------------------------- translations


def _nan_where_invalid(graph: _Graph, valid, values):
    """``values`` ``(N, ...)`` with NaN rows where ``valid`` ``(N,)`` is false."""
    return op.Where(op.Reshape(valid, _Graph.ints([-1, 1])), values, graph.const(math.nan))


def _feature_columns(graph: _Graph, features, points):
    """Every layer sampled at the points, concatenated: ``(N, sum C_l)`` in the compute dtype."""
    columns = [points.sample(_rows(graph.compute(f)), f.shape[1], layer, f)[0] for layer, f in enumerate(features)]
    return columns[0] if len(columns) == 1 else op.Concat(*columns, axis=1)


def sparse_hypercolumn(*args, **kwargs):
    """``hypercolumn_ops::sparse_hypercolumn`` -> ``(N, sum C_l)``."""
    call = _bind("sparse_hypercolumn", args, kwargs)
    features = call["features"]
    graph = _Graph(features)
    points = _Points(graph, _Sampling("sparse_hypercolumn", call, graph), call["points"], _size(features[0], 0))
    return graph.output(_nan_where_invalid(graph, points.valid, _feature_columns(graph, features, points)))


def box_hypercolumn(*args, **kwargs):
    """``hypercolumn_ops::box_hypercolumn`` -> ``(R, sum C_l, oh, ow)``."""
    call = _bind("box_hypercolumn", args, kwargs)
    features = call["features"]
    graph = _Graph(features)
    height, width = int(call["output_height"]), int(call["output_width"])
    grid = _BoxGrid(graph, _Sampling("box_hypercolumn", call, graph), call["boxes"], height, width,
                    _size(features[0], 0))
    columns = _nan_where_invalid(graph, grid.valid, _feature_columns(graph, features, grid))
    columns = op.Reshape(columns, op.Concat(_Graph.ints([-1, height, width]), op.Shape(columns, start=1, end=2),
                                            axis=0))
    return graph.output(op.Transpose(columns, perm=[0, 3, 1, 2]))


def fused_hypercolumn(*args, **kwargs):
    """``hypercolumn_ops::fused_hypercolumn`` -> ``(R, M, oh, ow)``."""
    name = "fused_hypercolumn"
    call = _bind(name, args, kwargs)
    features = call["features"]
    graph = _Graph(features)
    height, width = int(call["output_height"]), int(call["output_width"])
    grid = _BoxGrid(graph, _Sampling(name, call, graph), call["boxes"], height, width, _size(features[0], 0))
    cell_count, outputs = (int(s) for s in call["weights"][0].shape[1:3])
    cells = grid.location_cells(math.isqrt(cell_count)) if cell_count > 1 else None
    out = _fused(name, graph, call, grid, cells, grid.valid)  # (R*oh*ow, M)
    out = op.Transpose(op.Reshape(out, _Graph.ints([-1, height, width, outputs])), perm=[0, 3, 1, 2])
    return graph.output(out)


def fused_hypercolumn_points(*args, **kwargs):
    """``hypercolumn_ops::fused_hypercolumn_points`` -> ``(N, M)``."""
    name = "fused_hypercolumn_points"
    call = _bind(name, args, kwargs)
    features = call["features"]
    graph = _Graph(features)
    points = _Points(graph, _Sampling(name, call, graph), call["points"], _size(features[0], 0))
    cell_count = int(call["weights"][0].shape[1])
    valid, cells = points.valid, None
    if call["locations"] is not None:
        # With K = 1 the one cell weighs 1 at any finite place; a non-finite place still gives NaN.
        cells, place_finite = points.location_cells(call["locations"], math.isqrt(cell_count))
        valid = op.And(valid, place_finite)
        if cell_count == 1:
            cells = None
    elif cell_count > 1:
        raise ExportUnsupportedError(f"{name}: locations are required with K * K = {cell_count} cells")
    return graph.output(_fused(name, graph, call, points, cells, valid))


_TRANSLATIONS = {
    "sparse_hypercolumn": sparse_hypercolumn,
    "box_hypercolumn": box_hypercolumn,
    "fused_hypercolumn": fused_hypercolumn,
    "fused_hypercolumn_points": fused_hypercolumn_points,
}
