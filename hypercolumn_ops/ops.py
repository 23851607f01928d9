"""The public operators: each checks and normalises its arguments (``_validation``, one path for
every backend), then runs the backend for the features' device (``backends``).

Where the compiled extension is built, a call first tries its fast path (``csrc/fast_path.cpp``):
when every argument has the common form, it normalises them as ``_validation`` does and calls the
native operator from C++, for a fraction of the host time; otherwise (any other form, an invalid
value, another backend forced, tracing by torch.compile) the call takes the path below.

The semantics are those of ``docs/semantics.md``. Coordinates are continuous, in pixels of the
image the network saw: pixel ``i`` covers ``[i, i + 1)``. Layer ``l`` of shape ``(H_l, W_l)``
samples image point ``(x, y)`` at feature coordinate ``(x * sx - 0.5, y * sy - 0.5)`` with
``sy = H_l / H``, ``sx = W_l / W`` (from ``image_size = (H, W)``) or ``sx = sy = spatial_scale[l]``,
bilinearly.

Inside ``torch.autocast`` the fused operators run in the autocast dtype and the sampling
operators promote mixed features to the widest dtype (see ``_validation``, "autocast").
"""

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._validation import (_orders, autocast_device, normalise_box_hypercolumn,  # noqa: F401
                          normalise_fused_hypercolumn, normalise_fused_hypercolumn_points,
                          normalise_sparse_hypercolumn, set_value_checks, without_autocast)
from . import _native
from ._validation import _value_checks_mode
from .backends import _local as _backends_local
from .backends import backend_module

Scale = Optional[Union[float, Sequence[float]]]
Size = Optional[Sequence[int]]


# The extension's module, whose fast_<operator> functions return the output, or None where the call
# must take the Python path.
_FAST = _native._C


def _fast_path_open() -> bool:
    """Whether a call may try the fast path: the extension is built, no backend other than the
    native one is forced in this thread, and torch.compile is not tracing the call."""
    if _FAST is None or torch.compiler.is_compiling():
        return False
    forced = getattr(_backends_local, "forced", None)
    return not forced or forced[-1] == "native"


def _run(name: str, args: tuple, autocast: Optional[str]) -> Tensor:
    """Operator ``name`` of the backend for the features' device, on normalised ``args``; inside
    an autocast region, with autocast off for that device, so that no product inside a backend
    is autocast (the dtypes were chosen by the normalisation)."""
    operator = backend_module(args[0][0])[name]
    if autocast is None:
        return operator(*args)
    with without_autocast(autocast):
        return operator(*args)


def sparse_hypercolumn(features: Sequence[Tensor], points: Tensor, *, image_size: Size = None,
                       spatial_scale: Scale = None, padding: str = "border") -> Tensor:
    """Hypercolumns at arbitrary points.

    Args:
        features: L >= 1 tensors ``(B, C_l, H_l, W_l)``, one floating dtype and device.
        points: ``(N, 3)`` rows ``(batch_index, x, y)``, in image pixels.
        image_size: ``(H, W)`` of the image the network saw (ints, symbolic ones too); or
        spatial_scale: one float or one per layer (feature pixels per image pixel).
        padding: ``"border"`` (clamp to the map, as ``grid_sample(padding_mode="border")``),
            ``"zeros"`` (0 beyond one pixel outside, as ``roi_align``) or ``"zeros_per_tap"``
            (each bilinear tap outside the map counts 0, as ``grid_sample(padding_mode="zeros")``).

    Returns:
        ``(N, sum C_l)``: for each point, every layer bilinearly sampled at
        ``(x * sx - 0.5, y * sy - 0.5)``, concatenated in layer order.

    Raises:
        TypeError, ValueError: a bad argument, before any kernel runs; the message names it
            (``docs/semantics.md``, "Errors").
    """
    if _fast_path_open():
        out = _FAST.fast_sparse_hypercolumn(features, points, image_size, spatial_scale, padding, _value_checks_mode())
        if out is not None:
            return out
    autocast = autocast_device(features)
    args = normalise_sparse_hypercolumn(features, points, image_size=image_size, spatial_scale=spatial_scale,
                                        padding=padding, autocast=autocast)
    return _run("sparse_hypercolumn", args, autocast)


def box_hypercolumn(features: Sequence[Tensor], boxes: Union[Tensor, Sequence[Tensor]],
                    output_size: Union[int, Tuple[int, int]], *, image_size: Size = None,
                    spatial_scale: Scale = None, padding: str = "border", sampling_ratio: int = 1,
                    aligned: bool = True) -> Tensor:
    """Hypercolumns on an ``oh x ow`` grid inside each box.

    Args:
        features: L >= 1 tensors ``(B, C_l, H_l, W_l)``.
        boxes: ``(R, 5)`` rows ``(batch_index, x1, y1, x2, y2)``, or a list of B tensors
            ``(R_b, 4)`` as in torchvision; image pixels.
        output_size: ``(oh, ow)`` or one int; output cell ``(i, j)`` is centred at
            ``(x1 + (j + 0.5) * (x2 - x1) / ow, y1 + (i + 0.5) * (y2 - y1) / oh)``.
        image_size: ``(H, W)`` of the image the network saw; or
        spatial_scale: one float or one per layer (feature pixels per image pixel).
        padding: ``"border"``, ``"zeros"`` or ``"zeros_per_tap"``, as in :func:`sparse_hypercolumn`.
        sampling_ratio: bilinear samples per axis averaged in each output cell, as
            ``torchvision.ops.roi_align``'s: ``r > 0`` takes ``r x r``; ``r <= 0`` takes
            ``ceil(box height / oh) x ceil(box width / ow)`` per box and layer (box sizes in that
            layer's feature pixels).
        aligned: ``True`` (default) samples at feature coordinate ``x * sx - 0.5`` (pixel
            centres, as ``roi_align(aligned=True)``); ``False`` at ``x * sx``, with boxes at least
            one feature pixel wide and high, as ``roi_align(aligned=False)``.

    Returns:
        ``(R, sum C_l, oh, ow)``. With one layer and ``padding="zeros"`` this is
        ``roi_align(features[0], boxes, (oh, ow), spatial_scale, sampling_ratio, aligned)``.

    Raises:
        TypeError, ValueError: a bad argument, before any kernel runs; the message names it
            (``docs/semantics.md``, "Errors").
    """
    if _fast_path_open():
        out = _FAST.fast_box_hypercolumn(features, boxes, output_size, image_size, spatial_scale, padding,
                                         sampling_ratio, aligned, _value_checks_mode())
        if out is not None:
            return out
    autocast = autocast_device(features)
    args = normalise_box_hypercolumn(features, boxes, output_size, image_size=image_size, spatial_scale=spatial_scale,
                                     padding=padding, sampling_ratio=sampling_ratio, aligned=aligned,
                                     autocast=autocast)
    return _run("box_hypercolumn", args, autocast)


def fused_hypercolumn(features: Sequence[Tensor], boxes: Union[Tensor, Sequence[Tensor]], weights: Sequence[Tensor],
                      bias: Optional[Tensor] = None, *, output_size: Union[int, Tuple[int, int]] = (50, 50),
                      image_size: Size = None, spatial_scale: Scale = None, labels: Optional[Tensor] = None,
                      activation: Optional[str] = None, padding: str = "border", sampling_ratio: int = 1,
                      aligned: bool = True, box_bias: Optional[Tensor] = None) -> Tensor:
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
        image_size: ``(H, W)`` of the image the network saw; or
        spatial_scale: one float or one per layer (feature pixels per image pixel).
        padding: ``"border"``, ``"zeros"`` or ``"zeros_per_tap"``, as in :func:`sparse_hypercolumn`.
        sampling_ratio: samples per axis of an output cell, as in :func:`box_hypercolumn`.
        aligned: the half-pixel shift, as in :func:`box_hypercolumn`. The location weights are
            those of the output cell's place in its box, whatever the sampling.
        box_bias: None or ``(R, KK, M)``: a per-box term (the paper's per-box fc7 scores), added to
            ``bias`` (whichever form, with or without labels).

    Returns:
        ``(R, M, oh, ow)``: ``out(p) = sum_k alpha_k(p) * act(sum_l W_l[k] @ f_l(p) + b[k])`` with
        ``alpha`` the bilinear weights of the K x K cells at the grid point's place in its box.

    Raises:
        TypeError, ValueError: a bad argument, before any kernel runs; the message names it
            (``docs/semantics.md``, "Errors").
    """
    if _fast_path_open():
        out = _FAST.fast_fused_hypercolumn(features, boxes, weights, bias, output_size, image_size, spatial_scale,
                                           labels, activation, padding, sampling_ratio, aligned, box_bias,
                                           _value_checks_mode())
        if out is not None:
            return out
    autocast = autocast_device(features)
    args = normalise_fused_hypercolumn(features, boxes, weights, bias, output_size=output_size, image_size=image_size,
                                       spatial_scale=spatial_scale, labels=labels, activation=activation,
                                       padding=padding, sampling_ratio=sampling_ratio, aligned=aligned,
                                       box_bias=box_bias, autocast=autocast)
    return _run("fused_hypercolumn", args, autocast)


def fused_hypercolumn_points(features: Sequence[Tensor], points: Tensor, weights: Sequence[Tensor],
                             bias: Optional[Tensor] = None, *, locations: Optional[Tensor] = None,
                             image_size: Size = None, spatial_scale: Scale = None, labels: Optional[Tensor] = None,
                             activation: Optional[str] = None, padding: str = "border",
                             box_bias: Optional[Tensor] = None) -> Tensor:
    """Location-weighted classification of hypercolumns at arbitrary points.

    Args:
        features: L >= 1 tensors ``(B, C_l, H_l, W_l)``.
        points: ``(N, 3)`` rows ``(batch_index, x, y)`` in image pixels.
        weights: one tensor per layer, ``(KK, M, C_l)`` or ``(NC, KK, M, C_l)``.
        bias: None, ``(KK, M)``, or ``(NC, KK, M)`` with labels.
        locations: ``(N, 2)`` rows ``(u, v)`` in ``[0, 1]``, each point's place in its object
            box; required when K > 1.
        labels: ``(N,)`` int64 in ``[0, NC)``, exactly when the weights are class-specific.
        image_size: ``(H, W)`` of the image the network saw; or
        spatial_scale: one float or one per layer (feature pixels per image pixel).
        activation: None or ``"sigmoid"`` (applied per cell, before blending).
        padding: ``"border"``, ``"zeros"`` or ``"zeros_per_tap"``, as in :func:`sparse_hypercolumn`.
        box_bias: None or ``(N, KK, M)``: a per-point term (its box's), added to ``bias``.

    Returns:
        ``(N, M)``: ``out(p) = sum_k alpha_k(p) * act(sum_l W_l[k] @ f_l(p) + b[k])``, with
        ``alpha`` the bilinear weights of the K x K cells at the point's ``locations`` row
        (1 when K = 1).

    Raises:
        TypeError, ValueError: a bad argument, before any kernel runs; the message names it
            (``docs/semantics.md``, "Errors").
    """
    if _fast_path_open():
        out = _FAST.fast_fused_hypercolumn_points(features, points, weights, bias, locations, image_size,
                                                  spatial_scale, labels, activation, padding, box_bias,
                                                  _value_checks_mode())
        if out is not None:
            return out
    autocast = autocast_device(features)
    args = normalise_fused_hypercolumn_points(features, points, weights, bias, locations=locations,
                                              image_size=image_size, spatial_scale=spatial_scale, labels=labels,
                                              activation=activation, padding=padding, box_bias=box_bias,
                                              autocast=autocast)
    return _run("fused_hypercolumn_points", args, autocast)
