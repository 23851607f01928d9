"""``nn.Module`` faces of the operators: the paper's location-specific hypercolumn classifier
(fused, and the naive upsampling way with the same parameters) and a hypercolumn descriptor.

``HypercolumnHead`` and ``NaiveHypercolumnHead`` hold the same parameters under the same
``state_dict`` keys (``weight.0 .. weight.{L-1}``, ``bias``), so a head trained with one loads
into the other. They compute the same function: exactly on a whole-image box whose grid lies on
pixel centres, and within interpolation error elsewhere (the naive head samples bilinearly from
a layer already upsampled bilinearly to image size).
"""

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from .ops import _check_boxes, box_hypercolumn, fused_hypercolumn, fused_hypercolumn_points, sparse_hypercolumn
from .reference import box_grid_points

Size = Union[int, Tuple[int, int]]


def _pair(size: Size) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class _HypercolumnClassifier(nn.Module):
    """The parameters shared by both heads: a ``K x K`` grid of classifiers over a box, each
    with ``num_outputs`` outputs (per class when ``num_classes`` is given), split per layer.

    ``weight[l]``: ``(K*K, M, C_l)`` or ``(NC, K*K, M, C_l)``; ``bias``: ``(K*K, M)`` or
    ``(NC, K*K, M)``. Initialised as one ``nn.Linear`` over the whole hypercolumn
    (``fan_in = sum C_l``), independently per cell and class.
    """

    def __init__(self, in_channels: Sequence[int], num_outputs: int, grid_size: int = 5,
                 output_size: Size = (50, 50), num_classes: Optional[int] = None,
                 activation: Optional[str] = None, padding: str = "border"):
        super().__init__()
        if isinstance(in_channels, int):
            in_channels = [in_channels]
        if not in_channels or any(c < 1 for c in in_channels):
            raise ValueError(f"in_channels: expected one positive channel count per layer, got {in_channels!r}")
        if num_outputs < 1 or grid_size < 1 or (num_classes is not None and num_classes < 1):
            raise ValueError(f"num_outputs, grid_size, num_classes: expected positive values, got "
                             f"{num_outputs}, {grid_size}, {num_classes}")
        if activation not in (None, "sigmoid"):
            raise ValueError(f"activation: expected None or 'sigmoid', got {activation!r}")
        if padding not in ("border", "zeros"):
            raise ValueError(f"padding: expected 'border' or 'zeros', got {padding!r}")
        self.in_channels = list(in_channels)
        self.num_outputs = num_outputs
        self.grid_size = grid_size
        self.output_size = _pair(output_size)
        self.num_classes = num_classes
        self.activation = activation
        self.padding = padding
        lead = (grid_size * grid_size, num_outputs)
        if num_classes is not None:
            lead = (num_classes, *lead)
        self.weight = nn.ParameterList([nn.Parameter(torch.empty(*lead, c)) for c in self.in_channels])
        self.bias = nn.Parameter(torch.empty(*lead))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(sum(self.in_channels))
        for weight in self.weight:
            nn.init.uniform_(weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        text = (f"in_channels={self.in_channels}, num_outputs={self.num_outputs}, grid_size={self.grid_size}, "
                f"output_size={self.output_size}")
        if self.num_classes is not None:
            text += f", num_classes={self.num_classes}"
        if self.activation is not None:
            text += f", activation={self.activation!r}"
        return text + f", padding={self.padding!r}"


class HypercolumnHead(_HypercolumnClassifier):
    """Location-specific classification of hypercolumns inside boxes (or at points), fused:
    no layer is upsampled and no box hypercolumn is materialised (:func:`fused_hypercolumn`).

    Args:
        in_channels: ``C_l`` of each layer the head reads.
        num_outputs: ``M`` outputs per point (one mask, one heat map per keypoint, one score
            per part).
        grid_size: ``K``: a ``K x K`` grid of classifiers over each box, blended bilinearly.
        output_size: ``(oh, ow)`` grid of points per box.
        num_classes: when given, one classifier set per class, picked by each box's label.
        activation: None or ``"sigmoid"`` (per cell, before blending, as in the paper).
        padding: ``"border"`` or ``"zeros"``, see :func:`sparse_hypercolumn`.
    """

    def forward(self, features: Sequence[Tensor], boxes: Union[Tensor, Sequence[Tensor]],
                image_size: Optional[Sequence[int]] = None, labels: Optional[Tensor] = None,
                spatial_scale: Optional[Union[float, Sequence[float]]] = None) -> Tensor:
        """``features`` L maps ``(B, C_l, H_l, W_l)``; ``boxes`` ``(R, 5)`` rows
        ``(batch_index, x1, y1, x2, y2)`` or a list of ``(R_b, 4)``, in pixels of the image of
        ``image_size = (H, W)`` (or, instead, maps that are ``spatial_scale`` times the image, one
        float or one per layer, as in :func:`fused_hypercolumn`); ``labels`` ``(R,)`` int64 with
        ``num_classes``. Returns ``(R, M, oh, ow)``."""
        return fused_hypercolumn(features, boxes, list(self.weight), self.bias, output_size=self.output_size,
                                 image_size=image_size, spatial_scale=spatial_scale, labels=labels,
                                 activation=self.activation, padding=self.padding)

    def forward_points(self, features: Sequence[Tensor], points: Tensor, image_size: Optional[Sequence[int]] = None,
                       locations: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                       spatial_scale: Optional[Union[float, Sequence[float]]] = None) -> Tensor:
        """``points`` ``(N, 3)`` rows ``(batch_index, x, y)`` in image pixels; ``locations``
        ``(N, 2)`` rows ``(u, v)`` in ``[0, 1]`` (the point's place in its box, needed when
        ``grid_size > 1``); ``labels`` ``(N,)``; ``image_size`` or ``spatial_scale`` as in
        :meth:`forward`. Returns ``(N, M)``."""
        return fused_hypercolumn_points(features, points, list(self.weight), self.bias, locations=locations,
                                        image_size=image_size, spatial_scale=spatial_scale, labels=labels,
                                        activation=self.activation, padding=self.padding)


class NaiveHypercolumnHead(_HypercolumnClassifier):
    """:class:`HypercolumnHead` computed the naive way, for comparison and as a baseline: every
    layer upsampled to image size (``F.interpolate``, bilinear), concatenated into the
    hypercolumn image ``(B, sum C_l, H, W)``, which is sampled bilinearly on each box's grid
    and then classified. Same arguments, parameters and ``state_dict`` keys.
    """

    def _hypercolumn_image(self, features: Sequence[Tensor], image_size: Sequence[int]) -> Tensor:
        size = _pair(tuple(image_size))
        return torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features],
                         dim=1)

    def _sample(self, image: Tensor, batch: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Bilinear samples ``(N, C)`` of the hypercolumn image at image points."""
        height, width = image.shape[-2:]
        if self.padding == "zeros":
            # roi_align(aligned=True) on one-pixel boxes centred on the points: its padding rule.
            rois = torch.stack([batch.to(x.dtype), x - 0.5, y - 0.5, x + 0.5, y + 0.5], dim=1)
            return torchvision.ops.roi_align(image, rois.to(image.dtype), (1, 1), 1.0, 1, True).flatten(1)
        # align_corners=False: normalised g maps to pixel coordinate ((g + 1) * W - 1) / 2 = x - 0.5.
        grid = torch.stack([2 * x / width - 1, 2 * y / height - 1], dim=1).to(image.dtype)
        out = image.new_zeros(x.shape[0], image.shape[1])
        for b in range(image.shape[0]):
            here = batch == b
            sample = F.grid_sample(image[b:b + 1], grid[here][None, None], mode="bilinear", padding_mode="border",
                                   align_corners=False)
            out[here] = sample[0, :, 0].t().to(out.dtype)  # autocast may run grid_sample in float32
        return out

    def _classify(self, columns: Tensor, alpha: Tensor, labels: Optional[Tensor]) -> Tensor:
        """Hypercolumns ``(N, sum C_l)``, cell weights ``(N, KK)`` -> ``(N, M)``."""
        weight = torch.cat(list(self.weight), dim=-1)
        if labels is None:
            scores = torch.einsum("nc,kmc->nkm", columns, weight) + self.bias
        else:
            # Every class's scores, then each point's: (N, NC, KK, M) is far smaller than
            # gathering a weight set per point (N, KK, M, sum C_l).
            every_class = torch.einsum("nc,qkmc->nqkm", columns, weight)
            rows = torch.arange(columns.shape[0], device=columns.device)
            scores = every_class[rows, labels] + self.bias[labels]
        if self.activation == "sigmoid":
            scores = torch.sigmoid(scores)
        return torch.einsum("nk,nkm->nm", alpha, scores)

    def _location_weights(self, u: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
        """``(N, KK)`` blend weights at box places ``(u, v)``: the one-hot ``K x K`` map of
        each cell, upsampled bilinearly (``align_corners=False``, border) and read there."""
        cells = self.grid_size * self.grid_size
        one_hot = torch.eye(cells, dtype=dtype, device=u.device).reshape(1, cells, self.grid_size, self.grid_size)
        grid = torch.stack([2 * u - 1, 2 * v - 1], dim=1).to(dtype)[None, None]
        return F.grid_sample(one_hot, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].t()

    def forward(self, features: Sequence[Tensor], boxes: Union[Tensor, Sequence[Tensor]],
                image_size: Sequence[int], labels: Optional[Tensor] = None) -> Tensor:
        """As :meth:`HypercolumnHead.forward`: ``(R, M, oh, ow)``."""
        image = self._hypercolumn_image(features, image_size)
        boxes = _check_boxes(boxes, list(features))
        oh, ow = self.output_size
        batch, x, y, u, v = box_grid_points(boxes, oh, ow)
        columns = self._sample(image, batch.long(), x, y)
        if labels is not None:
            labels = labels.repeat_interleave(oh * ow)
        out = self._classify(columns, self._location_weights(u, v, image.dtype), labels)
        return out.reshape(boxes.shape[0], oh, ow, -1).permute(0, 3, 1, 2)

    def forward_points(self, features: Sequence[Tensor], points: Tensor, image_size: Sequence[int],
                       locations: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> Tensor:
        """As :meth:`HypercolumnHead.forward_points`: ``(N, M)``."""
        image = self._hypercolumn_image(features, image_size)
        columns = self._sample(image, points[:, 0].long(), points[:, 1], points[:, 2])
        if locations is None:
            if self.grid_size > 1:
                raise ValueError(f"locations: required when grid_size > 1 (got {self.grid_size})")
            alpha = columns.new_ones(points.shape[0], 1)
        else:
            alpha = self._location_weights(locations[:, 0], locations[:, 1], image.dtype)
        return self._classify(columns, alpha, labels)


class Hypercolumn(nn.Module):
    """Hypercolumn descriptors of a list of feature maps: at points (:func:`sparse_hypercolumn`)
    or, when ``output_size`` is given, on a grid inside each box (:func:`box_hypercolumn`).

    Args:
        output_size: None for points, else ``(oh, ow)`` grid per box.
        image_size: ``(H, W)`` of the image the network saw (or give it to ``forward``); or
        spatial_scale: one float or one per layer.
        padding: ``"border"`` or ``"zeros"``.
    """

    def __init__(self, output_size: Optional[Size] = None, image_size: Optional[Sequence[int]] = None,
                 spatial_scale: Optional[Union[float, Sequence[float]]] = None, padding: str = "border"):
        super().__init__()
        self.output_size = None if output_size is None else _pair(output_size)
        self.image_size = None if image_size is None else tuple(image_size)
        self.spatial_scale = spatial_scale
        self.padding = padding

    def forward(self, features: Sequence[Tensor], rois: Union[Tensor, Sequence[Tensor]],
                image_size: Optional[Sequence[int]] = None) -> Tensor:
        """``rois``: points ``(N, 3)`` -> ``(N, sum C_l)``, or boxes ``(R, 5)`` (or a list of
        ``(R_b, 4)``) -> ``(R, sum C_l, oh, ow)``. ``image_size`` here overrides the module's."""
        size = self.image_size if image_size is None else tuple(image_size)
        if self.output_size is None:
            return sparse_hypercolumn(features, rois, image_size=size, spatial_scale=self.spatial_scale,
                                      padding=self.padding)
        return box_hypercolumn(features, rois, self.output_size, image_size=size,
                               spatial_scale=self.spatial_scale, padding=self.padding)

    def extra_repr(self) -> str:
        scale = f"image_size={self.image_size}" if self.spatial_scale is None else \
            f"spatial_scale={self.spatial_scale}"
        return f"output_size={self.output_size}, {scale}, padding={self.padding!r}"

