"""Baselines: the ways hypercolumns are computed without this package, for tests and benchmarks.

Each takes the public operators' arguments (checked and normalised by the same code, so a bad
argument raises the same error) and computes the result with stock PyTorch / torchvision ops:

- ``naive_*``: the paper's recipe taken literally: every layer upsampled to image size with
  ``F.interpolate(mode="bilinear", align_corners=False)``, concatenated into the image-size
  hypercolumn ``(B, sum C_l, H, W)``, then that image sampled bilinearly at the points or box
  grids. Padding ``"border"`` only (interpolation clamps to the map).
- ``roi_align_concat``: per-layer ``torchvision.ops.roi_align(aligned=True, sampling_ratio=1)``,
  concatenated ``(R, sum C_l, oh, ow)``, then classified. Padding ``"zeros"`` only.
- ``classify_then_sample``: per-layer 1x1 convolution to score maps, ``roi_align`` of the scores,
  summed over layers. Padding ``"zeros"`` only.
- ``grid_sample_points`` / ``grid_sample_fused_points``: PointRend's ``point_sample``: per-layer
  ``F.grid_sample(align_corners=False)`` at the points, concatenated. Padding ``"border"`` only.

For points inside the image (``0 <= x <= W``, ``0 <= y <= H``) both paddings give the same values,
so every baseline computes the operators there. Unlike the package's kernels these materialise
large intermediates; each docstring says which. Half-precision inputs are computed in float32 and
the result cast back, as ``torch.autocast`` runs ``roi_align`` and ``grid_sample`` (and CPU
``roi_align`` has no bfloat16 kernel); the float32 copies of the layers count in their memory.
"""

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from . import ops
from ._codes import ACTIVATION_SIGMOID, PADDING_BORDER, PADDING_ZEROS
from .reference import accumulation_dtype, box_grid_points, classify, layer_scales, location_weights

Scale = Optional[Union[float, Sequence[float]]]


def _require_padding(name: str, padding: int, supported: int) -> None:
    if padding != supported:
        wanted = "border" if supported == PADDING_BORDER else "zeros"
        raise ValueError(f"padding: {name} implements padding={wanted!r} only")


def _compute_in(dtype: torch.dtype, tensors: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """The tensors cast to the compute dtype (differentiably; None stays None)."""
    return [None if t is None else t.to(dtype) for t in tensors]


def _scaled_boxes(boxes: Tensor, scale_y: float, scale_x: float, dtype: torch.dtype) -> Tensor:
    """Boxes ``(R, 5)`` in the feature pixels of one layer, so that ``roi_align`` runs with
    ``spatial_scale=1`` also where the two axes scale differently."""
    scaled = boxes.clone()  # scaled in place, not by a tensor of scales: no copy from the host
    scaled[:, 1::2] *= scale_x
    scaled[:, 2::2] *= scale_y
    return scaled.to(dtype)


def _roi_align_grid(feature: Tensor, boxes: Tensor, output_height: int, output_width: int, scale_y: float,
                    scale_x: float, sampling_ratio: int = 1, aligned: bool = True) -> Tensor:
    """``roi_align`` of every box on one layer: ``(R, C, oh, ow)``, padding ``"zeros"``; by default
    one bilinear sample per grid point. The boxes are scaled to the layer's feature pixels first,
    which is ``roi_align``'s own ``spatial_scale`` where the two axes share it."""
    return roi_align(feature, _scaled_boxes(boxes, scale_y, scale_x, feature.dtype), (output_height, output_width),
                     spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=aligned)


def _grid_cell_weights(output_height: int, output_width: int, cells: int, dtype: torch.dtype,
                       device: torch.device) -> Tensor:
    """Location weights ``alpha`` ``(oh * ow, KK)`` of the grid points of any box (row-major)."""
    grid = int(round(cells ** 0.5))
    anchor = torch.zeros(1, 5, dtype=torch.float64, device=device)
    _, _, _, u, v = box_grid_points(anchor, output_height, output_width)
    return location_weights(u, v, grid).to(dtype)


def _blend_box_scores(scores: Tensor, bias: Optional[Tensor], activation: int, output_height: int,
                      output_width: int) -> Tensor:
    """Per-cell scores ``(R, KK, M, oh * ow)`` (+ bias rows ``(R, KK, M)``), activation per cell,
    blended with the location weights -> ``(R, M, oh, ow)``."""
    if bias is not None:
        scores = scores + bias[..., None].to(scores.dtype)
    if activation == ACTIVATION_SIGMOID:
        scores = torch.sigmoid(scores)
    alpha = _grid_cell_weights(output_height, output_width, scores.shape[1], scores.dtype, scores.device)
    out = torch.einsum("rkmp,pk->rmp", scores, alpha)
    return out.reshape(scores.shape[0], scores.shape[2], output_height, output_width)


def _classify_box_columns(columns: Tensor, weights: List[Tensor], bias: Optional[Tensor],
                          labels: Optional[Tensor], activation: int, output_height: int,
                          output_width: int) -> Tensor:
    """Location-weighted classification of gathered box hypercolumns ``(R, sum C_l, oh, ow)``
    with weights ``(NC, KK, M, C_l)`` -> ``(R, M, oh, ow)``, one batched matrix product."""
    count = columns.shape[0]
    classes, cells, outputs, _ = weights[0].shape
    weight = torch.cat(weights, dim=3).reshape(classes, cells * outputs, -1)
    weight = weight[0] if labels is None else weight[labels]
    scores = torch.matmul(weight, columns.reshape(count, columns.shape[1], -1))
    return _blend_box_scores(scores.reshape(count, cells, outputs, -1), bias, activation, output_height,
                             output_width)


def _upsampled_image(features: List[Tensor], scale_y: List[float], scale_x: List[float],
                     image_size: Optional[Sequence[int]]) -> Tensor:
    """The image-size hypercolumn ``(B, sum C_l, H, W)``.

    With ``image_size``, each layer is ``F.interpolate(size=(H, W), mode="bilinear",
    align_corners=False)``. With ``spatial_scale``, the image is ``round(H_l / scale)`` pixels
    (the largest over layers) and each layer is interpolated with the scale itself, so that image
    pixel ``i`` still reads feature coordinate ``(i + 0.5) * scale - 0.5``.
    """
    if image_size is not None:
        size = [int(image_size[0]), int(image_size[1])]
        layers = [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features]
    else:
        size = [max(round(f.shape[2] / sy) for f, sy in zip(features, scale_y)),
                max(round(f.shape[3] / sx) for f, sx in zip(features, scale_x))]
        layers = [torch.ops.aten.upsample_bilinear2d.default(f, size, False, 1.0 / sy, 1.0 / sx)
                  for f, sy, sx in zip(features, scale_y, scale_x)]
    return torch.cat(layers, dim=1)


def _point_boxes(points: Tensor) -> Tensor:
    """Points ``(N, 3)`` as degenerate boxes ``(N, 5)`` whose 1x1 grid point is the point."""
    return torch.cat([points, points[:, 1:]], dim=1)


def naive_sparse_hypercolumn(features: Sequence[Tensor], points: Tensor, *,
                             image_size: Optional[Sequence[int]] = None, spatial_scale: Scale = None,
                             padding: str = "border") -> Tensor:
    """Hypercolumns at points ``(N, 3)`` by upsampling every layer to image size -> ``(N, sum C_l)``.

    The image-size hypercolumn ``(B, sum C_l, H, W)`` is sampled bilinearly at each point
    (``roi_align`` of a zero-size box). That equals :func:`hypercolumn_ops.sparse_hypercolumn`
    (padding ``"border"``) at the image's pixel centres (``x = i + 0.5``); elsewhere it
    interpolates the interpolated image, an approximation. Costs ``B * sum C_l * H * W``
    elements twice (per-layer images, then their concatenation) in forward, as much in backward.
    """
    features, points, size, scales, padding_code = ops.normalise_sparse_hypercolumn(
        features, points, image_size=image_size, spatial_scale=spatial_scale, padding=padding)
    scale_y, scale_x = layer_scales(features, size, scales)
    _require_padding("naive_sparse_hypercolumn", padding_code, PADDING_BORDER)
    dtype = features[0].dtype
    features = _compute_in(accumulation_dtype(dtype), features)
    image = _upsampled_image(features, scale_y, scale_x, image_size)
    return _roi_align_grid(image, _point_boxes(points), 1, 1, 1.0, 1.0).flatten(1).to(dtype)


def naive_box_hypercolumn(features: Sequence[Tensor], boxes: Union[Tensor, Sequence[Tensor]],
                          output_size: Union[int, Tuple[int, int]], *, image_size: Optional[Sequence[int]] = None,
                          spatial_scale: Scale = None, padding: str = "border") -> Tensor:
    """Box hypercolumns ``(R, sum C_l, oh, ow)`` by upsampling every layer to image size.

    The image-size hypercolumn ``(B, sum C_l, H, W)`` is sampled at the box grid points with
    ``roi_align(aligned=True, sampling_ratio=1, spatial_scale=1)``: padding ``"border"`` for grid
    points within half a pixel of the image. Equal to :func:`hypercolumn_ops.box_hypercolumn`
    where the grid points are pixel centres; elsewhere it interpolates the interpolated image, an
    approximation. Costs ``2 * B * sum C_l * H * W`` elements (per-layer images, then their
    concatenation) plus the output, and as much again in backward.
    """
    features, boxes, output_height, output_width, size, scales, padding_code, _, _ = ops.normalise_box_hypercolumn(
        features, boxes, output_size, image_size=image_size, spatial_scale=spatial_scale, padding=padding)
    scale_y, scale_x = layer_scales(features, size, scales)
    _require_padding("naive_box_hypercolumn", padding_code, PADDING_BORDER)
    dtype = features[0].dtype
    features = _compute_in(accumulation_dtype(dtype), features)
    image = _upsampled_image(features, scale_y, scale_x, image_size)
    return _roi_align_grid(image, boxes, output_height, output_width, 1.0, 1.0).to(dtype)


def naive_fused_hypercolumn(features: Sequence[Tensor], boxes: Union[Tensor, Sequence[Tensor]],
                            weights: Sequence[Tensor], bias: Optional[Tensor] = None, *,
                            output_size: Union[int, Tuple[int, int]] = (50, 50),
                            image_size: Optional[Sequence[int]] = None, spatial_scale: Scale = None,
                            labels: Optional[Tensor] = None, activation: Optional[str] = None,
                            padding: str = "border") -> Tensor:
    """:func:`hypercolumn_ops.fused_hypercolumn` the naive way -> ``(R, M, oh, ow)``.

    The image-size hypercolumn ``(B, sum C_l, H, W)``, the box hypercolumns gathered from it
    ``(R, sum C_l, oh, ow)`` as in :func:`naive_box_hypercolumn`, then the location-weighted
    classifier as a batched matrix product. Padding ``"border"``; equal to the operator where the
    grid points are pixel centres (e.g. a whole-image box with ``output_size = image_size``), an
    interpolation of an interpolation elsewhere. Memory: ``2 * B * sum C_l * H * W +
    R * sum C_l * oh * ow`` elements in forward, about as much again for backward. Work: one
    interpolation per element of the image-size hypercolumn, however few the boxes.
    """
    (features, boxes, weights, bias, labels, output_height, output_width, size, scales, padding_code,
     activation_code, _, _, _) = ops.normalise_fused_hypercolumn(
        features, boxes, weights, bias, output_size=output_size, image_size=image_size,
        spatial_scale=spatial_scale, labels=labels, activation=activation, padding=padding)
    scale_y, scale_x = layer_scales(features, size, scales)
    _require_padding("naive_fused_hypercolumn", padding_code, PADDING_BORDER)
    dtype = features[0].dtype
    acc = accumulation_dtype(dtype)
    features, weights, (bias,) = _compute_in(acc, features), _compute_in(acc, weights), _compute_in(acc, [bias])
    image = _upsampled_image(features, scale_y, scale_x, image_size)
    columns = _roi_align_grid(image, boxes, output_height, output_width, 1.0, 1.0)
    out = _classify_box_columns(columns, weights, bias, labels, activation_code, output_height, output_width)
    return out.to(dtype)


def naive_fused_hypercolumn_points(features: Sequence[Tensor], points: Tensor, weights: Sequence[Tensor],
                                   bias: Optional[Tensor] = None, *, locations: Optional[Tensor] = None,
                                   image_size: Optional[Sequence[int]] = None, spatial_scale: Scale = None,
                                   labels: Optional[Tensor] = None, activation: Optional[str] = None,
                                   padding: str = "border") -> Tensor:
    """:func:`hypercolumn_ops.fused_hypercolumn_points` the naive way -> ``(N, M)``.

    The hypercolumns of :func:`naive_sparse_hypercolumn` ``(N, sum C_l)`` through the reference's
    classifier. Padding ``"border"``; equal to the operator at pixel centres. Memory:
    ``2 * B * sum C_l * H * W + N * sum C_l`` elements in forward, about as much again for backward.
    """
    (features, points, locations, weights, bias, labels, size, scales, padding_code, activation_code,
     _) = ops.normalise_fused_hypercolumn_points(
        features, points, weights, bias, locations=locations, image_size=image_size,
        spatial_scale=spatial_scale, labels=labels, activation=activation, padding=padding)
    scale_y, scale_x = layer_scales(features, size, scales)
    _require_padding("naive_fused_hypercolumn_points", padding_code, PADDING_BORDER)
    dtype = features[0].dtype
    acc = accumulation_dtype(dtype)
    features, weights, (bias,) = _compute_in(acc, features), _compute_in(acc, weights), _compute_in(acc, [bias])
    image = _upsampled_image(features, scale_y, scale_x, image_size)
    columns = _roi_align_grid(image, _point_boxes(points), 1, 1, 1.0, 1.0).flatten(1)
    return _classify_points(columns, locations, weights, bias, labels, activation_code).to(dtype)


def roi_align_boxes(features: Sequence[Tensor], boxes: Union[Tensor, Sequence[Tensor]],
                    output_size: Union[int, Tuple[int, int]], *, image_size: Optional[Sequence[int]] = None,
                    spatial_scale: Scale = None, padding: str = "zeros", sampling_ratio: int = 1,
                    aligned: bool = True) -> Tensor:
    """:func:`hypercolumn_ops.box_hypercolumn` with per-layer ``roi_align`` -> ``(R, sum C_l, oh, ow)``.

    Each layer ``torchvision.ops.roi_align(aligned=True, sampling_ratio=1)`` ``(R, C_l, oh, ow)``
    (exactly the box grid of ``docs/semantics.md``, padding ``"zeros"``; ``sampling_ratio`` and
    ``aligned`` passed on), then concatenated: the output twice.
    """
    (features, boxes, output_height, output_width, size, scales, padding_code, sampling_ratio,
     aligned) = ops.normalise_box_hypercolumn(features, boxes, output_size, image_size=image_size,
                                              spatial_scale=spatial_scale, padding=padding,
                                              sampling_ratio=sampling_ratio, aligned=aligned)
    scale_y, scale_x = layer_scales(features, size, scales)
    _require_padding("roi_align_boxes", padding_code, PADDING_ZEROS)
    dtype = features[0].dtype
    features = _compute_in(accumulation_dtype(dtype), features)
    return _roi_align_columns(features, boxes, output_height, output_width, scale_y, scale_x, sampling_ratio,
                              aligned).to(dtype)


def _roi_align_columns(features: List[Tensor], boxes: Tensor, output_height: int, output_width: int,
                       scale_y: List[float], scale_x: List[float], sampling_ratio: int, aligned: bool) -> Tensor:
    return torch.cat([_roi_align_grid(f, boxes, output_height, output_width, sy, sx, sampling_ratio, aligned)
                      for f, sy, sx in zip(features, scale_y, scale_x)], dim=1)


def roi_align_concat(features: Sequence[Tensor], boxes: Union[Tensor, Sequence[Tensor]], weights: Sequence[Tensor],
                     bias: Optional[Tensor] = None, *, output_size: Union[int, Tuple[int, int]] = (50, 50),
                     image_size: Optional[Sequence[int]] = None, spatial_scale: Scale = None,
                     labels: Optional[Tensor] = None, activation: Optional[str] = None,
                     padding: str = "zeros", sampling_ratio: int = 1, aligned: bool = True) -> Tensor:
    """:func:`hypercolumn_ops.fused_hypercolumn` with per-layer ``roi_align`` -> ``(R, M, oh, ow)``.

    Each layer ``torchvision.ops.roi_align(aligned=True, sampling_ratio=1)`` ``(R, C_l, oh, ow)``
    (exactly the box grid of ``docs/semantics.md``, padding ``"zeros"``), concatenated
    ``(R, sum C_l, oh, ow)``, classified with the location weights as a batched matrix product.
    Exact. Memory: the box hypercolumns twice (per layer, then concatenated),
    ``2 * R * sum C_l * oh * ow`` elements, kept for backward, whose gradient is as large again.
    """
    (features, boxes, weights, bias, labels, output_height, output_width, size, scales, padding_code,
     activation_code, _, sampling_ratio, aligned) = ops.normalise_fused_hypercolumn(
        features, boxes, weights, bias, output_size=output_size, image_size=image_size,
        spatial_scale=spatial_scale, labels=labels, activation=activation, padding=padding,
        sampling_ratio=sampling_ratio, aligned=aligned)
    scale_y, scale_x = layer_scales(features, size, scales)
    _require_padding("roi_align_concat", padding_code, PADDING_ZEROS)
    dtype = features[0].dtype
    acc = accumulation_dtype(dtype)
    features, weights, (bias,) = _compute_in(acc, features), _compute_in(acc, weights), _compute_in(acc, [bias])
    columns = _roi_align_columns(features, boxes, output_height, output_width, scale_y, scale_x, sampling_ratio,
                                 aligned)
    out = _classify_box_columns(columns, weights, bias, labels, activation_code, output_height, output_width)
    return out.to(dtype)


def classify_then_sample(features: Sequence[Tensor], boxes: Union[Tensor, Sequence[Tensor]],
                         weights: Sequence[Tensor], bias: Optional[Tensor] = None, *,
                         output_size: Union[int, Tuple[int, int]] = (50, 50),
                         image_size: Optional[Sequence[int]] = None, spatial_scale: Scale = None,
                         labels: Optional[Tensor] = None, activation: Optional[str] = None,
                         padding: str = "zeros", sampling_ratio: int = 1, aligned: bool = True) -> Tensor:
    """:func:`hypercolumn_ops.fused_hypercolumn` by projecting every layer first -> ``(R, M, oh, ow)``.

    Each layer: a 1x1 convolution (``F.conv2d``) to ``NC * KK * M`` score maps
    ``(B, NC * KK * M, H_l, W_l)``, then ``roi_align`` of the scores ``(R, NC * KK * M, oh, ow)``;
    summed over layers, each box's class picked, bias added, activation per cell, blended with the
    location weights. Exact (sampling and the classifier are both linear), padding ``"zeros"``.
    Memory: the score maps and ``L * R * NC * KK * M * oh * ow`` sampled scores.
    """
    (features, boxes, weights, bias, labels, output_height, output_width, size, scales, padding_code,
     activation_code, _, sampling_ratio, aligned) = ops.normalise_fused_hypercolumn(
        features, boxes, weights, bias, output_size=output_size, image_size=image_size,
        spatial_scale=spatial_scale, labels=labels, activation=activation, padding=padding,
        sampling_ratio=sampling_ratio, aligned=aligned)
    scale_y, scale_x = layer_scales(features, size, scales)
    _require_padding("classify_then_sample", padding_code, PADDING_ZEROS)
    dtype = features[0].dtype
    acc = accumulation_dtype(dtype)
    features, weights, (bias,) = _compute_in(acc, features), _compute_in(acc, weights), _compute_in(acc, [bias])
    classes, cells, outputs, _ = weights[0].shape
    scores = 0
    for feature, weight, sy, sx in zip(features, weights, scale_y, scale_x):
        score_maps = F.conv2d(feature, weight.reshape(classes * cells * outputs, -1, 1, 1))
        scores = scores + _roi_align_grid(score_maps, boxes, output_height, output_width, sy, sx, sampling_ratio,
                                          aligned)
    count = boxes.shape[0]
    scores = scores.reshape(count, classes, cells, outputs, -1)
    scores = scores[:, 0] if labels is None else scores[torch.arange(count, device=scores.device), labels]
    return _blend_box_scores(scores, bias, activation_code, output_height, output_width).to(dtype)


def _grid_sample_columns(features: List[Tensor], points: Tensor, scale_y: List[float],
                         scale_x: List[float]) -> Tensor:
    """PointRend's ``point_sample`` of every layer at points ``(N, 3)`` -> ``(N, sum C_l)``.

    ``grid_sample(align_corners=False)`` reads normalised ``g`` at feature pixel
    ``((g + 1) * W_l - 1) / 2``; ``g = 2 * x * sx / W_l - 1`` makes that ``x * sx - 0.5``.
    ``grid_sample`` takes one point set per image, so with several images the points are grouped
    by batch index and scattered back (with one, as in the benchmarks, they are not).
    """
    if features[0].shape[0] == 1:
        return _point_sample_image(features, 0, points, scale_y, scale_x)
    batch_values = points[:, 0]
    columns = features[0].new_zeros(points.shape[0], sum(f.shape[1] for f in features))
    for image in range(features[0].shape[0]):
        rows = (batch_values == image).nonzero().flatten()
        columns = columns.index_put((rows,), _point_sample_image(features, image, points[rows], scale_y, scale_x))
    return columns


def _point_sample_image(features: List[Tensor], image: int, points: Tensor, scale_y: List[float],
                        scale_x: List[float]) -> Tensor:
    """``point_sample`` of every layer of one image at points ``(N, 3)`` -> ``(N, sum C_l)``."""
    per_layer = []
    for feature, sy, sx in zip(features, scale_y, scale_x):
        height, width = feature.shape[2:]
        gx = 2 * points[:, 1] * sx / width - 1
        gy = 2 * points[:, 2] * sy / height - 1
        grid = torch.stack([gx, gy], dim=1).to(feature.dtype)[None, None]  # (1, 1, N, 2)
        sampled = F.grid_sample(feature[image:image + 1], grid, mode="bilinear", padding_mode="border",
                                align_corners=False)
        per_layer.append(sampled[0, :, 0].t())
    return torch.cat(per_layer, dim=1)


def grid_sample_points(features: Sequence[Tensor], points: Tensor, *, image_size: Optional[Sequence[int]] = None,
                       spatial_scale: Scale = None, padding: str = "border") -> Tensor:
    """:func:`hypercolumn_ops.sparse_hypercolumn` with PointRend's ``point_sample`` -> ``(N, sum C_l)``.

    Per layer ``F.grid_sample(align_corners=False, padding_mode="border")`` at the points,
    concatenated. Exact, padding ``"border"`` (PointRend's default ``padding_mode="zeros"`` instead
    fades each out-of-map tap to zero, which is neither of the paddings of ``docs/semantics.md``).
    Memory: the per-layer samples and their concatenation, ``2 * N * sum C_l`` elements (twice
    more with several images, to regroup the points).
    """
    features, points, size, scales, padding_code = ops.normalise_sparse_hypercolumn(
        features, points, image_size=image_size, spatial_scale=spatial_scale, padding=padding)
    scale_y, scale_x = layer_scales(features, size, scales)
    _require_padding("grid_sample_points", padding_code, PADDING_BORDER)
    dtype = features[0].dtype
    features = _compute_in(accumulation_dtype(dtype), features)
    return _grid_sample_columns(features, points, scale_y, scale_x).to(dtype)


def _classify_points(columns: Tensor, locations: Optional[Tensor], weights: List[Tensor], bias: Optional[Tensor],
                     labels: Optional[Tensor], activation: int) -> Tensor:
    """Hypercolumns ``(N, sum C_l)`` through the reference's location-weighted classifier -> ``(N, M)``."""
    cells = weights[0].shape[1]
    if locations is None:
        alpha = columns.new_ones(columns.shape[0], 1)
    else:
        alpha = location_weights(locations[:, 0], locations[:, 1], int(round(cells ** 0.5))).to(columns.dtype)
    chunks = columns.split([w.shape[3] for w in weights], dim=1)
    return classify(chunks, weights, bias, labels, alpha, activation)


def grid_sample_fused_points(features: Sequence[Tensor], points: Tensor, weights: Sequence[Tensor],
                             bias: Optional[Tensor] = None, *, locations: Optional[Tensor] = None,
                             image_size: Optional[Sequence[int]] = None, spatial_scale: Scale = None,
                             labels: Optional[Tensor] = None, activation: Optional[str] = None,
                             padding: str = "border") -> Tensor:
    """:func:`hypercolumn_ops.fused_hypercolumn_points` with ``point_sample`` -> ``(N, M)``.

    The hypercolumns of :func:`grid_sample_points` ``(N, sum C_l)``, then the reference's
    location-weighted classifier. Exact, padding ``"border"``. Memory: the ``(N, sum C_l)``
    hypercolumns twice (per layer, then concatenated), kept for backward.
    """
    (features, points, locations, weights, bias, labels, size, scales, padding_code, activation_code,
     _) = ops.normalise_fused_hypercolumn_points(
        features, points, weights, bias, locations=locations, image_size=image_size,
        spatial_scale=spatial_scale, labels=labels, activation=activation, padding=padding)
    scale_y, scale_x = layer_scales(features, size, scales)
    _require_padding("grid_sample_fused_points", padding_code, PADDING_BORDER)
    dtype = features[0].dtype
    acc = accumulation_dtype(dtype)
    features, weights, (bias,) = _compute_in(acc, features), _compute_in(acc, weights), _compute_in(acc, [bias])
    columns = _grid_sample_columns(features, points, scale_y, scale_x)
    return _classify_points(columns, locations, weights, bias, labels, activation_code).to(dtype)
