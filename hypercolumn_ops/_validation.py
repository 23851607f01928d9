"""The one argument check and normalisation path of the public operators, shared by every backend.

``normalise_<operator>(...)`` takes a public call's arguments and returns the compiled operator's
arguments (``csrc/ops.cpp``), which every backend (native, Triton, reference) takes: or raises a
``TypeError``/``ValueError`` that names the argument and what was expected (``docs/semantics.md``,
"Errors"). The kernels keep only the checks that guard memory (``csrc/checks.h``).
The extension's fast path (``csrc/fast_path.cpp``) normalises the common, valid calls the same
way in C++ and leaves every other call, and every error, to this module.

A call that the fast path declines runs this, so it is written for the host's time: plain loops,
exact-type tests before ``isinstance`` on abstract types, no tensor made where none is needed.
It must also trace under ``torch.compile(fullgraph=True)``, where sizes may be symbolic: no
``math`` function of a size, and checks of symbolic values through ``torch._check``.
"""

import contextlib
import functools
import math
import numbers
import threading
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _native, planning
from ._codes import ACTIVATIONS, PADDINGS
from .backends import native_available
from .reference import MAX_ADAPTIVE_SAMPLES as MAX_SAMPLES

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_AUTOCAST_DEVICES = ("cpu", "cuda")
# float32's largest finite value and smallest positive (subnormal) one: a spatial_scale outside
# them becomes inf or 0 in a float32 kernel.
_FLOAT32_MAX = 3.4028234663852886e38
_FLOAT32_TINY = 2.0 ** -149


# ----------------------------------------------------------------------------- value checks
#
# Batch indices and labels are checked by reading their values. On the CPU that costs a pass over
# them; on a GPU it is a synchronisation with the device, which stalls a training step until the
# queued work is done. So by default they are checked where no synchronisation is needed (CPU
# tensors) and not on CUDA tensors, where an invalid value gives NaN outputs and zero gradients
# (the kernels never read or write out of bounds). ``set_value_checks(True)`` checks everywhere,
# ``set_value_checks(False)`` nowhere. Under torch.compile and while a CUDA graph is being
# captured (neither can hold a synchronisation or a data-dependent branch) they are off.

_settings = threading.local()


def _device_type(value: Tensor) -> str:
    # A tensor's flags are read in a tenth of the time of its device object.
    return "cpu" if value.is_cpu else "cuda" if value.is_cuda else value.device.type


def _on_device(value: Tensor, first: Tensor) -> bool:
    """Whether ``value`` is on ``first``'s device."""
    return value.is_cpu if first.is_cpu else value.device == first.device


def _value_checks_mode() -> Optional[bool]:
    return getattr(_settings, "value_checks", None)


class set_value_checks:
    """Choose where the operators check the values of batch indices and labels.

    Args:
        enabled: ``None`` (the default): on CPU tensors only, so that no call synchronises with
            a GPU; ``True``: on every device (a CUDA call then waits for the device, to read the
            values back); ``False``: nowhere.

    Without the check an invalid batch index or label gives NaN outputs for its box or point and
    zero gradients; no kernel reads or writes out of bounds either way. The setting is per thread.
    Like ``torch.set_grad_enabled``, it takes effect when called and, used as a context manager,
    restores the previous setting on exit::

        with hypercolumn_ops.set_value_checks(False):
            out = hypercolumn_ops.fused_hypercolumn(...)
    """

    def __init__(self, enabled: Optional[bool]) -> None:
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"set_value_checks: expected None, True or False, got {enabled!r}")
        self.previous = _value_checks_mode()
        _settings.value_checks = enabled

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info) -> None:
        _settings.value_checks = self.previous


def _checking_values(values: Tensor) -> bool:
    """Whether to read the values of ``values`` now."""
    mode = _value_checks_mode()
    if mode is False or torch.compiler.is_compiling():
        return False
    if values.is_cpu:
        return True
    if mode is None:
        return False
    return not values.is_cuda or not torch.cuda.is_current_stream_capturing()


def _index_values_valid(values: Tensor, size: int) -> bool:
    """Whether every element of the 1-D ``values``, or of column 0 of the 2-D ``values``
    (coordinate rows), is an integer value in ``[0, size)`` (NaN is not). The compiled check is
    one pass: on the CPU called without the dispatcher (``_C.index_values_valid``), on CUDA one
    kernel and one synchronisation. Without it, an integer value in range equals its floor
    clamped to ``[0, size - 1]``."""
    if values.is_cpu and _native.BUILD_INFO is not None:  # the common case, without a lookup
        return _native._C.index_values_valid(values, size)
    device_type = _device_type(values)
    if native_available(device_type):
        return torch.ops.hypercolumn_ops.index_values_valid.default(values if values.dim() == 1 else values[:, 0],
                                                                    size)
    values = values if values.dim() == 1 else values[:, 0]
    floor = values.floor() if values.is_floating_point() else values
    return bool(values.eq(floor.clamp(0, size - 1)).all())


def _range_error(name: str, what: str, values: Tensor, size: int) -> ValueError:
    finite = values[torch.isfinite(values)] if values.is_floating_point() else values
    seen = f"values in [{finite.min().item()}, {finite.max().item()}]" if finite.numel() else "no finite values"
    return ValueError(f"{name}: {what} must hold integer values in [0, {size}), got {seen}")


# ----------------------------------------------------------------------------- autocast
#
# Inside a torch.autocast region of the features' device the operators follow autocast's policy
# for operators of their kind, then run the backend with autocast off, in the dtypes chosen:
# - the fused operators multiply features by classifier weights, as conv2d and linear do: the
#   floating features, weights and bias are cast to the autocast dtype (float16 or bfloat16);
# - sparse_hypercolumn and box_hypercolumn concatenate layers, as torch.cat does: features of
#   different dtypes are promoted to the widest of them.
# As in autocast, float64 is never cast down: a fused call with a float64 feature map runs in
# float64 (everything promoted to it). The casts are differentiable: the gradients of float32
# weights are float32.


def autocast_device(features) -> Optional[str]:
    """The device type of ``features`` if an autocast region of that device type is active."""
    if type(features) is not list and type(features) is not tuple:
        return None
    if not features or not isinstance(features[0], Tensor):
        return None
    first = features[0]
    device_type = "cpu" if first.is_cpu else "cuda" if first.is_cuda else None
    if device_type is None or not torch.is_autocast_enabled(device_type):
        return None
    return device_type


def without_autocast(device_type: str):
    """A context in which autocast is off for ``device_type`` (for a device type autocast does
    not know, a context that does nothing)."""
    if device_type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _cast_all(values, dtype: torch.dtype):
    return [v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v for v in values]


def _autocast_fused(device_type: Optional[str], features, weights, bias, box_bias):
    """(features, weights, bias, box_bias) in the dtype a fused operator runs in under autocast."""
    if device_type is None:
        return features, weights, bias, box_bias
    tensors = [f for f in features if isinstance(f, Tensor)]
    if any(f.dtype == torch.float64 for f in tensors):
        dtype = torch.float64
    else:
        dtype = torch.get_autocast_dtype(device_type) if hasattr(torch, "get_autocast_dtype") else (
            torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype())
    if isinstance(weights, (list, tuple)):
        weights = _cast_all(weights, dtype)
    bias, box_bias = _cast_all([bias, box_bias], dtype)
    return _cast_all(features, dtype), weights, bias, box_bias


def _autocast_sampling(device_type: Optional[str], features):
    """``features`` promoted to their widest floating dtype under autocast, else as given."""
    if device_type is None:
        return features
    dtypes = {f.dtype for f in features if isinstance(f, Tensor) and f.is_floating_point()}
    if len(dtypes) < 2:
        return features
    return _cast_all(features, functools.reduce(torch.promote_types, dtypes))


# ----------------------------------------------------------------------------- checks


def _type_name(value) -> str:
    return type(value).__name__


def check_features(features) -> List[Tensor]:
    """``features``: a list or tuple of L >= 1 floating tensors ``(B, C_l, H_l, W_l)`` with one
    dtype, device and batch size, and non-empty maps. -> a list."""
    if type(features) is not list:
        if isinstance(features, Tensor) or not isinstance(features, (list, tuple)):
            raise TypeError(f"features: expected a sequence (list or tuple) of 4-D tensors, got {_type_name(features)}")
        features = list(features)
    if not features:
        raise ValueError("features: expected at least one feature map, got an empty sequence")
    first = features[0]
    if not isinstance(first, Tensor):
        raise TypeError(f"features[0]: expected a tensor, got {_type_name(first)}")
    dtype = first.dtype
    if dtype not in _FLOATING:
        raise TypeError(f"features[0]: expected a floating dtype (float16, bfloat16, float32 or float64), got {dtype}")
    if first.dim() != 4:
        raise ValueError(f"features[0]: expected a 4-D tensor (B, C, H, W), got shape {tuple(first.shape)}")
    _, _, height, width = first.shape
    if height < 1 or width < 1:
        _feature_error(0, first, first)
    batch = first.shape[0]
    for index in range(1, len(features)):
        feature = features[index]
        if (not isinstance(feature, Tensor) or feature.dtype != dtype or not _on_device(feature, first)
                or feature.dim() != 4):
            _feature_error(index, feature, first)
        shape = feature.shape
        if shape[0] != batch or shape[2] < 1 or shape[3] < 1:
            _feature_error(index, feature, first)
    return features


def _feature_error(index: int, feature, first: Tensor):
    name = f"features[{index}]"
    if not isinstance(feature, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {_type_name(feature)}")
    if not feature.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32 or float64), got {feature.dtype}")
    if feature.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor (B, C, H, W), got shape {tuple(feature.shape)}")
    if feature.dtype != first.dtype:
        raise ValueError(f"{name}: dtype {feature.dtype} differs from features[0]'s {first.dtype}")
    if feature.device != first.device:
        raise ValueError(f"{name}: device {feature.device} differs from features[0]'s {first.device}")
    if feature.shape[0] != first.shape[0]:
        raise ValueError(f"{name}: batch size {feature.shape[0]} differs from features[0]'s {first.shape[0]}")
    raise ValueError(f"{name}: expected a non-empty map, got shape {tuple(feature.shape)}")


def coordinate_dtype(features: List[Tensor]) -> torch.dtype:
    """Coordinates are float64 for float64 features and float32 otherwise."""
    return torch.float64 if features[0].dtype == torch.float64 else torch.float32


def _check_coordinates(name: str, value, columns: int, rows_name: str, features: List[Tensor],
                       batch_column: bool = False) -> Tensor:
    """A floating ``(rows, columns)`` tensor on the features' device -> detached, in the
    coordinate dtype, contiguous. With ``batch_column``, column 0 holds batch indices: checked
    (where values are checked) before any rounding, and where float64 rows become float32, an
    index that is not an integer but rounds to one becomes NaN, an invalid row."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a tensor ({rows_name}, {columns}), got {_type_name(value)}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {value.dtype}")
    shape, first = value.shape, features[0]
    if len(shape) != 2 or shape[1] != columns:
        raise ValueError(f"{name}: expected shape ({rows_name}, {columns}), got {tuple(shape)}")
    if not _on_device(value, first):
        raise ValueError(f"{name}: device {value.device} differs from the features' {first.device}")
    if batch_column and shape[0] and _checking_values(value):
        batch = first.shape[0]
        if not _index_values_valid(value, batch):
            raise _range_error(name, "column 0 (batch index)", value[:, 0], batch)
    if value.requires_grad:  # coordinates are constants, on every backend
        value = value.detach()
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    if value.dtype != dtype:
        converted = value.to(dtype)
        if batch_column and value.dtype == torch.float64:
            exact = converted[:, 0].to(torch.float64) == value[:, 0]
            column = torch.where(exact, converted[:, 0], torch.full_like(converted[:, 0], float("nan")))
            converted = torch.cat([column[:, None], converted[:, 1:]], dim=1)
        value = converted
    return value if value.is_contiguous() else value.contiguous()


def check_points(points, features: List[Tensor]) -> Tensor:
    """``points``: ``(N, 3)`` rows ``(batch_index, x, y)``."""
    return _check_coordinates("points", points, 3, "N", features, batch_column=True)


def check_boxes(boxes, features: List[Tensor]) -> Tensor:
    """``boxes``: ``(R, 5)`` rows ``(batch_index, x1, y1, x2, y2)``, or a list or tuple of at most
    B tensors ``(R_b, 4)`` (image b's boxes, as torchvision takes them) -> ``(R, 5)``."""
    if isinstance(boxes, Tensor):
        return _check_coordinates("boxes", boxes, 5, "R", features, batch_column=True)
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"boxes: expected a tensor (R, 5) or a list of tensors (R_b, 4), got {_type_name(boxes)}")
    batch = features[0].shape[0]
    if len(boxes) > batch:
        raise ValueError(f"boxes: got a list of {len(boxes)} tensors for a batch of {batch} images")
    rows = []
    for index, per_image in enumerate(boxes):
        per_image = _check_coordinates(f"boxes[{index}]", per_image, 4, "R_b", features)
        rows.append(torch.cat([torch.full_like(per_image[:, :1], index), per_image], dim=1))
    if not rows:
        return torch.zeros(0, 5, dtype=coordinate_dtype(features), device=features[0].device)
    return torch.cat(rows)


def _is_int(value) -> bool:
    return type(value) is int or isinstance(value, torch.SymInt) or (
        isinstance(value, numbers.Integral) and not isinstance(value, bool))


def check_scales(features: List[Tensor], image_size, spatial_scale) -> Tuple[list, List[float]]:
    """Exactly one of ``image_size = (H, W)`` (positive ints, symbolic ones too) and
    ``spatial_scale`` (one positive float, or one per layer) -> ``(image_size, spatial_scale)``
    as the compiled operators take them: a list of 2 ints and an empty list, or the reverse."""
    if image_size is None:
        if spatial_scale is None:
            raise ValueError("image_size, spatial_scale: give exactly one of the two (got neither)")
        return [], _check_spatial_scale(features, spatial_scale)
    if spatial_scale is not None:
        raise ValueError("image_size, spatial_scale: give exactly one of the two (got image_size="
                         f"{image_size!r} and spatial_scale={spatial_scale!r})")
    if type(image_size) in (tuple, list) and len(image_size) == 2:
        height, width = image_size
        if type(height) is int and type(width) is int and height > 0 and width > 0:
            return [height, width], []  # the common case
    if isinstance(image_size, (str, bytes, Tensor)) or not isinstance(image_size, Sequence) or len(image_size) != 2:
        raise ValueError(f"image_size: expected (H, W), two positive ints, got {image_size!r}")
    size = []
    for value in image_size:
        if not _is_int(value):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ValueError(f"image_size: expected (H, W), two positive ints, got {image_size!r}")
        if isinstance(value, torch.SymInt):
            torch._check(value > 0, lambda: "image_size: expected positive sizes")
        elif value < 1:
            raise ValueError(f"image_size: expected positive sizes, got {tuple(image_size)!r}")
        size.append(value)
    return size, []


def _is_real(value) -> bool:
    return type(value) is float or type(value) is int or (
        isinstance(value, numbers.Real) and not isinstance(value, (bool, Tensor)))


def _check_spatial_scale(features: List[Tensor], spatial_scale) -> List[float]:
    layers = len(features)
    if type(spatial_scale) is float and _FLOAT32_TINY <= spatial_scale <= _FLOAT32_MAX:
        return [spatial_scale] * layers  # the common case, valid for every dtype
    if _is_real(spatial_scale):
        scales = [float(spatial_scale)] * layers
    elif isinstance(spatial_scale, (str, bytes, Tensor)) or not isinstance(spatial_scale, Sequence):
        raise TypeError(f"spatial_scale: expected a float or a sequence of one float per layer, "
                        f"got {_type_name(spatial_scale)}")
    else:
        if len(spatial_scale) != layers:
            raise ValueError(f"spatial_scale: expected one float or one per layer ({layers}), got {len(spatial_scale)}")
        for value in spatial_scale:
            if not _is_real(value):
                raise TypeError(f"spatial_scale: expected floats, got {value!r} ({_type_name(value)})")
        scales = [float(s) for s in spatial_scale]
    for s in scales:
        if not (s > 0 and math.isfinite(s)):
            raise ValueError(f"spatial_scale: expected positive finite scales, got {scales}")
    if features[0].dtype != torch.float64:
        for s in scales:
            if not _FLOAT32_TINY <= s <= _FLOAT32_MAX:
                raise ValueError(f"spatial_scale: {s} is outside float32's range, in which the kernels compute "
                                 f"{features[0].dtype} features")
    return scales


def check_padding(padding) -> int:
    code = PADDINGS.get(padding) if type(padding) is str else None
    if code is None:
        raise ValueError(f"padding: expected 'border', 'zeros' or 'zeros_per_tap', got {padding!r}")
    return code


def check_activation(activation) -> int:
    code = ACTIVATIONS.get(activation) if activation is None or type(activation) is str else None
    if code is None:
        raise ValueError(f"activation: expected None or 'sigmoid', got {activation!r}")
    return code


def check_output_size(output_size) -> Tuple[int, int]:
    if type(output_size) is tuple and len(output_size) == 2:
        height, width = output_size
        if type(height) is int and type(width) is int and height > 0 and width > 0:
            return output_size  # the common case
    if _is_int(output_size):
        output_size = (output_size, output_size)
    if (not isinstance(output_size, (list, tuple)) or len(output_size) != 2
            or not _is_int(output_size[0]) or not _is_int(output_size[1])):
        raise ValueError(f"output_size: expected an int or a pair of ints (oh, ow), got {output_size!r}")
    if output_size[0] < 1 or output_size[1] < 1:
        raise ValueError(f"output_size: expected positive sizes, got {tuple(output_size)}")
    return int(output_size[0]), int(output_size[1])


def check_sampling(sampling_ratio, aligned) -> Tuple[int, bool]:
    """``sampling_ratio``: an int, samples per axis of an output cell (adaptive where <= 0), at
    most ``MAX_SAMPLES``; ``aligned``: a bool, as ``torchvision.ops.roi_align``'s."""
    if not _is_int(sampling_ratio):
        raise TypeError(f"sampling_ratio: expected an int, got {sampling_ratio!r}")
    if sampling_ratio > MAX_SAMPLES:
        raise ValueError(f"sampling_ratio: expected at most {MAX_SAMPLES} samples per axis of a cell, "
                         f"got {sampling_ratio}")
    if not isinstance(aligned, bool):
        raise TypeError(f"aligned: expected a bool, got {aligned!r}")
    return int(sampling_ratio), aligned


def _perfect_square(cells) -> bool:
    if isinstance(cells, torch.SymInt):
        # A symbolic cell count (weights that are not parameters, traced with dynamic shapes):
        # the kernels check it where it is known; here it would take a guard per candidate.
        return True
    grid = math.isqrt(cells)
    return grid * grid == cells


def check_weights(weights, features: List[Tensor]) -> Tuple[List[Tensor], int, int, int, bool]:
    """``weights``: one tensor per layer, ``(KK, M, C_l)`` or class-specific ``(NC, KK, M, C_l)``
    -> (weights as ``(NC, KK, M, C_l)``, NC, KK, M, class_specific)."""
    if type(weights) is not list and type(weights) is not tuple:
        if isinstance(weights, Tensor) or not isinstance(weights, (list, tuple)):
            raise TypeError(f"weights: expected a sequence of one tensor per layer, got {_type_name(weights)}")
    if len(weights) != len(features):
        raise ValueError(f"weights: expected one tensor per layer ({len(features)}), got {len(weights)}")
    dtype, feature = features[0].dtype, features[0]
    first = weights[0]
    if not isinstance(first, Tensor):
        raise TypeError(f"weights[0]: expected a tensor, got {_type_name(first)}")
    lead = first.shape
    rank = len(lead)
    if rank != 3 and rank != 4:
        raise ValueError(f"weights[0]: expected (KK, M, C_l) or (NC, KK, M, C_l), got shape {tuple(lead)}")
    lead = lead[:-1]
    normalised = []
    for index, weight in enumerate(weights):
        if (not isinstance(weight, Tensor) or weight.dtype != dtype or not _on_device(weight, feature)
                or weight.dim() != rank):
            _weight_error(index, weight, features, rank)
        shape = weight.shape
        if shape[-1] != features[index].shape[1] or (index and shape[:-1] != lead):
            _weight_error(index, weight, features, rank)
        normalised.append(weight if rank == 4 else weight.unsqueeze(0))
    classes, cells, outputs = lead if rank == 4 else (1, *lead)
    if cells < 1 or not _perfect_square(cells):
        raise ValueError(f"weights: KK = {cells} classifier cells is not a perfect square K * K")
    if outputs < 1 or classes < 1:
        raise ValueError(f"weights: expected M >= 1 outputs and NC >= 1 classes, got M = {outputs}, NC = {classes}")
    return normalised, classes, cells, outputs, rank == 4


def _weight_error(index: int, weight, features: List[Tensor], rank: int):
    name = f"weights[{index}]"
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {_type_name(weight)}")
    if weight.dtype != features[0].dtype:
        raise TypeError(f"{name}: dtype {weight.dtype} differs from the features' {features[0].dtype}")
    if weight.device != features[0].device:
        raise ValueError(f"{name}: device {weight.device} differs from the features' {features[0].device}")
    if weight.dim() != rank:
        raise ValueError(f"{name}: rank {weight.dim()} differs from weights[0]'s {rank}")
    channels = features[index].shape[1]
    if weight.shape[-1] != channels:
        raise ValueError(f"{name}: expected C_l = {channels} channels (features[{index}]), got {weight.shape[-1]}")
    lead = "(KK, M)" if rank == 3 else "(NC, KK, M)"
    raise ValueError(f"{name}: {lead} = {tuple(weight.shape[:-1])} differs from weights[0]'s")


def check_labels(labels, class_specific: bool, count: int, classes: int, rows: str,
                 features: List[Tensor]) -> Optional[Tensor]:
    """``labels``: ``(count,)`` int64 in ``[0, NC)``, given exactly with class-specific weights."""
    if not class_specific:
        if labels is not None:
            raise ValueError("labels: given, but the weights are not class-specific (NC, KK, M, C_l)")
        return None
    if labels is None:
        raise ValueError("labels: required with class-specific weights (NC, KK, M, C_l)")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels: expected an int64 tensor, got {_type_name(labels)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels: expected dtype int64, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != count:
        raise ValueError(f"labels: expected shape ({rows},) = ({count},), got {tuple(labels.shape)}")
    if not _on_device(labels, features[0]):
        raise ValueError(f"labels: device {labels.device} differs from the features' {features[0].device}")
    if count and _checking_values(labels) and not _index_values_valid(labels, classes):
        raise _range_error("labels", "labels", labels, classes)
    return labels if labels.is_contiguous() else labels.contiguous()


def _check_term(name: str, value, features: List[Tensor]) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {_type_name(value)}")
    if value.dtype != features[0].dtype:
        raise TypeError(f"{name}: dtype {value.dtype} differs from the features' {features[0].dtype}")
    if not _on_device(value, features[0]):
        raise ValueError(f"{name}: device {value.device} differs from the features' {features[0].device}")


def check_bias(bias, box_bias, labels: Optional[Tensor], count: int, classes: int, cells: int, outputs: int,
               rows: str, features: List[Tensor]) -> Optional[Tensor]:
    """``bias``: None, ``(KK, M)``, ``(NC, KK, M)`` with labels, or (boxes, no labels)
    ``(R, KK, M)``; ``box_bias``: None or ``(count, KK, M)``, a per-box (or per-point) term added
    to it, with or without labels -> bias rows ``(count, KK, M)`` (a stride-0 view where shared),
    or None."""
    term = None
    if bias is not None:
        _check_term("bias", bias, features)
        shape = bias.shape
        if len(shape) == 2 and shape[0] == cells and shape[1] == outputs:
            term = bias.expand(count, cells, outputs)
        elif labels is not None and len(shape) == 3 and tuple(shape) == (classes, cells, outputs):
            # Clamped: with value checks off an invalid label must not index out of range here;
            # its rows get NaN outputs in the kernels whatever bias row they carry.
            term = bias[labels.clamp(0, classes - 1)]
        elif labels is None and rows == "R" and len(shape) == 3 and tuple(shape) == (count, cells, outputs):
            term = bias
        else:
            expected = [f"(KK, M) = {(cells, outputs)}"]
            if labels is not None:
                expected.append(f"(NC, KK, M) = {(classes, cells, outputs)}")
            elif rows == "R":
                expected.append(f"(R, KK, M) = {(count, cells, outputs)} (or box_bias, with labels too)")
            raise ValueError(f"bias: expected shape {' or '.join(expected)}, got {tuple(shape)}")
    if box_bias is None:
        return term
    _check_term("box_bias", box_bias, features)
    if tuple(box_bias.shape) != (count, cells, outputs):
        raise ValueError(f"box_bias: expected shape ({rows}, KK, M) = {(count, cells, outputs)}, "
                         f"got {tuple(box_bias.shape)}")
    return box_bias if term is None else term + box_bias


def check_locations(locations, cells: int, count: int, features: List[Tensor]) -> Optional[Tensor]:
    if locations is None:
        if cells > 1:
            raise ValueError(f"locations: required when K > 1 (got KK = {cells} classifier cells)")
        return None
    locations = _check_coordinates("locations", locations, 2, "N", features)
    if locations.shape[0] != count:
        raise ValueError(f"locations: expected {count} rows (one per point), got {locations.shape[0]}")
    return locations


# ----------------------------------------------------------------------------- evaluation orders


if hasattr(torch.compiler, "is_exporting"):
    _is_exporting = torch.compiler.is_exporting
else:
    # torch.compiler.is_exporting came with torch 2.6. In torch 2.4 and 2.5, torch.export keeps
    # its flags in this module global while it runs (None otherwise); strict export, which is
    # their default, needs the answer (see _orders).
    import torch.export._trace as _export_trace

    def _is_exporting() -> bool:
        return getattr(_export_trace, "_EXPORT_FLAGS", None) is not None


def _orders(features: List[Tensor], num_points, classes: int, cells: int, outputs: int,
            samples: int = 1) -> List[int]:
    if torch.compiler.is_compiling() or _is_exporting():
        # Traced sizes may be symbolic, and Dynamo shows symbolic sizes as ints: a choice made
        # from them would be a guard on them (a recompilation whenever the cheaper order flips) or
        # a constraint that export refuses. Both orders are exact, so traced graphs take the order
        # the estimates reach as points grow.
        return [planning.many_points_order(f.shape[1], cells, outputs, samples) for f in features]
    return list(_planned_orders(tuple([f.shape for f in features]), num_points, classes, cells, outputs,
                                _device_type(features[0]), samples))


@functools.lru_cache(maxsize=4096)
def _planned_orders(shapes, num_points: int, classes: int, cells: int, outputs: int, device_type: str,
                    samples: int) -> Tuple[int, ...]:
    # A model calls with a few shapes over and over: the planner once per shape.
    return tuple(planning.layer_orders(shapes, num_points, classes, cells, outputs, device_type, samples))


def _expected_samples(sampling_ratio: int) -> int:
    """Samples per output cell the cost model counts: ``sampling_ratio ** 2``, and for adaptive
    sampling (which depends on each box's size) 4, torchvision's detection heads' typical count."""
    return sampling_ratio * sampling_ratio if sampling_ratio > 0 else 4


# ----------------------------------------------------------------------------- operators


def normalise_sparse_hypercolumn(features, points, *, image_size=None, spatial_scale=None, padding="border",
                                 autocast=None):
    """Checked public arguments -> ``(features, points, image_size, spatial_scale, padding)``."""
    features = check_features(_autocast_sampling(autocast, features))
    points = check_points(points, features)
    image_size, spatial_scale = check_scales(features, image_size, spatial_scale)
    return features, points, image_size, spatial_scale, check_padding(padding)


def normalise_box_hypercolumn(features, boxes, output_size, *, image_size=None, spatial_scale=None,
                              padding="border", sampling_ratio=1, aligned=True, autocast=None):
    """Checked public arguments -> ``(features, boxes, oh, ow, image_size, spatial_scale, padding,
    sampling_ratio, aligned)``."""
    features = check_features(_autocast_sampling(autocast, features))
    boxes = check_boxes(boxes, features)
    output_height, output_width = check_output_size(output_size)
    image_size, spatial_scale = check_scales(features, image_size, spatial_scale)
    sampling_ratio, aligned = check_sampling(sampling_ratio, aligned)
    return (features, boxes, output_height, output_width, image_size, spatial_scale, check_padding(padding),
            sampling_ratio, aligned)


def normalise_fused_hypercolumn(features, boxes, weights, bias=None, *, output_size=(50, 50), image_size=None,
                                spatial_scale=None, labels=None, activation=None, padding="border",
                                sampling_ratio=1, aligned=True, box_bias=None, autocast=None):
    """Checked public arguments -> ``(features, boxes, weights, bias, labels, oh, ow, image_size,
    spatial_scale, padding, activation, orders, sampling_ratio, aligned)``."""
    features, weights, bias, box_bias = _autocast_fused(autocast, features, weights, bias, box_bias)
    features = check_features(features)
    boxes = check_boxes(boxes, features)
    output_height, output_width = check_output_size(output_size)
    weights, classes, cells, outputs, class_specific = check_weights(weights, features)
    count = boxes.shape[0]
    labels = check_labels(labels, class_specific, count, classes, "R", features)
    bias = check_bias(bias, box_bias, labels, count, classes, cells, outputs, "R", features)
    image_size, spatial_scale = check_scales(features, image_size, spatial_scale)
    sampling_ratio, aligned = check_sampling(sampling_ratio, aligned)
    orders = _orders(features, count * output_height * output_width, classes, cells, outputs,
                     _expected_samples(sampling_ratio))
    return (features, boxes, weights, bias, labels, output_height, output_width, image_size, spatial_scale,
            check_padding(padding), check_activation(activation), orders, sampling_ratio, aligned)


def normalise_fused_hypercolumn_points(features, points, weights, bias=None, *, locations=None, image_size=None,
                                       spatial_scale=None, labels=None, activation=None, padding="border",
                                       box_bias=None, autocast=None):
    """Checked public arguments -> ``(features, points, locations, weights, bias, labels,
    image_size, spatial_scale, padding, activation, orders)``."""
    features, weights, bias, box_bias = _autocast_fused(autocast, features, weights, bias, box_bias)
    features = check_features(features)
    points = check_points(points, features)
    weights, classes, cells, outputs, class_specific = check_weights(weights, features)
    count = points.shape[0]
    labels = check_labels(labels, class_specific, count, classes, "N", features)
    bias = check_bias(bias, box_bias, labels, count, classes, cells, outputs, "N", features)
    locations = check_locations(locations, cells, count, features)
    image_size, spatial_scale = check_scales(features, image_size, spatial_scale)
    orders = _orders(features, count, classes, cells, outputs)
    return (features, points, locations, weights, bias, labels, image_size, spatial_scale, check_padding(padding),
            check_activation(activation), orders)
