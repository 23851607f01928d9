"""Backbone presets (random weights, nothing downloaded): layers, channel counts, strides; the
hypercolumn mask branch of torchvision's Mask R-CNN."""

import pytest
import torch
import torchvision

import hypercolumn_ops

from hypercolumn_ops.models import (HypercolumnFeatures, MaskRCNNHypercolumnHead, pyramid_scales, small_backbone,
                                    use_hypercolumn_masks)
from hypercolumn_ops.nn import HypercolumnHead

# (preset, channels, strides): VGG16 pool2 / conv4_3 / conv5_3, ResNet-50 layer1..4, the small net.
PRESETS = [
    ("vgg16", [128, 512, 512], [4, 8, 16]),
    ("resnet50", [256, 512, 1024, 2048], [4, 8, 16, 32]),
    ("small", [16, 32, 64], [2, 4, 8]),
]


@pytest.mark.parametrize("preset, channels, strides", PRESETS)
@pytest.mark.slow
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


@pytest.mark.slow
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


def test_mask_rcnn_hypercolumn_head_is_the_fused_classifier_at_the_pyramid_scales():
    """On a padded batch of two images (largest 100 x 150, padded to 128 x 160), the levels at
    strides 4 .. 32 get scales 1/4 .. 1/32, and the head is fused_hypercolumn of the reference
    with those scales, the boxes of both images in order and one logit per class."""
    g = torch.Generator().manual_seed(0)
    head = MaskRCNNHypercolumnHead([3, 5, 4, 2], num_classes=4, grid_size=3, output_size=(7, 6)).double()
    features = {name: torch.randn(2, c, 128 // s, 160 // s, generator=g, dtype=torch.float64)
                for name, c, s in zip("0123", (3, 5, 4, 2), (4, 8, 16, 32))}
    features["pool"] = torch.randn(2, 2, 2, 3, generator=g, dtype=torch.float64)  # not read
    boxes = [torch.tensor([[3.0, 4.0, 60.0, 90.5]], dtype=torch.float64),
             torch.tensor([[0.0, 0.0, 130.0, 120.0], [20.5, 7.0, 41.0, 33.0]], dtype=torch.float64)]
    image_shapes = [(100, 150), (90, 130)]
    assert pyramid_scales(list(features.values())[:4], image_shapes) == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    rows = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=torch.float64), b], 1)
                      for i, b in enumerate(boxes)])
    with hypercolumn_ops.use_backend("reference"):
        expected = hypercolumn_ops.fused_hypercolumn(
            [features[n] for n in "0123"], rows, list(head.classifier.weight), head.classifier.bias,
            output_size=(7, 6), spatial_scale=[1 / 4, 1 / 8, 1 / 16, 1 / 32])
    logits = head(features, boxes, image_shapes)
    assert logits.shape == (3, 4, 7, 6)
    # Both are the same float64 formula; the compiled kernels may sum in another order.
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)


def test_mask_rcnn_hypercolumn_head_class_agnostic_shows_one_mask_as_every_class():
    g = torch.Generator().manual_seed(2)
    head = MaskRCNNHypercolumnHead(3, num_classes=5, featmap_names=["a", "b"], grid_size=2, output_size=4,
                                   class_agnostic=True)
    assert head.classifier.num_outputs == 1
    features = {"a": torch.randn(1, 3, 8, 8, generator=g), "b": torch.randn(1, 3, 4, 4, generator=g)}
    logits = head(features, [torch.tensor([[1.0, 2.0, 20.0, 25.0]])], [(30, 32)])
    assert logits.shape == (1, 5, 4, 4)
    assert logits.stride(1) == 0  # a view: nothing is copied per class
    one = head.classifier(list(features.values()), [torch.tensor([[1.0, 2.0, 20.0, 25.0]])], spatial_scale=[1 / 4, 1 / 8])
    torch.testing.assert_close(logits, one.expand(-1, 5, -1, -1), rtol=0, atol=0)


@pytest.mark.parametrize("class_agnostic", [False, True], ids=["per-class", "class-agnostic"])
@pytest.mark.slow
def test_mask_rcnn_with_hypercolumn_masks_trains_and_predicts(class_agnostic):
    """torchvision's maskrcnn_resnet50_fpn with its mask branch replaced: training gives a
    finite loss_mask and gradients on every level's classifiers; eval gives one mask per
    detection at each image's size."""
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=96, max_size=128)
    assert use_hypercolumn_masks(model, grid_size=3, class_agnostic=class_agnostic) is model
    head = model.roi_heads.mask_roi_pool
    assert isinstance(head, MaskRCNNHypercolumnHead) and head.classifier.in_channels == [256] * 4
    assert head.classifier.num_outputs == (1 if class_agnostic else 3) and head.classifier.output_size == (28, 28)
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 80, 100, generator=g)]
    targets = []
    for image in images:
        masks = torch.zeros(2, *image.shape[1:], dtype=torch.uint8)
        masks[0, 20:60, 15:50] = 1
        masks[1, 10:40, 40:80] = 1
        targets.append({"boxes": torch.tensor([[15.0, 20.0, 50.0, 60.0], [40.0, 10.0, 80.0, 40.0]]),
                        "labels": torch.tensor([1, 2]), "masks": masks})
    model.train()
    losses = model(images, targets)
    assert torch.isfinite(losses["loss_mask"]) and losses["loss_mask"] > 0
    losses["loss_mask"].backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in head.classifier.weight)
    model.eval()
    with torch.no_grad():
        detections = model(images)
    for image, found in zip(images, detections):
        assert found["masks"].shape == (len(found["boxes"]), 1, *image.shape[1:])
        assert found["masks"].min() >= 0 and found["masks"].max() <= 1


def test_mask_rcnn_hypercolumn_errors():
    with pytest.raises(ValueError, match="MaskRCNN"):
        use_hypercolumn_masks(torchvision.models.detection.fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=3))
    with pytest.raises(ValueError, match="one count per level"):
        MaskRCNNHypercolumnHead([256, 256], num_classes=3)
    with pytest.raises(ValueError, match="different scales"):
        pyramid_scales([torch.zeros(1, 1, 32, 10)], [(128, 160)])


@pytest.mark.slow
def test_mask_rcnn_benchmark_runs_and_reports(tmp_path, monkeypatch):
    """benchmarks/mask_rcnn.py (run on the GPU by gpu_check.sh) on tiny inputs: every branch and
    mode gets a time and a memory figure, and the report is written."""
    import importlib
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    benchmark = importlib.import_module("mask_rcnn")
    benchmark.main(["--images", "1", "--image-size", "64", "96", "--boxes", "3", "--classes", "4",
                    "--repetitions", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "mask_rcnn.json").read_text())
    assert [(row["method"], row["mode"]) for row in report["rows"]] == [
        (method, mode) for mode in ("forward", "forward+backward") for method in benchmark.METHODS]
    assert all(row["median_ms"] > 0 and row["peak_bytes"] >= 0 for row in report["rows"])
    assert (tmp_path / "mask_rcnn.md").read_text().count("| forward") == 6


@pytest.mark.slow
def test_mask_rcnn_creatures_example_trains_and_evaluates(tmp_path, monkeypatch):
    """examples/mask_rcnn_creatures.py, two steps of the class-agnostic head: the metrics it
    reports are fractions and the table is written."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    example = importlib.import_module("mask_rcnn_creatures")
    results = example.main(["--branches", "hypercolumn-agnostic", "--steps", "2", "--batch-size", "2",
                            "--val-images", "3", "--quiet", "--out", str(tmp_path / "table.md")])
    row = results["hypercolumn-agnostic"]
    assert all(0 <= row[key] <= 1 for key in ("AP^r 0.5", "AP^r 0.7", "mask IoU in true boxes"))
    assert row["step ms"] > 0
    assert "| hypercolumn-agnostic |" in (tmp_path / "table.md").read_text()
