"""The public operators of ``../shared/CONTRACT.md``: argument checks, normalisation and the
dispatch to a backend.

Coordinates are continuous, in pixels of the image the network saw: pixel ``i`` covers
``[i, i + 1)``. Layer ``l`` of shape ``(H_l, W_l)`` samples image point ``(x, y)`` at feature
coordinate ``(x * sx - 0.5, y * sy - 0.5)`` with ``sy = H_l / H``, ``sx = W_l / W`` (from
``image_size = (H, W)``) or ``sx = sy = spatial_scale[l]``, bilinearly.

Inside ``torch.autocast`` the fused operators run in the autocast dtype and the sampling
operators promote mixed features to the widest dtype (see "autocast" below).
"""

import contextlib
import functools
import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import planning
from .backends import backend_module, native_available
from .reference import ACTIVATION_NONE, ACTIVATION_SIGMOID, PADDING_BORDER, PADDING_ZEROS

_PADDINGS = {"border": PADDING_BORDER, "zeros": PADDING_ZEROS}
_ACTIVATIONS = {None: ACTIVATION_NONE, "sigmoid": ACTIVATION_SIGMOID}

_value_checks = [True]


def set_value_checks(enabled: bool) -> None:
    """Turn on or off the checks that read tensor values (batch indices, labels).

    They need a device synchronisation, so a training loop that knows its inputs are valid may
    turn them off. Kernels never read or write out of bounds either way: a point with an invalid
    batch index or label gets NaN outputs. Under ``torch.compile`` and while a CUDA graph is being
    captured (neither can hold a synchronisation) they are always off.
    """
    _value_checks[0] = bool(enabled)


def _checking_values(values: Tensor) -> bool:
    """Whether to check the values of ``values`` now: the switch is on, and reading them back
    would not break a compilation or a CUDA graph capture."""
    if not _value_checks[0] or torch.compiler.is_compiling():
        return False
    return values.device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------- autocast
#
# Inside a torch.autocast region of the features' device, the operators follow autocast's policy
# for operators of their kind, then run the backend with autocast off, in the dtypes chosen:
# - the fused operators multiply features by classifier weights, as conv2d and linear do: the
#   features, weights and bias are cast to the autocast dtype (float16 or bfloat16);
# - sparse_hypercolumn and box_hypercolumn concatenate layers, as torch.cat does: features of
#   different dtypes are promoted to the widest of them.
# As in autocast, float64 tensors are never cast. The casts are differentiable: the gradients of
# float32 weights are float32.

_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_device(features) -> Optional[str]:
    """The device type of ``features`` if an autocast region of that device type is active."""
    first = features[0] if isinstance(features, (list, tuple)) and features else None
    if not isinstance(first, Tensor) or first.device.type not in _AUTOCAST_DEVICES:
        return None
    return first.device.type if torch.is_autocast_enabled(first.device.type) else None


def _castable(value) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float64


def _cast(value, dtype: torch.dtype):
    return value.to(dtype) if _castable(value) else value


def _autocast_fused(features, weights, bias):
    """(features, weights, bias) in the autocast dtype inside an autocast region, else as given."""
    device_type = _autocast_device(features)
    if device_type is None:
        return features, weights, bias
    dtype = torch.get_autocast_dtype(device_type)
    if isinstance(weights, (list, tuple)):
        weights = [_cast(w, dtype) for w in weights]
    return [_cast(f, dtype) for f in features], weights, _cast(bias, dtype)


def _autocast_sampling(features):
    """``features`` promoted to their widest dtype inside an autocast region, else as given."""
    if _autocast_device(features) is None:
        return features
    dtypes = [f.dtype for f in features if _castable(f)]
    if len(set(dtypes)) < 2:
        return features
    widest = functools.reduce(torch.promote_types, dtypes)
    return [_cast(f, widest) for f in features]


def without_autocast(device_type: str):
    """A context in which autocast is off for ``device_type`` (for a device type autocast does
    not know, a context that does nothing)."""
    if device_type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _run(name: str, args: tuple) -> Tensor:
    """Operator ``name`` of the backend for the features' device, on normalised ``args``; with
    autocast off for that device, so that no product inside a backend is autocast."""
    features = args[0]
    operator = getattr(backend_module(features[0].device), name)
    device_type = _autocast_device(features)
    if device_type is None:
        return operator(*args)
    with torch.autocast(device_type, enabled=False):
        return operator(*args)


# ----------------------------------------------------------------------------- validation


def _check_features(features: Sequence[Tensor]) -> List[Tensor]:
    if isinstance(features, Tensor) or not isinstance(features, (list, tuple)):
        raise TypeError("features: expected a sequence (list or tuple) of 4-D tensors, "
                        f"got {type(features).__name__}")
    features = list(features)
    if not features:
        raise ValueError("features: expected at least one feature map, got an empty sequence")
    first = features[0]
    for index, feature in enumerate(features):
        name = f"features[{index}]"
        if not isinstance(feature, Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(feature).__name__}")
        if not feature.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32 or float64), "
                            f"got {feature.dtype}")
        if feature.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (B, C, H, W), got shape {tuple(feature.shape)}")
        if feature.dtype != first.dtype:
            raise ValueError(f"{name}: dtype {feature.dtype} differs from features[0]'s {first.dtype}")
        if feature.device != first.device:
            raise ValueError(f"{name}: device {feature.device} differs from features[0]'s {first.device}")
        if feature.shape[0] != first.shape[0]:
            raise ValueError(f"{name}: batch size {feature.shape[0]} differs from features[0]'s {first.shape[0]}")
        if feature.shape[2] < 1 or feature.shape[3] < 1:
            raise ValueError(f"{name}: expected a non-empty map, got shape {tuple(feature.shape)}")
    return features


def _coordinate_dtype(features: List[Tensor]) -> torch.dtype:
    return torch.float64 if features[0].dtype == torch.float64 else torch.float32


def _check_coordinates(name: str, value: Tensor, columns: int, rows_name: str, features: List[Tensor]) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a tensor ({rows_name}, {columns}), got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {value.dtype}")
    if value.dim() != 2 or value.shape[1] != columns:
        raise ValueError(f"{name}: expected shape ({rows_name}, {columns}), got {tuple(value.shape)}")
    if value.device != features[0].device:
        raise ValueError(f"{name}: device {value.device} differs from the features' {features[0].device}")
    return value.detach().to(_coordinate_dtype(features)).contiguous()


def _index_values_valid(values: Tensor, size: int) -> bool:
    """Whether every element of the 1-D ``values`` is an integer value in ``[0, size)`` (NaN is
    not). The compiled ``index_values_valid`` is one kernel and one synchronisation on CUDA; without
    it, an integer value in range equals its floor clamped to ``[0, size - 1]``."""
    if native_available(values.device.type):
        return torch.ops.hypercolumn_ops.index_values_valid(values, size)
    floor = values.floor() if values.is_floating_point() else values
    return bool(values.eq(floor.clamp(0, size - 1)).all())


def _check_batch_column(name: str, rows: Tensor, batch: int) -> None:
    if rows.shape[0] == 0 or not _checking_values(rows):
        return
    column = rows[:, 0]
    if not _index_values_valid(column, batch):
        raise ValueError(f"{name}: column 0 (batch index) must hold integer values in [0, {batch}), "
                         f"got values in [{column.min().item()}, {column.max().item()}]")


def _check_points(points: Tensor, features: List[Tensor]) -> Tensor:
    points = _check_coordinates("points", points, 3, "N", features)
    _check_batch_column("points", points, features[0].shape[0])
    return points


def _check_boxes(boxes: Union[Tensor, Sequence[Tensor]], features: List[Tensor]) -> Tensor:
    batch = features[0].shape[0]
    if isinstance(boxes, (list, tuple)):
        if len(boxes) > batch:
            raise ValueError(f"boxes: got a list of {len(boxes)} tensors for a batch of {batch} images")
        rows = []
        for index, per_image in enumerate(boxes):
            per_image = _check_coordinates(f"boxes[{index}]", per_image, 4, "R_b", features)
            rows.append(torch.cat([torch.full_like(per_image[:, :1], index), per_image], dim=1))
        if not rows:
            return torch.zeros(0, 5, dtype=_coordinate_dtype(features), device=features[0].device)
        return torch.cat(rows)
    boxes = _check_coordinates("boxes", boxes, 5, "R", features)
    _check_batch_column("boxes", boxes, batch)
    return boxes


def _check_scales(features: List[Tensor], image_size, spatial_scale) -> Tuple[List[float], List[float]]:
    if (image_size is None) == (spatial_scale is None):
        raise ValueError("image_size, spatial_scale: give exactly one of the two "
                         f"(got image_size={image_size!r}, spatial_scale={spatial_scale!r})")
    if image_size is not None:
        if isinstance(image_size, numbers.Number) or len(image_size) != 2:
            raise ValueError(f"image_size: expected (H, W), got {image_size!r}")
        height, width = (float(s) for s in image_size)
        if not (height > 0 and width > 0 and math.isfinite(height) and math.isfinite(width)):
            raise ValueError(f"image_size: expected positive sizes, got {tuple(image_size)!r}")
        return [f.shape[2] / height for f in features], [f.shape[3] / width for f in features]
    scales = [spatial_scale] * len(features) if isinstance(spatial_scale, numbers.Number) else list(spatial_scale)
    if len(scales) != len(features):
        raise ValueError(f"spatial_scale: expected one float or one per layer ({len(features)}), got {len(scales)}")
    scales = [float(s) for s in scales]
    if not all(s > 0 and math.isfinite(s) for s in scales):
        raise ValueError(f"spatial_scale: expected positive scales, got {scales}")
    return scales, list(scales)


def _check_padding(padding: str) -> int:
    if padding not in _PADDINGS:
        raise ValueError(f"padding: expected 'border' or 'zeros', got {padding!r}")
    return _PADDINGS[padding]


def _check_activation(activation: Optional[str]) -> int:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation: expected None or 'sigmoid', got {activation!r}")
    return _ACTIVATIONS[activation]


def _check_output_size(output_size) -> Tuple[int, int]:
    if isinstance(output_size, numbers.Integral):
        output_size = (output_size, output_size)
    if (not isinstance(output_size, (list, tuple)) or len(output_size) != 2
            or not all(isinstance(s, numbers.Integral) for s in output_size)):
        raise ValueError(f"output_size: expected an int or a pair of ints (oh, ow), got {output_size!r}")
    if output_size[0] < 1 or output_size[1] < 1:
        raise ValueError(f"output_size: expected positive sizes, got {tuple(output_size)}")
    return int(output_size[0]), int(output_size[1])


def _check_weights(weights: Sequence[Tensor], features: List[Tensor]) -> Tuple[List[Tensor], int, int, int, bool]:
    """-> (weights as (NC, KK, M, C_l), NC, KK, M, class_specific)."""
    if isinstance(weights, Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights: expected a sequence of one tensor per layer, got {type(weights).__name__}")
    if len(weights) != len(features):
        raise ValueError(f"weights: expected one tensor per layer ({len(features)}), got {len(weights)}")
    rank = None
    normalised = []
    for index, (weight, feature) in enumerate(zip(weights, features)):
        name = f"weights[{index}]"
        if not isinstance(weight, Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(weight).__name__}")
        if weight.dtype != feature.dtype:
            raise TypeError(f"{name}: dtype {weight.dtype} differs from the features' {feature.dtype}")
        if weight.device != feature.device:
            raise ValueError(f"{name}: device {weight.device} differs from the features' {feature.device}")
        if weight.dim() not in (3, 4):
            raise ValueError(f"{name}: expected (KK, M, C_l) or (NC, KK, M, C_l), got shape {tuple(weight.shape)}")
        if rank is None:
            rank = weight.dim()
        elif weight.dim() != rank:
            raise ValueError(f"{name}: rank {weight.dim()} differs from weights[0]'s {rank}")
        weight = weight if weight.dim() == 4 else weight.unsqueeze(0)
        if weight.shape[-1] != feature.shape[1]:
            raise ValueError(f"{name}: expected C_l = {feature.shape[1]} channels (features[{index}]), "
                             f"got {weight.shape[-1]}")
        if normalised and weight.shape[:3] != normalised[0].shape[:3]:
            raise ValueError(f"{name}: (NC, KK, M) = {tuple(weight.shape[:3])} differs from weights[0]'s "
                             f"{tuple(normalised[0].shape[:3])}")
        normalised.append(weight)
    classes, cells, outputs = normalised[0].shape[:3]
    grid = math.isqrt(cells)
    if cells < 1 or grid * grid != cells:
        raise ValueError(f"weights: KK = {cells} classifier cells is not a perfect square K * K")
    if outputs < 1 or classes < 1:
        raise ValueError(f"weights: expected M >= 1 outputs and NC >= 1 classes, got M = {outputs}, NC = {classes}")
    return normalised, classes, cells, outputs, rank == 4


def _check_labels(labels: Optional[Tensor], class_specific: bool, count: int, classes: int, rows: str,
                  features: List[Tensor]) -> Optional[Tensor]:
    if not class_specific:
        if labels is not None:
            raise ValueError("labels: given, but the weights are not class-specific (NC, KK, M, C_l)")
        return None
    if labels is None:
        raise ValueError("labels: required with class-specific weights (NC, KK, M, C_l)")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels: expected an int64 tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels: expected dtype int64, got {labels.dtype}")
    if labels.shape != (count,):
        raise ValueError(f"labels: expected shape ({rows},) = ({count},), got {tuple(labels.shape)}")
    if labels.device != features[0].device:
        raise ValueError(f"labels: device {labels.device} differs from the features' {features[0].device}")
    if count and _checking_values(labels) and not _index_values_valid(labels, classes):
        raise ValueError(f"labels: expected values in [0, {classes}), got values in "
                         f"[{labels.min().item()}, {labels.max().item()}]")
    return labels.contiguous()


def _check_bias(bias: Optional[Tensor], labels: Optional[Tensor], count: int, classes: int, cells: int,
                outputs: int, per_box_allowed: bool, features: List[Tensor]) -> Optional[Tensor]:
    """-> bias rows (P, KK, M), one per box or point (a stride-0 view where shared)."""
    if bias is None:
        return None
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias: expected a tensor, got {type(bias).__name__}")
    if bias.dtype != features[0].dtype:
        raise TypeError(f"bias: dtype {bias.dtype} differs from the features' {features[0].dtype}")
    if bias.device != features[0].device:
        raise ValueError(f"bias: device {bias.device} differs from the features' {features[0].device}")
    cell_shape = (cells, outputs)
    if bias.dim() == 2 and tuple(bias.shape) == cell_shape:
        return bias.expand(count, cells, outputs)
    if labels is not None and bias.dim() == 3 and tuple(bias.shape) == (classes, cells, outputs):
        # Clamped: with value checks off an invalid label must not index out of range here; its
        # rows get NaN outputs in the kernels whatever bias row they carry.
        return bias[labels.clamp(0, classes - 1)]
    if labels is None and per_box_allowed and bias.dim() == 3 and tuple(bias.shape) == (count, cells, outputs):
        return bias
    expected = [f"(KK, M) = {cell_shape}"]
    if labels is not None:
        expected.append(f"(NC, KK, M) = {(classes, cells, outputs)}")
    elif per_box_allowed:
        expected.append(f"(R, KK, M) = {(count, cells, outputs)}")
    raise ValueError(f"bias: expected shape {' or '.join(expected)}, got {tuple(bias.shape)}")


def _check_locations(locations: Optional[Tensor], cells: int, count: int, features: List[Tensor]) -> Optional[Tensor]:
    if locations is None:
        if cells > 1:
            raise ValueError(f"locations: required when K > 1 (got KK = {cells} classifier cells)")
        return None
    locations = _check_coordinates("locations", locations, 2, "N", features)
    if locations.shape[0] != count:
        raise ValueError(f"locations: expected {count} rows (one per point), got {locations.shape[0]}")
    return locations


# ----------------------------------------------------------------------------- operators


def sparse_hypercolumn(features: Sequence[Tensor], points: Tensor, *, image_size: Optional[Sequence[int]] = None,
                       spatial_scale: Optional[Union[float, Sequence[float]]] = None,
                       padding: str = "border") -> Tensor:
    """Hypercolumns at arbitrary points.

    Args:
        features: L >= 1 tensors ``(B, C_l, H_l, W_l)``, one floating dtype and device.
        points: ``(N, 3)`` rows ``(batch_index, x, y)``, in image pixels.
        image_size: ``(H, W)`` of the image the network saw; or
        spatial_scale: one float or one per layer (feature pixels per image pixel).
        padding: ``"border"`` (clamp to the map) or ``"zeros"`` (0 beyond one pixel outside).

    Returns:
        ``(N, sum C_l)``: for each point, every layer bilinearly sampled at
        ``(x * sx - 0.5, y * sy - 0.5)``, concatenated in layer order.
    """
    args = normalise_sparse_hypercolumn(features, points, image_size=image_size, spatial_scale=spatial_scale,
                                        padding=padding)
    return _run("sparse_hypercolumn", args)


def normalise_sparse_hypercolumn(features, points, *, image_size=None, spatial_scale=None, padding="border"):
    """Checked public arguments -> the compiled operator's arguments (see ``csrc/ops.cpp``)."""
    features = _check_features(_autocast_sampling(features))
    points = _check_points(points, features)
    scale_y, scale_x = _check_scales(features, image_size, spatial_scale)
    return features, points, scale_y, scale_x, _check_padding(padding)


def box_hypercolumn(features: Sequence[Tensor], boxes: Union[Tensor, Sequence[Tensor]],
                    output_size: Union[int, Tuple[int, int]], *, image_size: Optional[Sequence[int]] = None,
                    spatial_scale: Optional[Union[float, Sequence[float]]] = None,
                    padding: str = "border") -> Tensor:
    """Hypercolumns on an ``oh x ow`` grid inside each box.

    Args:
        features: L >= 1 tensors ``(B, C_l, H_l, W_l)``.
        boxes: ``(R, 5)`` rows ``(batch_index, x1, y1, x2, y2)``, or a list of B tensors
            ``(R_b, 4)`` as in torchvision; image pixels.
        output_size: ``(oh, ow)`` or one int; grid point ``(i, j)`` is at
            ``(x1 + (j + 0.5) * (x2 - x1) / ow, y1 + (i + 0.5) * (y2 - y1) / oh)``.
        image_size / spatial_scale / padding: as in :func:`sparse_hypercolumn`.

    Returns:
        ``(R, sum C_l, oh, ow)``. With one layer this is
        ``roi_align(..., sampling_ratio=1, aligned=True)`` (``padding="zeros"``).
    """
    args = normalise_box_hypercolumn(features, boxes, output_size, image_size=image_size,
                                     spatial_scale=spatial_scale, padding=padding)
    return _run("box_hypercolumn", args)


def normalise_box_hypercolumn(features, boxes, output_size, *, image_size=None, spatial_scale=None,
                              padding="border"):
    """Checked public arguments -> the compiled operator's arguments (see ``csrc/ops.cpp``)."""
    features = _check_features(_autocast_sampling(features))
    boxes = _check_boxes(boxes, features)
    output_height, output_width = _check_output_size(output_size)
    scale_y, scale_x = _check_scales(features, image_size, spatial_scale)
    return features, boxes, output_height, output_width, scale_y, scale_x, _check_padding(padding)


def fused_hypercolumn(features: Sequence[Tensor], boxes: Union[Tensor, Sequence[Tensor]], weights: Sequence[Tensor],
                      bias: Optional[Tensor] = None, *, output_size: Union[int, Tuple[int, int]] = (50, 50),
                      image_size: Optional[Sequence[int]] = None,
                      spatial_scale: Optional[Union[float, Sequence[float]]] = None, labels: Optional[Tensor] = None,
                      activation: Optional[str] = None, padding: str = "border") -> Tensor:
    """Location-weighted classification of box hypercolumns, without materialising them.

    Args:
        features: L >= 1 tensors ``(B, C_l, H_l, W_l)``.
        boxes: ``(R, 5)`` rows ``(batch_index, x1, y1, x2, y2)`` or a list of B tensors ``(R_b, 4)``.
        weights: one tensor per layer, ``(KK, M, C_l)`` or class-specific ``(NC, KK, M, C_l)``;
            ``KK = K * K`` classifier cells over the box, ``M`` outputs each.
        bias: None, ``(KK, M)``, ``(NC, KK, M)`` with labels, or ``(R, KK, M)`` per box.
        output_size: ``(oh, ow)`` grid per box.
        labels: ``(R,)`` int64 in ``[0, NC)``, exactly when the weights are class-specific.
        activation: None or ``"sigmoid"`` (applied per cell, before blending).
        image_size / spatial_scale / padding: as in :func:`sparse_hypercolumn`.

    Returns:
        ``(R, M, oh, ow)``: ``out(p) = sum_k alpha_k(p) * act(sum_l W_l[k] @ f_l(p) + b[k])`` with
        ``alpha`` the bilinear weights of the K x K cells at the grid point's place in its box.
    """
    args = normalise_fused_hypercolumn(features, boxes, weights, bias, output_size=output_size,
                                       image_size=image_size, spatial_scale=spatial_scale, labels=labels,
                                       activation=activation, padding=padding)
    return _run("fused_hypercolumn", args)


def normalise_fused_hypercolumn(features, boxes, weights, bias=None, *, output_size=(50, 50), image_size=None,
                                spatial_scale=None, labels=None, activation=None, padding="border"):
    """Checked public arguments -> the compiled operator's arguments (see ``csrc/ops.cpp``)."""
    features, weights, bias = _autocast_fused(features, weights, bias)
    features = _check_features(features)
    boxes = _check_boxes(boxes, features)
    output_height, output_width = _check_output_size(output_size)
    weights, classes, cells, outputs, class_specific = _check_weights(weights, features)
    count = boxes.shape[0]
    labels = _check_labels(labels, class_specific, count, classes, "R", features)
    bias = _check_bias(bias, labels, count, classes, cells, outputs, True, features)
    scale_y, scale_x = _check_scales(features, image_size, spatial_scale)
    orders = _orders(features, count * output_height * output_width, classes, cells, outputs)
    return (features, boxes, weights, bias, labels, output_height, output_width, scale_y, scale_x,
            _check_padding(padding), _check_activation(activation), orders)


def fused_hypercolumn_points(features: Sequence[Tensor], points: Tensor, weights: Sequence[Tensor],
                             bias: Optional[Tensor] = None, *, locations: Optional[Tensor] = None,
                             image_size: Optional[Sequence[int]] = None,
                             spatial_scale: Optional[Union[float, Sequence[float]]] = None,
                             labels: Optional[Tensor] = None, activation: Optional[str] = None,
                             padding: str = "border") -> Tensor:
    """Location-weighted classification of hypercolumns at arbitrary points.

    Args:
        features: L >= 1 tensors ``(B, C_l, H_l, W_l)``.
        points: ``(N, 3)`` rows ``(batch_index, x, y)`` in image pixels.
        weights: one tensor per layer, ``(KK, M, C_l)`` or ``(NC, KK, M, C_l)``.
        bias: None, ``(KK, M)``, or ``(NC, KK, M)`` with labels.
        locations: ``(N, 2)`` rows ``(u, v)`` in ``[0, 1]``, each point's place in its object
            box; required when K > 1.
        labels: ``(N,)`` int64 in ``[0, NC)``, exactly when the weights are class-specific.
        activation / image_size / spatial_scale / padding: as in :func:`fused_hypercolumn`.

    Returns:
        ``(N, M)``.
    """
    args = normalise_fused_hypercolumn_points(features, points, weights, bias, locations=locations,
                                              image_size=image_size, spatial_scale=spatial_scale, labels=labels,
                                              activation=activation, padding=padding)
    return _run("fused_hypercolumn_points", args)


def normalise_fused_hypercolumn_points(features, points, weights, bias=None, *, locations=None, image_size=None,
                                       spatial_scale=None, labels=None, activation=None, padding="border"):
    """Checked public arguments -> the compiled operator's arguments (see ``csrc/ops.cpp``)."""
    features, weights, bias = _autocast_fused(features, weights, bias)
    features = _check_features(features)
    points = _check_points(points, features)
    weights, classes, cells, outputs, class_specific = _check_weights(weights, features)
    count = points.shape[0]
    labels = _check_labels(labels, class_specific, count, classes, "N", features)
    bias = _check_bias(bias, labels, count, classes, cells, outputs, False, features)
    locations = _check_locations(locations, cells, count, features)
    scale_y, scale_x = _check_scales(features, image_size, spatial_scale)
    orders = _orders(features, count, classes, cells, outputs)
    return (features, points, locations, weights, bias, labels, scale_y, scale_x, _check_padding(padding),
            _check_activation(activation), orders)


if hasattr(torch.compiler, "is_exporting"):
    _is_exporting = torch.compiler.is_exporting
else:
    # torch.compiler.is_exporting came with torch 2.6. In torch 2.4 and 2.5, torch.export keeps
    # its flags in this module global while it runs (None otherwise); strict export, which is
    # their default, needs the answer (see _orders).
    import torch.export._trace as _export_trace

    def _is_exporting() -> bool:
        return getattr(_export_trace, "_EXPORT_FLAGS", None) is not None


def _concrete(num_points, shapes) -> bool:
    """Whether all these sizes are plain ints, not symbolic ones (a loop: a generator costs the
    host microseconds per call)."""
    if type(num_points) is not int:
        return False
    for shape in shapes:
        for size in shape:
            if type(size) is not int:
                return False
    return True


def _orders(features: List[Tensor], num_points: int, classes: int, cells: int, outputs: int) -> List[int]:
    shapes = [tuple(f.shape) for f in features]
    if not _concrete(num_points, shapes) or _is_exporting():
        # Symbolic sizes (traced with dynamic shapes): no choice may depend on them. Strict export
        # traces with Dynamo, where symbolic sizes look like ints: while exporting, never look.
        return [planning.many_points_order(shape[1], cells, outputs) for shape in shapes]
    plans = planning.plan_layers(shapes, num_points, classes, cells, outputs, features[0].device.type)
    return [plan.order for plan in plans]
