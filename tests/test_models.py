"""Backbone presets (random weights, nothing downloaded): layers, channel counts, strides."""

import pytest
import torch
import torchvision

import hypercolumn_ops

from hypercolumn_ops.models import HypercolumnFeatures, small_backbone
from hypercolumn_ops.nn import HypercolumnHead

# (preset, channels, strides): VGG16 pool2 / conv4_3 / conv5_3, ResNet-50 layer1..4, the small net.
PRESETS = [
    ("vgg16", [128, 512, 512], [4, 8, 16]),
    ("resnet50", [256, 512, 1024, 2048], [4, 8, 16, 32]),
    ("small", [16, 32, 64], [2, 4, 8]),
]


@pytest.mark.parametrize("preset, channels, strides", PRESETS)
def test_preset_layers(preset, channels, strides):
    torch.manual_seed(0)
    model = getattr(HypercolumnFeatures, preset)().eval()
    assert model.channels == channels
    assert model.strides == strides
    height, width = 64, 96
    with torch.no_grad():
        maps = model(torch.randn(2, 3, height, width))
    assert [m.shape[1] for m in maps] == channels
    assert [tuple(m.shape[2:]) for m in maps] == [(height // s, width // s) for s in strides]
    # Measured channels agree with the preset's table.
    assert model._measure_channels(64) == channels
    assert f"channels={channels}" in repr(model)


def test_vgg16_layers_are_the_named_activations():
    """pool2 is features[:10] of torchvision's VGG16, conv4_3 (after ReLU) features[:23],
    conv5_3 (after ReLU) features[:30]."""
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).eval()
    model = HypercolumnFeatures(vgg, {"features.9": "pool2", "features.22": "conv4_3", "features.29": "conv5_3"})
    image = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        maps = model(image)
        expected = [vgg.features[:10](image), vgg.features[:23](image), vgg.features[:30](image)]
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want)  # the same float32 convolutions in the same order
    assert model.layer_names == ["pool2", "conv4_3", "conv5_3"]


@pytest.mark.parametrize("backend", hypercolumn_ops.available_backends("cpu"))
def test_custom_backbone_measures_channels_and_feeds_a_head(backend):
    backbone = small_backbone((8, 12))
    model = HypercolumnFeatures(backbone, ["0", "1"])
    assert model.channels == [8, 12]
    assert model.strides is None
    images = torch.randn(2, 3, 40, 56)
    head = HypercolumnHead(model.channels, 3, grid_size=2, output_size=(6, 5))
    with hypercolumn_ops.use_backend(backend):
        out = head(model(images), torch.tensor([[0, 1.0, 2.0, 30.0, 35.0], [1, 10.0, 0.0, 56.0, 40.0]]), (40, 56))
        out.sum().backward()
    assert out.shape == (2, 3, 6, 5)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters() if p.dim() == 4)


def test_bad_layers():
    with pytest.raises(ValueError, match="layers"):
        HypercolumnFeatures(small_backbone(), [])
    with pytest.raises(ValueError, match="channels"):
        HypercolumnFeatures(small_backbone(), ["0", "1"], channels=[16])
