"""Backbones that return the feature maps a hypercolumn is made of.

``HypercolumnFeatures`` wraps any torchvision-traceable network with
``torchvision.models.feature_extraction.create_feature_extractor`` and returns the chosen
layers as a list, in the order given, ready for the operators and heads of this package.
Presets: VGG16 (the paper's network: pool2, conv4_3, conv5_3) and ResNet-50 (layer1..layer4),
plus a small network for experiments on a CPU.
"""

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor

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
    each halving the resolution, then a second conv), named ``stage1``, ``stage2``, ..."""
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

    ``forward(images (B, 3, H, W)) -> [ (B, C_l, H_l, W_l) for each layer ]``.
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

