"""Backbones that return the feature maps a hypercolumn is made of.

``HypercolumnFeatures`` wraps any torchvision-traceable network with
``torchvision.models.feature_extraction.create_feature_extractor`` and returns the chosen
layers as a list, in the order given, ready for the operators and heads of this package.
Presets: VGG16 (the paper's network: pool2, conv4_3, conv5_3) and ResNet-50 (layer1..layer4),
plus a small network for experiments on a CPU.

``MaskRCNNHypercolumnHead`` and :func:`use_hypercolumn_masks` put the paper's hypercolumn
classifier, over every level of the feature pyramid, in place of the mask branch of
torchvision's Mask R-CNN.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor

from .hed import HED, hed  # noqa: F401  (HED, its head fused: hypercolumn_ops.hed)
from .nn import HypercolumnHead

# torchvision's vgg16().features: conv1_1 is features.0; pool2 is features.9; conv4_3 is
# features.21 and its ReLU features.22; conv5_3 features.28, its ReLU features.29.
VGG16_LAYERS = {"features.9": "pool2", "features.22": "conv4_3", "features.29": "conv5_3"}
VGG16_CHANNELS = [128, 512, 512]
VGG16_STRIDES = [4, 8, 16]

RESNET50_LAYERS = {"layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "layer4": "layer4"}
RESNET50_CHANNELS = [256, 512, 1024, 2048]
RESNET50_STRIDES = [4, 8, 16, 32]


def small_backbone(widths: Sequence[int] = (16, 32, 64), in_channels: int = 3) -> nn.Sequential:
    """A few 3x3 conv + BatchNorm + ReLU stages at strides 2, 4, 8, ... (one stage per width,
    each halving the resolution, then a second conv). The stages are the ``nn.Sequential``'s
    children ``"0"``, ``"1"``, ...; :meth:`HypercolumnFeatures.small` names them ``stage1``,
    ``stage2``, ...

    Args:
        widths: output channels of each stage.
        in_channels: channels of the input images.

    Returns:
        An ``nn.Sequential`` mapping ``(B, in_channels, H, W)`` to
        ``(B, widths[-1], ceil(H / 2^S), ceil(W / 2^S))`` for ``S = len(widths)`` stages; stage
        ``s`` (from 1) gives ``(B, widths[s - 1], ceil(H / 2^s), ceil(W / 2^s))``.
    """
    stages = []
    previous = in_channels
    for width in widths:
        stages.append(nn.Sequential(
            nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()))
        previous = width
    return nn.Sequential(*stages)


class HypercolumnFeatures(nn.Module):
    """The feature maps of chosen layers of a backbone.

    Args:
        backbone: a module that ``torch.fx`` can trace (any torchvision classification model);
            the layers above the last one chosen are pruned from the graph and never run.
        layers: graph node names (see ``torchvision.models.feature_extraction.get_graph_node_names``),
            or a dict ``{node name: readable name}``. The output keeps this order.
        channels: channel count of each layer; measured with one small forward pass when None.
        strides: nominal stride (input pixels per feature pixel) of each layer, for information.
        probe_size: side of the zero image ``(1, 3, probe_size, probe_size)`` that measures the
            channels when ``channels`` is None.

    Attributes:
        channels: ``C_l`` of each layer, in order (what :class:`hypercolumn_ops.nn.HypercolumnHead`
            takes as ``in_channels``).
        layer_names: the readable name of each layer.
        strides: the strides given, or None.

    ``forward(images (B, 3, H, W)) -> [ (B, C_l, H_l, W_l) for each layer ]``.

    Raises:
        ValueError: ``layers`` empty or a string; ``channels`` not one count per layer.
    """

    def __init__(self, backbone: nn.Module, layers, channels: Optional[Sequence[int]] = None,
                 strides: Optional[Sequence[int]] = None, probe_size: int = 64):
        super().__init__()
        if isinstance(layers, str) or not layers:
            raise ValueError(f"layers: expected a non-empty list or dict of graph node names, got {layers!r}")
        names: Dict[str, str] = dict(layers) if isinstance(layers, dict) else {n: n for n in layers}
        self.nodes = list(names)
        self.layer_names = list(names.values())
        # Keys of the returned dict must be valid identifiers for the traced module.
        self.body = create_feature_extractor(backbone, return_nodes={n: f"out{i}" for i, n in enumerate(self.nodes)})
        self.strides = None if strides is None else list(strides)
        if channels is None:
            channels = self._measure_channels(probe_size)
        if len(channels) != len(self.nodes):
            raise ValueError(f"channels: expected one count per layer ({len(self.nodes)}), got {len(channels)}")
        self.channels = list(channels)

    @torch.no_grad()
    def _measure_channels(self, probe_size: int) -> List[int]:
        parameter = next(self.body.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        dtype = parameter.dtype if parameter is not None else torch.float32
        training = self.body.training
        self.body.eval()
        try:
            maps = self(torch.zeros(1, 3, probe_size, probe_size, device=device, dtype=dtype))
        finally:
            self.body.train(training)
        return [m.shape[1] for m in maps]

    def forward(self, images: Tensor) -> List[Tensor]:
        """Images ``(B, 3, H, W)`` -> the chosen layers' maps ``[(B, C_l, H_l, W_l), ...]``, in
        the order of ``layers``; ``H_l`` is about ``H / stride_l``."""
        out = self.body(images)
        return [out[f"out{i}"] for i in range(len(self.nodes))]

    def extra_repr(self) -> str:
        return f"layers={self.layer_names}, channels={self.channels}, strides={self.strides}"

    @classmethod
    def vgg16(cls, weights=None, **kwargs) -> "HypercolumnFeatures":
        """VGG16's pool2, conv4_3, conv5_3 (after ReLU): 128, 512, 512 channels at strides 4,
        8, 16. ``weights`` as in ``torchvision.models.vgg16`` (None: random, no download)."""
        import torchvision

        return cls(torchvision.models.vgg16(weights=weights, **kwargs), VGG16_LAYERS, VGG16_CHANNELS,
                   VGG16_STRIDES)

    @classmethod
    def resnet50(cls, weights=None, **kwargs) -> "HypercolumnFeatures":
        """ResNet-50's layer1..layer4: 256, 512, 1024, 2048 channels at strides 4, 8, 16, 32.
        ``weights`` as in ``torchvision.models.resnet50`` (None: random, no download)."""
        import torchvision

        return cls(torchvision.models.resnet50(weights=weights, **kwargs), RESNET50_LAYERS, RESNET50_CHANNELS,
                   RESNET50_STRIDES)

    @classmethod
    def small(cls, widths: Sequence[int] = (16, 32, 64)) -> "HypercolumnFeatures":
        """:func:`small_backbone`: every stage, strides 2, 4, 8, ..."""
        return cls(small_backbone(widths), {str(i): f"stage{i + 1}" for i in range(len(widths))}, list(widths),
                   [2 ** (i + 1) for i in range(len(widths))])


class MaskRCNNHypercolumnHead(nn.Module):
    """The mask branch of torchvision's Mask R-CNN as one hypercolumn classifier: per box, a
    ``K x K`` grid of location-specific classifiers over the hypercolumn of all the chosen
    pyramid levels, one mask logit per class (:class:`hypercolumn_ops.nn.HypercolumnHead`,
    fused: no RoI features are pooled).

    It takes the place of ``roi_heads.mask_roi_pool``, with ``mask_head`` and ``mask_predictor``
    identities (:func:`use_hypercolumn_masks` does it), so torchvision's mask loss and inference
    run on its logits unchanged.

    Args:
        in_channels: channels of each level (one int for all, as FPN's ``out_channels``).
        num_classes: classes of the detector, background included.
        featmap_names: the levels read, keys of the backbone's output (FPN: ``"0"`` .. ``"3"``,
            strides 4 .. 32).
        grid_size: ``K``.
        output_size: the mask grid per box (torchvision's mask branch: 28 x 28).
        class_agnostic: one mask per box, shown to torchvision as every class's (an expanded
            view, no copy), as in Mask R-CNN's class-agnostic variant: ``K*K`` score channels per
            level instead of ``K*K*num_classes``, which is most of the head's time and memory
            with many classes (``benchmarks/mask_rcnn.py``).

    ``forward(features {name: (B, C, H_l, W_l)}, boxes [(R_b, 4) per image, (x1, y1, x2, y2) in
    pixels of the batch's images], image_shapes [(h, w) per image]) -> (R, num_classes, oh, ow)``
    logits, boxes in image order.

    Raises:
        ValueError: ``in_channels`` not one count per level. Each level's scale is a power of two, inferred from the
    largest image as ``torchvision.ops.MultiScaleRoIAlign`` does. The grid samples at pixel
    centres (``roi_align(aligned=True)``), where torchvision projects its mask targets with
    ``aligned=False``: half an image pixel apart, a small part of a mask cell unless the box is
    only a few tens of pixels across.
    """

    def __init__(self, in_channels: Union[int, Sequence[int]], num_classes: int,
                 featmap_names: Sequence[str] = ("0", "1", "2", "3"), grid_size: int = 5,
                 output_size: Union[int, Tuple[int, int]] = 28, class_agnostic: bool = False):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.num_classes = num_classes
        if isinstance(in_channels, int):
            in_channels = [in_channels] * len(self.featmap_names)
        if len(in_channels) != len(self.featmap_names):
            raise ValueError(f"in_channels: expected one count per level ({len(self.featmap_names)}), "
                             f"got {list(in_channels)}")
        self.classifier = HypercolumnHead(in_channels, num_outputs=1 if class_agnostic else num_classes,
                                          grid_size=grid_size, output_size=output_size)

    def forward(self, features: Dict[str, Tensor], boxes: List[Tensor],
                image_shapes: List[Tuple[int, int]]) -> Tensor:
        """Mask logits of every box.

        Args:
            features: the backbone's output, ``{name: (B, C, H_l, W_l)}``; the levels of
                ``featmap_names`` are read.
            boxes: one ``(R_b, 4)`` tensor per image, rows ``(x1, y1, x2, y2)`` in pixels of the
                (padded) batch's images.
            image_shapes: ``(h, w)`` of each image before padding; the largest sets the levels'
                scales (:func:`pyramid_scales`).

        Returns:
            ``(R, num_classes, oh, ow)`` logits, ``R = sum R_b``, boxes in image order; with
            ``class_agnostic`` an expanded view of ``(R, 1, oh, ow)``.
        """
        maps = [features[name] for name in self.featmap_names]
        logits = self.classifier(maps, boxes, spatial_scale=pyramid_scales(maps, image_shapes))
        return logits.expand(-1, self.num_classes, -1, -1)


def pyramid_scales(maps: Sequence[Tensor], image_shapes: Sequence[Tuple[int, int]]) -> List[float]:
    """The scale of each map of a padded batch: the power of two nearest ``H_l / max h`` (and
    ``W_l / max w``; they must agree), as ``torchvision.ops.MultiScaleRoIAlign`` infers it.

    Args:
        maps: L maps ``(B, C_l, H_l, W_l)``.
        image_shapes: ``(h, w)`` of each image of the batch.

    Returns:
        L floats, feature pixels per image pixel (``spatial_scale`` for the operators).

    Raises:
        ValueError: no image shapes, or a map whose height and width give different scales.
    """
    if not image_shapes:
        raise ValueError("image_shapes: expected the (h, w) of each image, got none")
    height = max(shape[0] for shape in image_shapes)
    width = max(shape[1] for shape in image_shapes)
    scales = []
    for level, feature in enumerate(maps):
        scale_y = 2.0 ** round(math.log2(feature.shape[-2] / height))
        scale_x = 2.0 ** round(math.log2(feature.shape[-1] / width))
        if scale_y != scale_x:
            raise ValueError(f"maps[{level}]: its height and width give different scales ({scale_y} and {scale_x}) "
                             f"for images up to {height} x {width}")
        scales.append(scale_y)
    return scales


def use_hypercolumn_masks(model: nn.Module, grid_size: int = 5, output_size: Union[int, Tuple[int, int]] = 28,
                          featmap_names: Sequence[str] = ("0", "1", "2", "3"),
                          class_agnostic: bool = False) -> nn.Module:
    """Puts a :class:`MaskRCNNHypercolumnHead` in place of the mask branch of a torchvision
    ``MaskRCNN`` (``maskrcnn_resnet50_fpn`` and the like), in place, and returns the model. The
    head reads ``featmap_names`` with the backbone's ``out_channels`` and predicts as many
    classes as the replaced predictor (one mask for all with ``class_agnostic``). Train it as
    before: ``model(images, targets)`` gives ``loss_mask`` from its logits, and in eval mode
    ``masks`` ``(D, 1, H, W)`` per image.

    Args:
        model: a torchvision ``MaskRCNN``, changed in place.
        grid_size: ``K`` of the head's ``K x K`` classifiers.
        output_size: the mask grid per box (``(oh, ow)`` or one int; torchvision's is 28).
        featmap_names: the FPN levels the head reads.
        class_agnostic: one mask per box instead of one per class.

    Returns:
        ``model``.

    Raises:
        ValueError: ``model`` is not a ``MaskRCNN`` with its mask predictor.
    """
    heads = getattr(model, "roi_heads", None)
    predictor = getattr(heads, "mask_predictor", None)
    if predictor is None or not hasattr(predictor, "mask_fcn_logits"):
        raise ValueError("model: expected a torchvision MaskRCNN with its mask predictor "
                         "(roi_heads.mask_predictor.mask_fcn_logits)")
    heads.mask_roi_pool = MaskRCNNHypercolumnHead(model.backbone.out_channels, predictor.mask_fcn_logits.out_channels,
                                                  featmap_names, grid_size, output_size, class_agnostic)
    heads.mask_head = nn.Identity()
    heads.mask_predictor = nn.Identity()
    return model
