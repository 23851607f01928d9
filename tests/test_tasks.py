"""Task heads: targets on the box grid, losses, decoding and metrics on hand-made cases whose
answers are known."""

import math

import pytest
import torch

import hypercolumn_ops
from hypercolumn_ops.tasks import (FigureGroundTask, KeypointTask, MaskAveragePrecision, PartTask, box_grid_targets,
                                   confusion_matrix, iou_per_class, paste_box_grids)

BACKENDS = hypercolumn_ops.available_backends("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_box_grid_targets_follow_the_grid_rule(backend):
    """Grid point (i, j) of box (x1, y1, x2, y2) lies at x = x1 + (j + 0.5)(x2 - x1)/ow: for box
    (2, 1, 8, 5) and a 2 x 3 grid, x = 3, 5, 7 and y = 2, 4."""
    height, width = 6, 10
    column_of = torch.arange(width).expand(height, width)[None]  # label = the pixel's column
    row_of = torch.arange(height)[:, None].expand(height, width)[None]
    box = torch.tensor([[2.0, 1.0, 8.0, 5.0]])
    with hypercolumn_ops.use_backend(backend):
        assert box_grid_targets(column_of, box, (2, 3), "nearest").tolist() == [[[3, 5, 7], [3, 5, 7]]]
        assert box_grid_targets(row_of, box, (2, 3), "nearest").tolist() == [[[2, 2, 2], [4, 4, 4]]]
        # Pixel centres hold x: bilinear sampling of a linear ramp returns x itself inside the image.
        ramp = (torch.arange(width) + 0.5).expand(height, width)[None]
        assert box_grid_targets(ramp, box, (2, 3), "bilinear").tolist() == [[[3.0, 5.0, 7.0], [3.0, 5.0, 7.0]]]
        # A half-covered pixel pair: x = 3.5 lies between the centres of pixels 2 (value 0) and 3 (value 1).
        step = (torch.arange(width) >= 3).expand(height, width)[None]
        soft = box_grid_targets(step, torch.tensor([[3.0, 0.0, 4.0, 6.0]]), (1, 1), "bilinear")
        assert soft.item() == 1.0
        soft = box_grid_targets(step, torch.tensor([[2.5, 0.0, 3.5, 6.0]]), (1, 1), "bilinear")
        assert soft.item() == 0.5
        assert box_grid_targets(step[:0], box, (2, 3)).shape == (0, 2, 3)
    with pytest.raises(ValueError, match="mode"):
        box_grid_targets(step, box, (2, 3), "bicubic")


@pytest.mark.parametrize("backend", BACKENDS)
def test_paste_inverts_a_pixel_aligned_grid(backend):
    """A box on pixel edges with one grid point per pixel: cutting a mask out and pasting it
    back returns the mask inside the box and zeros outside."""
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(1, 9, 12, generator=g) > 0.5
    box = torch.tensor([[2.0, 3.0, 10.0, 7.0]])
    with hypercolumn_ops.use_backend(backend):
        grid = box_grid_targets(mask, box, (4, 8), "nearest")
    pasted, inside = paste_box_grids(grid[:, None].float(), box, (9, 12))
    expected_inside = torch.zeros(1, 9, 12, dtype=torch.bool)
    expected_inside[:, 3:7, 2:10] = True
    assert torch.equal(inside, expected_inside)
    assert torch.equal(pasted[:, 0], (mask & expected_inside).float())


def test_figure_ground_loss_decode_metric():
    targets = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert FigureGroundTask.loss(targets.clone(), targets).item() == 0.0
    assert math.isclose(FigureGroundTask.loss(torch.full_like(targets, 0.5), targets).item(), math.log(2), rel_tol=1e-6)
    # Probabilities 0.7 over a 2 x 2 grid in box (1, 1, 5, 3) of a 4 x 6 image: the box's pixels.
    masks = FigureGroundTask.decode(torch.full((1, 2, 2), 0.7), torch.tensor([[0, 1.0, 1.0, 5.0, 3.0]]), (4, 6))
    expected = torch.zeros(1, 4, 6, dtype=torch.bool)
    expected[0, 1:3, 1:5] = True
    assert torch.equal(masks, expected)
    assert not FigureGroundTask.decode(torch.full((1, 2, 2), 0.3), torch.tensor([[1.0, 1.0, 5.0, 3.0]]), (4, 6)).any()
    # IoU: a 2 x 2 square inside a 2 x 4 rectangle -> 4 / 8; both empty -> 1; disjoint -> 0.
    square, rectangle, empty = (torch.zeros(4, 6, dtype=torch.bool) for _ in range(3))
    square[0:2, 0:2] = True
    rectangle[0:2, 0:4] = True
    disjoint = torch.zeros(4, 6, dtype=torch.bool)
    disjoint[3, 5] = True
    iou = FigureGroundTask.metric(torch.stack([square, empty, square]), torch.stack([rectangle, empty, disjoint]))
    assert iou.tolist() == [0.5, 1.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_figure_ground_picks_the_classifier_of_the_label(backend):
    """Class 1's classifiers say foreground (bias +8), class 0's background (bias -8), every
    weight 0: each box's probability is sigmoid(+-8), as its label says."""
    task = FigureGroundTask([3, 4], num_classes=2, grid_size=2, output_size=(3, 3))
    with torch.no_grad():
        for weight in task.head.weight:
            weight.zero_()
        task.head.bias[0] = -8.0
        task.head.bias[1] = 8.0
    features = [torch.randn(1, 3, 4, 4), torch.randn(1, 4, 2, 2)]
    boxes = torch.tensor([[0, 0.0, 0.0, 8.0, 8.0], [0, 2.0, 2.0, 6.0, 6.0]])
    with hypercolumn_ops.use_backend(backend):
        probabilities = task(features, boxes, (8, 8), torch.tensor([1, 0]))
    assert probabilities.shape == (2, 3, 3)
    torch.testing.assert_close(probabilities[0], torch.full((3, 3), torch.sigmoid(torch.tensor(8.0)).item()))
    torch.testing.assert_close(probabilities[1], torch.full((3, 3), torch.sigmoid(torch.tensor(-8.0)).item()))


def test_keypoint_targets_decode_and_pck():
    task = KeypointTask([4], num_keypoints=2, output_size=(10, 10), radius=0.5)
    box = torch.tensor([[0, 10.0, 20.0, 30.0, 60.0]])  # 2 x 4 pixels per grid cell
    # Keypoint 0 on grid point (i=6, j=3): x = 10 + 3.5 * 2 = 17, y = 20 + 6.5 * 4 = 46; keypoint 1 hidden.
    keypoints = torch.tensor([[[17.0, 46.0, 1.0], [12.0, 30.0, 0.0]]])
    heat, visible = task.targets(keypoints, box)
    assert visible.tolist() == [[True, False]]
    assert heat[0, 0].nonzero().tolist() == [[6, 3]]
    assert not heat[0, 1].any()
    task.radius = 1.0  # the four neighbours at distance 1 join
    heat, _ = task.targets(keypoints, box)
    assert sorted(heat[0, 0].nonzero().tolist()) == [[5, 3], [6, 2], [6, 3], [6, 4], [7, 3]]

    logits = torch.full((1, 2, 10, 10), -5.0)
    logits[0, 0, 6, 3] = 5.0
    logits[0, 1, 0, 9] = 5.0
    coordinates, scores = KeypointTask.decode(logits, box)
    assert coordinates.tolist() == [[[17.0, 46.0], [29.0, 22.0]]]
    torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([[5.0, 5.0]])))

    # PCK@0.1 of a 100 x 50 box: within 10 pixels. Distances 5 (hit), 15 (miss); hidden ignored.
    boxes = torch.tensor([[0.0, 0.0, 100.0, 50.0]])
    truth = torch.tensor([[[10.0, 10.0, 1.0], [50.0, 20.0, 1.0], [0.0, 0.0, 0.0]]])
    predicted = torch.tensor([[[13.0, 14.0], [50.0, 35.0], [90.0, 40.0]]])
    assert KeypointTask.metric(predicted, truth, boxes).item() == 0.5
    assert KeypointTask.metric(predicted, truth, boxes, alpha=0.2).item() == 1.0


def test_keypoint_loss_ignores_hidden_keypoints():
    heat = torch.zeros(1, 2, 3, 3, dtype=torch.bool)
    heat[0, 0, 1, 1] = True
    visible = torch.tensor([[True, False]])
    logits = torch.full((1, 2, 3, 3), -20.0)
    logits[0, 0, 1, 1] = 20.0
    logits[0, 1] = 20.0  # all wrong, but hidden
    assert KeypointTask.loss(logits, heat, visible).item() < 1e-8  # log(1 + e^-20) ~ 2e-9
    # One visible map at logit 0 everywhere: log 2 per pixel.
    assert math.isclose(KeypointTask.loss(torch.zeros(1, 2, 3, 3), heat, visible).item(), math.log(2), rel_tol=1e-6)


def test_part_targets_loss_decode_metric():
    task = PartTask([4], num_parts=3, output_size=(2, 2))
    parts = torch.tensor([[[0, 0, 0, 0], [0, 1, 2, 0], [0, 3, 3, 0], [0, 0, 0, 0]]])
    targets = task.targets(parts, torch.tensor([[1.0, 1.0, 3.0, 3.0]]))
    assert targets.tolist() == [[[1, 2], [3, 3]]]
    logits = torch.nn.functional.one_hot(targets, 4).permute(0, 3, 1, 2).float() * 30
    assert PartTask.loss(logits, targets).item() < 1e-10  # log(1 + 3 e^-30) ~ 3e-13
    assert math.isclose(PartTask.loss(torch.zeros(1, 4, 2, 2), targets).item(), math.log(4), rel_tol=1e-6)
    # Part 2 wins everywhere inside box (1, 1, 3, 3); outside the box is background.
    constant = torch.zeros(1, 4, 2, 2)
    constant[:, 2] = 1.0
    labels = PartTask.decode(constant, torch.tensor([[0, 1.0, 1.0, 3.0, 3.0]]), (4, 4))
    expected = torch.zeros(1, 4, 4, dtype=torch.long)
    expected[0, 1:3, 1:3] = 2
    assert torch.equal(labels, expected)
    # Parts IoU against the hand-made map: part 1: 0 / 1, part 2: 1 / 4, part 3: 0 / 2 -> mean 1/12.
    assert math.isclose(task.metric(labels, parts).item(), (0 + 0.25 + 0) / 3)
    assert task.metric(parts, parts).item() == 1.0


def test_confusion_and_iou():
    truth = torch.tensor([0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0])
    confusion = confusion_matrix(predicted, truth, 4)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    iou = iou_per_class(confusion)
    assert iou[:3].tolist() == [1 / 3, 2 / 3, 0.0]
    assert iou[3].isnan()  # absent from both: left out of means


def _square_masks(corners, size=10):
    """Boolean masks ``(len(corners), size, size)``, mask ``n`` the square ``[x0, x1) x [y0, y1)``
    of ``corners[n] = (x0, y0, x1, y1)``."""
    masks = torch.zeros(len(corners), size, size, dtype=torch.bool)
    for n, (x0, y0, x1, y1) in enumerate(corners):
        masks[n, y0:y1, x0:x1] = True
    return masks


def test_mask_ap_perfect_detections_score_one():
    truth = _square_masks([(0, 0, 4, 4), (5, 5, 9, 9), (0, 6, 3, 9)])
    labels = torch.tensor([0, 1, 0])
    ap = MaskAveragePrecision(3)
    ap.update(truth, torch.tensor([0.3, 0.9, 0.5]), labels, truth, labels)
    result = ap.compute()
    assert result.shape == (2, 3)
    assert torch.equal(result[:, :2], torch.ones(2, 2, dtype=torch.float64))
    assert result[:, 2].isnan().all()  # category 2 has no ground truth


def test_mask_ap_by_hand():
    # One category, two true masks in two images. Detections in score order: 0.9 hits mask A
    # (IoU 1), 0.8 is a duplicate of A (false positive), 0.7 overlaps mask B with IoU 12/16 =
    # 0.75, 0.6 has no mask to hit. Precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1: the
    # area under the non-increasing envelope is 1/2 * 1 + 1/2 * 2/3.
    ap = MaskAveragePrecision(1, iou_thresholds=(0.5, 0.8))
    a, b = _square_masks([(0, 0, 4, 4)]), _square_masks([(2, 2, 6, 6)])
    ap.update(_square_masks([(0, 0, 4, 4), (0, 0, 4, 4)]), torch.tensor([0.9, 0.8]), torch.tensor([0, 0]),
              a, torch.tensor([0]))
    ap.update(_square_masks([(2, 3, 6, 6), (7, 7, 9, 9)]), torch.tensor([0.7, 0.6]), torch.tensor([0, 0]),
              b, torch.tensor([0]))
    result = ap.compute()
    torch.testing.assert_close(result[0, 0].item(), 0.5 + 0.5 * 2 / 3, rtol=0, atol=1e-12)
    # At 0.8 the 0.7 detection misses too: recall stops at 1/2.
    torch.testing.assert_close(result[1, 0].item(), 0.5, rtol=0, atol=1e-12)


def test_mask_ap_matches_within_category_and_image():
    # A detection of the wrong category, or of the right mask in another image, is a false
    # positive; a missed true mask lowers recall.
    ap = MaskAveragePrecision(2, iou_thresholds=(0.5,))
    square = _square_masks([(1, 1, 5, 5)])
    ap.update(square, torch.tensor([0.9]), torch.tensor([1]), square, torch.tensor([0]))
    ap.update(square, torch.tensor([0.8]), torch.tensor([0]), square[:0], torch.tensor([], dtype=torch.long))
    ap.update(square[:0], torch.tensor([]), torch.tensor([], dtype=torch.long), square, torch.tensor([0]))
    result = ap.compute()
    assert result[0, 0].item() == 0.0  # two true masks of category 0, its one detection in the wrong image
    assert result[0, 1].isnan()  # category 1: a detection, no ground truth


def test_mask_ap_ranks_across_images_by_score():
    # Detections are ranked by score over all images, not in the order the images came.
    ap = MaskAveragePrecision(1, iou_thresholds=(0.5,))
    square, other = _square_masks([(1, 1, 5, 5)]), _square_masks([(6, 6, 9, 9)])
    ap.update(other, torch.tensor([0.4]), torch.tensor([0]), square, torch.tensor([0]))
    ap.update(square, torch.tensor([0.9]), torch.tensor([0]), square, torch.tensor([0]))
    # Ranking 0.9 (hit), 0.4 (miss): precision 1 at recall 1/2, the second true mask never found.
    torch.testing.assert_close(ap.compute()[0, 0].item(), 0.5, rtol=0, atol=1e-12)
    swapped = MaskAveragePrecision(1, iou_thresholds=(0.5,))
    swapped.update(other, torch.tensor([0.95]), torch.tensor([0]), square, torch.tensor([0]))
    swapped.update(square, torch.tensor([0.9]), torch.tensor([0]), square, torch.tensor([0]))
    # Ranking 0.95 (miss), 0.9 (hit): precision 1/2 at recall 1/2.
    torch.testing.assert_close(swapped.compute()[0, 0].item(), 0.25, rtol=0, atol=1e-12)


def test_mask_ap_rejects_bad_arguments():
    ap = MaskAveragePrecision(2)
    square = _square_masks([(1, 1, 5, 5)])
    with pytest.raises(ValueError, match="target_labels"):
        ap.update(square, torch.tensor([0.5]), torch.tensor([0]), square, torch.tensor([2]))
    with pytest.raises(ValueError, match="scores, labels"):
        ap.update(square, torch.tensor([0.5, 0.1]), torch.tensor([0]), square, torch.tensor([0]))
    with pytest.raises(ValueError, match="one image size"):
        ap.update(square, torch.tensor([0.5]), torch.tensor([0]), _square_masks([(1, 1, 5, 5)], size=12),
                  torch.tensor([0]))
    with pytest.raises(ValueError, match="num_classes"):
        MaskAveragePrecision(0)
