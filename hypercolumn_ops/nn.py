"""``nn.Module`` faces of the operators: the paper's location-specific hypercolumn classifier
(fused, and the naive upsampling way with the same parameters) and a hypercolumn descriptor.

``HypercolumnHead`` and ``NaiveHypercolumnHead`` hold the same parameters under the same
``state_dict`` keys (``weight.0 .. weight.{L-1}``, ``bias``), so a head trained with one loads
into the other. They compute the same function: exactly on a whole-image box whose grid lies on
pixel centres, and within interpolation error elsewhere (the naive head samples bilinearly from
a layer already upsampled bilinearly to image size).
"""

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from ._validation import (autocast_device, check_activation, check_padding, check_sampling, normalise_fused_hypercolumn,
                          normalise_fused_hypercolumn_points)
from .ops import box_hypercolumn, fused_hypercolumn, fused_hypercolumn_points, sparse_hypercolumn
from .reference import box_grid_points

Size = Union[int, Tuple[int, int]]


def _pair(size: Size) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class _HypercolumnClassifier(nn.Module):
    """The parameters shared by both heads: a ``K x K`` grid of classifiers over a box, each
    with ``num_outputs`` outputs (per class when ``num_classes`` is given), split per layer.

    ``weight[l]``: ``(K*K, M, C_l)`` or ``(NC, K*K, M, C_l)`` for a 1 x 1 classifier, and
    ``(K*K, M, C_l, k, k)`` or ``(NC, K*K, M, C_l, k, k)`` for a ``k x k`` one (``kernel_sizes``);
    ``bias``: ``(K*K, M)`` or ``(NC, K*K, M)``. Initialised as one ``nn.Linear`` over the whole
    hypercolumn (``fan_in = sum C_l * k_l * k_l``), independently per cell and class.
    """

    def __init__(self, in_channels: Sequence[int], num_outputs: int, grid_size: int = 5,
                 output_size: Size = (50, 50), num_classes: Optional[int] = None,
                 activation: Optional[str] = None, padding: str = "border", sampling_ratio: int = 1,
                 aligned: bool = True, kernel_sizes: Optional[Sequence[int]] = None):
        super().__init__()
        if isinstance(in_channels, int):
            in_channels = [in_channels]
        if not in_channels or any(c < 1 for c in in_channels):
            raise ValueError(f"in_channels: expected one positive channel count per layer, got {in_channels!r}")
        if num_outputs < 1 or grid_size < 1 or (num_classes is not None and num_classes < 1):
            raise ValueError(f"num_outputs, grid_size, num_classes: expected positive values, got "
                             f"{num_outputs}, {grid_size}, {num_classes}")
        check_activation(activation)
        check_padding(padding)
        check_sampling(sampling_ratio, aligned)
        kernel_sizes = [1] * len(in_channels) if kernel_sizes is None else list(kernel_sizes)
        if len(kernel_sizes) != len(in_channels) or any(
                not isinstance(k, int) or k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes: expected one odd positive size per layer ({len(in_channels)}), "
                             f"got {kernel_sizes!r}")
        self.in_channels = list(in_channels)
        self.num_outputs = num_outputs
        self.grid_size = grid_size
        self.output_size = _pair(output_size)
        self.num_classes = num_classes
        self.activation = activation
        self.padding = padding
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.kernel_sizes = kernel_sizes
        lead = (grid_size * grid_size, num_outputs)
        if num_classes is not None:
            lead = (num_classes, *lead)
        self.weight = nn.ParameterList([nn.Parameter(torch.empty(*lead, c, *((k, k) if k > 1 else ())))
                                        for c, k in zip(self.in_channels, kernel_sizes)])
        self.bias = nn.Parameter(torch.empty(*lead))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every weight and bias from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with
        ``fan_in = sum C_l * k_l * k_l``: ``nn.Linear``'s default for one classifier over the
        whole hypercolumn (with each layer's ``k x k`` neighbourhood)."""
        # nn.Linear's default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(sum(c * k * k for c, k in zip(self.in_channels, self.kernel_sizes)))
        for weight in self.weight:
            nn.init.uniform_(weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def _layers(self, features: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """(maps, 1 x 1 classifier weights) for the fused operator. A ``k x k`` layer enters as its
        score maps ``(B, Q, H_l, W_l)``, ``Q = NC * KK * M`` (the classifier as a convolution with
        padding ``k // 2``, as the paper's code applies it), with identity weights that read each
        cell's scores: classifying the hypercolumn is linear, so a layer's scores may be computed
        at its resolution and sampled (the project-then-sample order of ``docs/semantics.md``)."""
        if all(k == 1 for k in self.kernel_sizes):
            return list(features), list(self.weight)
        if isinstance(features, Tensor) or not isinstance(features, (list, tuple)) or len(features) != len(self.weight):
            raise ValueError(f"features: expected one map per layer ({len(self.weight)}), got {type(features).__name__}")
        maps, weights = [], []
        for feature, weight, k in zip(features, self.weight, self.kernel_sizes):
            if k == 1:
                maps.append(feature)
                weights.append(weight)
                continue
            lead = weight.shape[:-3]
            scores = lead.numel()
            maps.append(F.conv2d(feature, weight.reshape(scores, *weight.shape[-3:]), padding=k // 2))
            weights.append(torch.eye(scores, dtype=weight.dtype, device=weight.device).reshape(*lead, scores))
        return maps, weights

    def extra_repr(self) -> str:
        text = (f"in_channels={self.in_channels}, num_outputs={self.num_outputs}, grid_size={self.grid_size}, "
                f"output_size={self.output_size}")
        if self.num_classes is not None:
            text += f", num_classes={self.num_classes}"
        if self.activation is not None:
            text += f", activation={self.activation!r}"
        if any(k != 1 for k in self.kernel_sizes):
            text += f", kernel_sizes={self.kernel_sizes}"
        if self.sampling_ratio != 1 or not self.aligned:
            text += f", sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        return text + f", padding={self.padding!r}"


class HypercolumnHead(_HypercolumnClassifier):
    """Location-specific classification of hypercolumns inside boxes (or at points), fused:
    no layer is upsampled and no box hypercolumn is materialised
    (:func:`hypercolumn_ops.fused_hypercolumn`).

    Args:
        in_channels: ``C_l`` of each layer the head reads (one int for a single layer).
        num_outputs: ``M`` outputs per point (one mask, one heat map per keypoint, one score
            per part).
        grid_size: ``K``: a ``K x K`` grid of classifiers over each box, blended bilinearly.
        output_size: ``(oh, ow)`` grid of points per box, or one int for both.
        num_classes: ``NC``; when given, one classifier set per class, picked by each box's label.
        activation: None or ``"sigmoid"`` (per cell, before blending, as in the paper).
        padding: ``"border"``, ``"zeros"`` or ``"zeros_per_tap"``, see
            :func:`hypercolumn_ops.sparse_hypercolumn`.
        sampling_ratio, aligned: bilinear samples averaged per output cell and the half-pixel
            shift, as ``torchvision.ops.roi_align``'s (see :func:`hypercolumn_ops.box_hypercolumn`).
        kernel_sizes: one odd ``k`` per layer (default all 1): layer ``l``'s classifiers are
            ``k x k`` convolutions with padding ``k // 2`` (the paper's code uses a 3 x 3 one on
            one layer), evaluated at the layer's resolution, then sampled.

    Attributes:
        weight: ``nn.ParameterList`` of one tensor per layer, ``(K*K, M, C_l)``, or
            ``(NC, K*K, M, C_l)`` with ``num_classes`` (``state_dict`` keys ``weight.0`` ..
            ``weight.{L-1}``).
            A ``k x k`` layer's weight is ``(K*K, M, C_l, k, k)`` or ``(NC, K*K, M, C_l, k, k)``.
        bias: ``(K*K, M)``, or ``(NC, K*K, M)`` with ``num_classes``.

    Raises:
        ValueError: ``in_channels`` empty or not positive; ``num_outputs``, ``grid_size`` or
            ``num_classes`` below 1; an unknown ``activation`` or ``padding``; ``kernel_sizes``
            not one odd positive size per layer.
        TypeError: ``sampling_ratio`` not an int or ``aligned`` not a bool.
    """

    def forward(self, features: Sequence[Tensor], boxes: Union[Tensor, Sequence[Tensor]],
                image_size: Optional[Sequence[int]] = None, labels: Optional[Tensor] = None,
                spatial_scale: Optional[Union[float, Sequence[float]]] = None,
                box_bias: Optional[Tensor] = None) -> Tensor:
        """Classify the ``oh x ow`` grid of every box.

        Args:
            features: L maps ``(B, C_l, H_l, W_l)``, the layers of ``in_channels``.
            boxes: ``(R, 5)`` rows ``(batch_index, x1, y1, x2, y2)``, or a list of ``B`` tensors
                ``(R_b, 4)``, in pixels of the image.
            image_size: ``(H, W)`` of the image the network saw; give it or ``spatial_scale``.
            labels: ``(R,)`` int64 in ``[0, NC)``, exactly when the head has ``num_classes``.
            spatial_scale: feature pixels per image pixel, one float or one per layer, instead
                of ``image_size`` (as in :func:`hypercolumn_ops.fused_hypercolumn`).
            box_bias: ``(R, K*K, M)``, a per-box term added to the bias (the paper's fc7 scores
                of each detection), or None.

        Returns:
            ``(R, M, oh, ow)``: :func:`hypercolumn_ops.fused_hypercolumn` with the head's
            weights and bias.
        """
        maps, weights = self._layers(features)
        return fused_hypercolumn(maps, boxes, weights, self.bias, output_size=self.output_size,
                                 image_size=image_size, spatial_scale=spatial_scale, labels=labels,
                                 activation=self.activation, padding=self.padding,
                                 sampling_ratio=self.sampling_ratio, aligned=self.aligned, box_bias=box_bias)

    def forward_points(self, features: Sequence[Tensor], points: Tensor, image_size: Optional[Sequence[int]] = None,
                       locations: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                       spatial_scale: Optional[Union[float, Sequence[float]]] = None,
                       box_bias: Optional[Tensor] = None) -> Tensor:
        """Classify arbitrary points, each at its place in its object box.

        Args:
            features: L maps ``(B, C_l, H_l, W_l)``.
            points: ``(N, 3)`` rows ``(batch_index, x, y)`` in image pixels.
            image_size: ``(H, W)``, or ``spatial_scale`` instead, as in :meth:`forward`.
            locations: ``(N, 2)`` rows ``(u, v)`` in ``[0, 1]``, each point's place in its box;
                required when ``grid_size > 1``.
            labels: ``(N,)`` int64 in ``[0, NC)``, exactly when the head has ``num_classes``.
            spatial_scale: one float or one per layer, instead of ``image_size``.
            box_bias: ``(N, K*K, M)``, each point's box's term added to the bias, or None.

        Returns:
            ``(N, M)``: :func:`hypercolumn_ops.fused_hypercolumn_points` with the head's
            weights and bias.
        """
        maps, weights = self._layers(features)
        return fused_hypercolumn_points(maps, points, weights, self.bias, locations=locations,
                                        image_size=image_size, spatial_scale=spatial_scale, labels=labels,
                                        activation=self.activation, padding=self.padding, box_bias=box_bias)


class NaiveHypercolumnHead(_HypercolumnClassifier):
    """:class:`HypercolumnHead` computed the naive way, for comparison and as a baseline: every
    layer upsampled to image size (``F.interpolate``, bilinear), concatenated into the
    hypercolumn image ``(B, sum C_l, H, W)``, which is sampled bilinearly on each box's grid
    and then classified. Same arguments, parameters and ``state_dict`` keys.

    It allocates the hypercolumn image, ``B * sum C_l * H * W`` elements, and takes
    ``image_size`` only (no ``spatial_scale``) and one sample per output cell
    (``sampling_ratio=1, aligned=True``). Its outputs equal the fused head's where the grid
    points are pixel centres, and are an interpolation of an interpolation elsewhere. A
    ``k x k`` layer's classifier runs as a convolution at the layer's resolution, whose scores
    are upsampled like the other layers.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.sampling_ratio != 1 or not self.aligned:
            raise ValueError("sampling_ratio, aligned: the naive head samples the upsampled image once per "
                             "output cell (sampling_ratio=1, aligned=True)")

    def _hypercolumn_image(self, features: Sequence[Tensor], image_size: Sequence[int]) -> Tensor:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)  # symbolic sizes stay
        return torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features],
                         dim=1)

    def _sample(self, image: Tensor, batch: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Bilinear samples ``(N, C)`` of the hypercolumn image at image points."""
        height, width = image.shape[-2:]
        mode = "zeros" if self.padding == "zeros_per_tap" else "border"
        if self.padding == "zeros":
            # roi_align(aligned=True) on one-pixel boxes centred on the points: its padding rule.
            rois = torch.stack([batch.to(x.dtype), x - 0.5, y - 0.5, x + 0.5, y + 0.5], dim=1)
            return torchvision.ops.roi_align(image, rois.to(image.dtype), (1, 1), 1.0, 1, True).flatten(1)
        # align_corners=False: normalised g maps to pixel coordinate ((g + 1) * W - 1) / 2 = x - 0.5.
        grid = torch.stack([2 * x / width - 1, 2 * y / height - 1], dim=1).to(image.dtype)
        out = image.new_zeros(x.shape[0], image.shape[1])
        for b in range(image.shape[0]):
            here = batch == b
            sample = F.grid_sample(image[b:b + 1], grid[here][None, None], mode="bilinear", padding_mode=mode,
                                   align_corners=False)
            out[here] = sample[0, :, 0].t().to(out.dtype)  # autocast may run grid_sample in float32
        return out

    def _classify(self, columns: Tensor, alpha: Tensor, weights: Sequence[Tensor], labels: Optional[Tensor],
                  box_bias: Optional[Tensor]) -> Tensor:
        """Hypercolumns ``(N, sum C_l)``, cell weights ``(N, KK)``, 1 x 1 weights per layer, each
        point's label and per-point term ``(N, KK, M)`` -> ``(N, M)``."""
        weight = torch.cat(list(weights), dim=-1)
        if labels is None:
            scores = torch.einsum("nc,kmc->nkm", columns, weight) + self.bias
        else:
            # Every class's scores, then each point's: (N, NC, KK, M) is far smaller than
            # gathering a weight set per point (N, KK, M, sum C_l).
            every_class = torch.einsum("nc,qkmc->nqkm", columns, weight)
            rows = torch.arange(columns.shape[0], device=columns.device)
            scores = every_class[rows, labels] + self.bias[labels]
        if box_bias is not None:
            scores = scores + box_bias
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
                image_size: Sequence[int], labels: Optional[Tensor] = None,
                box_bias: Optional[Tensor] = None) -> Tensor:
        """As :meth:`HypercolumnHead.forward`, with ``image_size`` required.

        Args:
            features: L maps ``(B, C_l, H_l, W_l)``.
            boxes: ``(R, 5)`` rows ``(batch_index, x1, y1, x2, y2)``, or a list of ``(R_b, 4)``.
            image_size: ``(H, W)``, the size each layer is upsampled to.
            labels: ``(R,)`` int64 with ``num_classes``.
            box_bias: ``(R, K*K, M)`` per-box term, or None.

        Returns:
            ``(R, M, oh, ow)``.
        """
        maps, weights = self._layers(features)
        # The fused operator's checks (shapes, batch indices, labels), so both heads refuse alike.
        _, boxes, _, _, labels = normalise_fused_hypercolumn(
            maps, boxes, weights, self.bias, output_size=self.output_size, image_size=image_size, labels=labels,
            activation=self.activation, padding=self.padding, box_bias=box_bias, autocast=autocast_device(maps))[:5]
        image = self._hypercolumn_image(maps, image_size)
        oh, ow = self.output_size
        batch, x, y, u, v = box_grid_points(boxes, oh, ow)
        columns = self._sample(image, batch.long(), x, y)
        if labels is not None:
            labels = labels.repeat_interleave(oh * ow)
        if box_bias is not None:
            box_bias = box_bias.repeat_interleave(oh * ow, dim=0)
        out = self._classify(columns, self._location_weights(u, v, image.dtype), weights, labels, box_bias)
        return out.reshape(boxes.shape[0], oh, ow, -1).permute(0, 3, 1, 2)

    def forward_points(self, features: Sequence[Tensor], points: Tensor, image_size: Sequence[int],
                       locations: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                       box_bias: Optional[Tensor] = None) -> Tensor:
        """As :meth:`HypercolumnHead.forward_points`, with ``image_size`` required.

        Args:
            features: L maps ``(B, C_l, H_l, W_l)``.
            points: ``(N, 3)`` rows ``(batch_index, x, y)``.
            image_size: ``(H, W)``.
            locations: ``(N, 2)`` rows ``(u, v)``; required when ``grid_size > 1``.
            labels: ``(N,)`` int64 with ``num_classes``.
            box_bias: ``(N, K*K, M)`` per-point term, or None.

        Returns:
            ``(N, M)``.

        Raises:
            ValueError: ``locations`` missing while ``grid_size > 1``.
        """
        maps, weights = self._layers(features)
        _, points, locations, _, _, labels = normalise_fused_hypercolumn_points(
            maps, points, weights, self.bias, locations=locations, image_size=image_size, labels=labels,
            activation=self.activation, padding=self.padding, box_bias=box_bias, autocast=autocast_device(maps))[:6]
        image = self._hypercolumn_image(maps, image_size)
        columns = self._sample(image, points[:, 0].long(), points[:, 1], points[:, 2])
        if locations is None:
            if self.grid_size > 1:
                raise ValueError(f"locations: required when grid_size > 1 (got {self.grid_size})")
            alpha = columns.new_ones(points.shape[0], 1)
        else:
            alpha = self._location_weights(locations[:, 0], locations[:, 1], image.dtype)
        return self._classify(columns, alpha, weights, labels, box_bias)


class Hypercolumn(nn.Module):
    """Hypercolumn descriptors of a list of feature maps: at points (:func:`sparse_hypercolumn`)
    or, when ``output_size`` is given, on a grid inside each box (:func:`box_hypercolumn`).

    Args:
        output_size: None for points, else ``(oh, ow)`` grid per box (or one int for both).
        image_size: ``(H, W)`` of the image the network saw (or give it to ``forward``); or
        spatial_scale: one float or one per layer (feature pixels per image pixel).
        padding: ``"border"``, ``"zeros"`` or ``"zeros_per_tap"``.
        sampling_ratio, aligned: for boxes, as :func:`hypercolumn_ops.box_hypercolumn`'s.
    """

    def __init__(self, output_size: Optional[Size] = None, image_size: Optional[Sequence[int]] = None,
                 spatial_scale: Optional[Union[float, Sequence[float]]] = None, padding: str = "border",
                 sampling_ratio: int = 1, aligned: bool = True):
        super().__init__()
        check_padding(padding)
        check_sampling(sampling_ratio, aligned)
        self.output_size = None if output_size is None else _pair(output_size)
        self.image_size = None if image_size is None else tuple(image_size)
        self.spatial_scale = spatial_scale
        self.padding = padding
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, features: Sequence[Tensor], rois: Union[Tensor, Sequence[Tensor]],
                image_size: Optional[Sequence[int]] = None) -> Tensor:
        """Hypercolumns at points or on box grids.

        Args:
            features: L maps ``(B, C_l, H_l, W_l)``.
            rois: points ``(N, 3)`` rows ``(batch_index, x, y)`` without ``output_size``; boxes
                ``(R, 5)`` rows ``(batch_index, x1, y1, x2, y2)`` (or a list of ``(R_b, 4)``) with
                it. Image pixels.
            image_size: ``(H, W)``; overrides the module's.

        Returns:
            ``(N, sum C_l)`` (:func:`hypercolumn_ops.sparse_hypercolumn`) or
            ``(R, sum C_l, oh, ow)`` (:func:`hypercolumn_ops.box_hypercolumn`).
        """
        size = self.image_size if image_size is None else tuple(image_size)
        if self.output_size is None:
            return sparse_hypercolumn(features, rois, image_size=size, spatial_scale=self.spatial_scale,
                                      padding=self.padding)
        return box_hypercolumn(features, rois, self.output_size, image_size=size,
                               spatial_scale=self.spatial_scale, padding=self.padding,
                               sampling_ratio=self.sampling_ratio, aligned=self.aligned)

    def extra_repr(self) -> str:
        scale = f"image_size={self.image_size}" if self.spatial_scale is None else \
            f"spatial_scale={self.spatial_scale}"
        text = f"output_size={self.output_size}, {scale}, padding={self.padding!r}"
        if self.sampling_ratio != 1 or not self.aligned:
            text += f", sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        return text

