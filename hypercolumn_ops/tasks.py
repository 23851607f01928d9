"""The paper's three tasks as heads over hypercolumns, each with its targets, loss, decoding
and metric (Hariharan et al., CVPR 2015, Sections 4-6).

- :class:`FigureGroundTask`: a mask inside each detection box; class-specific classifiers picked
  by the box's label, sigmoid per classifier cell, per-pixel log loss; mean IoU over boxes, and
  AP^r over detections with :class:`MaskAveragePrecision`.
- :class:`KeypointTask`: one heat map per keypoint in each person box; per-pixel log loss
  against a disc around the keypoint; the arg-max decodes it; PCK.
- :class:`PartTask`: a part label per pixel of each box (softmax over parts and background);
  cross-entropy; mean IoU over parts.

Every target is cut out of the image on the box grid with the operators' coordinate rules:
grid point ``(i, j)`` of box ``(x1, y1, x2, y2)`` lies at ``x = x1 + (j + 0.5) (x2 - x1) / ow``,
``y = y1 + (i + 0.5) (y2 - y1) / oh``; a binary or soft map is sampled there bilinearly
(border padding, pixel ``i`` centred at ``i + 0.5``), a label map takes the pixel that contains
the point. Predictions go back to the image by the inverse map (:func:`paste_box_grids`).
"""

from typing import Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn import HypercolumnHead
from .ops import box_hypercolumn, without_autocast
from .reference import box_grid_points


def _indexed_boxes(boxes: Tensor) -> Tensor:
    """Boxes ``(R, 4)`` (or ``(R, 5)``, batch column dropped) -> ``(R, 5)`` rows ``(r, x1, y1,
    x2, y2)``: box ``r`` reads map ``r`` of a per-box stack."""
    boxes = boxes[:, -4:]
    return torch.cat([torch.arange(boxes.shape[0], dtype=boxes.dtype, device=boxes.device)[:, None], boxes], 1)


def box_grid_targets(maps: Tensor, boxes: Tensor, output_size: Tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Cut one target map per box out of the image, on the box's grid.

    Args:
        maps: ``(R, H, W)``, map ``r`` belongs to box ``r`` (an instance mask, a part label map).
        boxes: ``(R, 4)`` rows ``(x1, y1, x2, y2)`` in pixels of the maps (or ``(R, 5)`` with a
            leading batch column, ignored).
        output_size: ``(oh, ow)``.
        mode: ``"bilinear"`` (soft masks, float32; exactly :func:`box_hypercolumn` of the map)
            or ``"nearest"`` (the pixel containing the grid point: labels keep their dtype).

    Returns:
        ``(R, oh, ow)``.

    Raises:
        ValueError: an unknown ``mode``.
    """
    oh, ow = output_size
    rows = _indexed_boxes(boxes.to(torch.float32))
    if mode == "bilinear":
        if maps.shape[0] == 0:
            return maps.new_zeros(0, oh, ow, dtype=torch.float32)
        maps = maps.to(torch.float32)
        sampled = box_hypercolumn([maps[:, None]], rows, (oh, ow), spatial_scale=1.0)[:, 0]
        # Blend weights that sum to 1 in float32 can overshoot the maps' range by an ulp, which
        # binary_cross_entropy refuses for [0, 1] targets.
        return sampled.clamp(maps.amin(), maps.amax())
    if mode != "nearest":
        raise ValueError(f"mode: expected 'bilinear' or 'nearest', got {mode!r}")
    height, width = maps.shape[-2:]
    index, x, y, _, _ = box_grid_points(rows, oh, ow)
    column = x.floor().long().clamp(0, width - 1)
    row = y.floor().long().clamp(0, height - 1)
    return maps[index.long(), row, column].reshape(-1, oh, ow)


def paste_box_grids(grids: Tensor, boxes: Tensor, image_size: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """Put box-grid maps back into the image: the inverse of the box grid.

    Pixel ``(py, px)`` (centre ``(px + 0.5, py + 0.5)``) inside box ``r`` reads ``grids[r]``
    bilinearly at grid coordinate ``((px + 0.5 - x1) ow / (x2 - x1) - 0.5, ...)``, clamped to
    the grid.

    Args:
        grids: ``(R, M, oh, ow)``.
        boxes: ``(R, 4)`` or ``(R, 5)`` (batch column ignored), image pixels.
        image_size: ``(H, W)``.

    Returns:
        ``(R, M, H, W)`` values (0 outside the box) and ``(R, H, W)`` whether each pixel centre
        lies inside the box.
    """
    height, width = image_size
    boxes = boxes[:, -4:].to(grids.dtype)
    px = torch.arange(width, dtype=grids.dtype, device=grids.device) + 0.5
    py = torch.arange(height, dtype=grids.dtype, device=grids.device) + 0.5
    x1, y1, x2, y2 = (boxes[:, c, None] for c in range(4))
    gx = 2 * (px[None] - x1) / (x2 - x1) - 1  # (R, W): align_corners=False normalised coordinates
    gy = 2 * (py[None] - y1) / (y2 - y1) - 1  # (R, H)
    grid = torch.stack([gx[:, None, :].expand(-1, height, -1), gy[:, :, None].expand(-1, -1, width)], dim=-1)
    values = F.grid_sample(grids, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = ((px[None] >= x1) & (px[None] < x2))[:, None, :] & ((py[None] >= y1) & (py[None] < y2))[:, :, None]
    return values * inside[:, None].to(values.dtype), inside


def confusion_matrix(predicted: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``(num_classes, num_classes)`` int64 counts, rows = target, columns = prediction."""
    flat = target.reshape(-1).long() * num_classes + predicted.reshape(-1).long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(confusion: Tensor) -> Tensor:
    """IoU of every class from a confusion matrix (NaN where a class is absent from both)."""
    confusion = confusion.to(torch.float64)
    intersection = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    return intersection / union


class MaskAveragePrecision:
    """AP^r, the average precision of instance masks (Hariharan et al., ECCV 2014; the paper's
    figure-ground score), per category at one or more mask-IoU thresholds.

    Feed it one image at a time (:meth:`update`), then :meth:`compute`. In each image the
    detections are taken in decreasing score (ties in the given order); a detection is a true
    positive when its best-overlapping ground-truth mask of the same category (the highest mask
    IoU, the first on ties) reaches the threshold and no earlier detection took that mask, else a
    false positive, as in PASCAL VOC. AP is the area under the precision-recall curve with
    precision made non-increasing (VOC 2010 on), over all detections of the category in all
    images.

    Args:
        num_classes: categories ``0 .. num_classes - 1``.
        iou_thresholds: the mask-IoU thresholds (AP^r at 0.5 and 0.7 in the papers).

    Raises:
        ValueError: ``num_classes < 1``; in :meth:`update`, shapes that do not match or a
            category outside ``[0, num_classes)``.
    """

    def __init__(self, num_classes: int, iou_thresholds: Sequence[float] = (0.5, 0.7)):
        if num_classes < 1:
            raise ValueError(f"num_classes: expected a positive count, got {num_classes}")
        self.num_classes = num_classes
        self.iou_thresholds = tuple(float(t) for t in iou_thresholds)
        self._scores: list = []     # per image: (D,) float64 scores
        self._labels: list = []     # per image: (D,) int64 categories
        self._positive: list = []   # per image: (T, D) bool, true positive at each threshold
        self._ground_truth = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, masks: Tensor, scores: Tensor, labels: Tensor, target_masks: Tensor,
               target_labels: Tensor) -> None:
        """Adds one image: detections ``masks`` ``(D, H, W)`` (bool, or anything with zero as
        background), ``scores`` ``(D,)``, ``labels`` ``(D,)``; ground truth ``target_masks``
        ``(G, H, W)`` and ``target_labels`` ``(G,)``."""
        if masks.dim() != 3 or target_masks.dim() != 3 or masks.shape[1:] != target_masks.shape[1:]:
            raise ValueError(f"masks, target_masks: expected (D, H, W) and (G, H, W) of one image size, got "
                             f"{tuple(masks.shape)} and {tuple(target_masks.shape)}")
        if scores.shape != (masks.shape[0],) or labels.shape != (masks.shape[0],):
            raise ValueError(f"scores, labels: expected ({masks.shape[0]},) each, got {tuple(scores.shape)} and "
                             f"{tuple(labels.shape)}")
        if target_labels.shape != (target_masks.shape[0],):
            raise ValueError(f"target_labels: expected ({target_masks.shape[0]},), got {tuple(target_labels.shape)}")
        for name, values in (("labels", labels), ("target_labels", target_labels)):
            if values.numel() and (values.min() < 0 or values.max() >= self.num_classes):
                raise ValueError(f"{name}: expected categories in [0, {self.num_classes}), got "
                                 f"{values.min().item()} .. {values.max().item()}")
        labels, target_labels, scores = labels.long().cpu(), target_labels.long().cpu(), scores.double().cpu()
        order = torch.sort(scores, descending=True, stable=True).indices
        pred = masks.bool().flatten(1)[order].float()
        truth = target_masks.bool().flatten(1).float()
        intersection = (pred @ truth.T).cpu().double()  # (D, G)
        union = pred.sum(1).cpu().double()[:, None] + truth.sum(1).cpu().double()[None] - intersection
        iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.zeros_like(union))
        labels = labels[order]
        iou = iou.masked_fill(labels[:, None] != target_labels[None], -1.0)  # other categories never match
        positive = torch.zeros(len(self.iou_thresholds), len(order), dtype=torch.bool)
        if target_labels.numel():
            best, match = iou.max(dim=1)
            for t, threshold in enumerate(self.iou_thresholds):
                taken = torch.zeros(target_labels.numel(), dtype=torch.bool)
                for d in range(len(order)):
                    if best[d] >= threshold and not taken[match[d]]:
                        taken[match[d]] = True
                        positive[t, d] = True
        self._scores.append(scores[order])
        self._labels.append(labels)
        self._positive.append(positive)
        self._ground_truth += torch.bincount(target_labels, minlength=self.num_classes)

    def compute(self) -> Tensor:
        """``(T, num_classes)`` float64 AP per threshold and category; NaN for a category with no
        ground truth. ``compute().nanmean(1)`` is the mean AP at each threshold."""
        thresholds = len(self.iou_thresholds)
        ap = torch.full((thresholds, self.num_classes), float("nan"), dtype=torch.float64)
        if not self._scores:
            return ap
        scores, labels = torch.cat(self._scores), torch.cat(self._labels)
        positive = torch.cat(self._positive, dim=1)
        for k in range(self.num_classes):
            if self._ground_truth[k] == 0:
                continue
            mine = labels == k
            order = torch.sort(scores[mine], descending=True, stable=True).indices
            for t in range(thresholds):
                true = positive[t, mine][order].double().cumsum(0)
                precision = true / torch.arange(1, len(order) + 1, dtype=torch.float64)
                recall = true / self._ground_truth[k].double()
                # Non-increasing precision, then the area under the recall steps.
                envelope = precision.flip(0).cummax(0).values.flip(0)
                steps = torch.diff(recall, prepend=recall.new_zeros(1))
                ap[t, k] = (envelope * steps).sum()
        return ap


class FigureGroundTask(nn.Module):
    """Figure-ground segmentation inside detection boxes (the paper's SDS refinement).

    Args:
        in_channels: ``C_l`` of each layer.
        num_classes: detection categories; each has its own ``K x K`` classifiers.
        grid_size, output_size: as in :class:`~hypercolumn_ops.nn.HypercolumnHead`.
        head: the head class (``HypercolumnHead`` or ``NaiveHypercolumnHead``).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, grid_size: int = 5,
                 output_size: Tuple[int, int] = (50, 50), head: Type[nn.Module] = HypercolumnHead):
        super().__init__()
        self.head = head(in_channels, 1, grid_size, output_size, num_classes=num_classes, activation="sigmoid")

    def forward(self, features: Sequence[Tensor], boxes: Tensor, image_size: Sequence[int],
                labels: Tensor) -> Tensor:
        """Foreground probability ``(R, oh, ow)`` on each box's grid, from the maps ``features``
        ``[(B, C_l, H_l, W_l), ...]`` of images of ``image_size = (H, W)``; ``boxes`` ``(R, 5)``
        rows ``(batch_index, x1, y1, x2, y2)`` in image pixels, ``labels`` ``(R,)`` int64
        categories."""
        return self.head(features, boxes, image_size, labels)[:, 0]

    def targets(self, masks: Tensor, boxes: Tensor) -> Tensor:
        """Instance masks ``(R, H, W)`` (one per box) -> soft targets ``(R, oh, ow)`` in [0, 1]."""
        return box_grid_targets(masks, boxes, self.head.output_size, "bilinear")

    @staticmethod
    def loss(probabilities: Tensor, targets: Tensor) -> Tensor:
        """Mean per-pixel log loss, in float32; also inside ``torch.autocast``, which refuses
        ``binary_cross_entropy`` on CUDA (the head's sigmoid acts per cell, before the blend, so
        there are no logits to give ``binary_cross_entropy_with_logits``)."""
        with without_autocast(probabilities.device.type):
            return F.binary_cross_entropy(probabilities.float(), targets.float())

    @staticmethod
    def decode(probabilities: Tensor, boxes: Tensor, image_size: Sequence[int], threshold: float = 0.5) -> Tensor:
        """Box-grid probabilities ``(R, oh, ow)`` -> boolean masks ``(R, H, W)`` in the image."""
        values, _ = paste_box_grids(probabilities[:, None].float(), boxes.float(), image_size)
        return values[:, 0] >= threshold

    @staticmethod
    def metric(masks: Tensor, target_masks: Tensor) -> Tensor:
        """Per-box IoU ``(R,)`` of predicted and true masks ``(R, H, W)`` (1 where both are empty).
        Its mean is the task's score."""
        masks, target_masks = masks.bool().flatten(1), target_masks.bool().flatten(1)
        intersection = (masks & target_masks).sum(1).double()
        union = (masks | target_masks).sum(1).double()
        return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


class KeypointTask(nn.Module):
    """Keypoint heat maps, one per keypoint, on the grid of each person box.

    A grid point is a positive for keypoint ``j`` when it lies within ``radius`` grid cells of
    it (a disc in grid units, so every box has the same number of positives).

    Args:
        in_channels: ``C_l`` of each layer.
        num_keypoints: ``J`` heat maps.
        radius: disc radius in grid cells.
        grid_size, output_size, head: as in :class:`FigureGroundTask`.
    """

    def __init__(self, in_channels: Sequence[int], num_keypoints: int, grid_size: int = 5,
                 output_size: Tuple[int, int] = (50, 50), radius: float = 1.5,
                 head: Type[nn.Module] = HypercolumnHead):
        super().__init__()
        self.radius = radius
        self.head = head(in_channels, num_keypoints, grid_size, output_size)

    def forward(self, features: Sequence[Tensor], boxes: Tensor, image_size: Sequence[int]) -> Tensor:
        """Heat-map logits ``(R, J, oh, ow)`` from the maps ``[(B, C_l, H_l, W_l), ...]`` of
        images of ``image_size = (H, W)``; ``boxes`` ``(R, 5)`` rows
        ``(batch_index, x1, y1, x2, y2)`` in image pixels."""
        return self.head(features, boxes, image_size)

    def targets(self, keypoints: Tensor, boxes: Tensor) -> Tuple[Tensor, Tensor]:
        """Keypoints ``(R, J, 3)`` rows ``(x, y, visible)`` in image pixels -> binary heat maps
        ``(R, J, oh, ow)`` and visibility ``(R, J)`` bool."""
        oh, ow = self.head.output_size
        boxes = boxes[:, -4:].to(keypoints.dtype)
        # Keypoint in grid units: grid point (i, j) sits at (j + 0.5, i + 0.5).
        gx = ((keypoints[..., 0] - boxes[:, None, 0]) * ow / (boxes[:, None, 2] - boxes[:, None, 0]))[..., None, None]
        gy = ((keypoints[..., 1] - boxes[:, None, 1]) * oh / (boxes[:, None, 3] - boxes[:, None, 1]))[..., None, None]
        j = torch.arange(ow, dtype=keypoints.dtype, device=keypoints.device) + 0.5
        i = torch.arange(oh, dtype=keypoints.dtype, device=keypoints.device) + 0.5
        distance2 = (j[None, None, None, :] - gx) ** 2 + (i[None, None, :, None] - gy) ** 2
        visible = keypoints[..., 2] > 0
        return (distance2 <= self.radius ** 2) & visible[..., None, None], visible

    @staticmethod
    def loss(logits: Tensor, heat_maps: Tensor, visible: Tensor) -> Tensor:
        """Mean per-pixel log loss over the heat maps of visible keypoints: logits and heat maps
        ``(R, J, oh, ow)``, visibility ``(R, J)``; a 0-d float32 tensor."""
        per_map = F.binary_cross_entropy_with_logits(logits.float(), heat_maps.float(), reduction="none").mean((2, 3))
        weight = visible.float()
        return (per_map * weight).sum() / weight.sum().clamp(min=1)

    @staticmethod
    def decode(logits: Tensor, boxes: Tensor) -> Tuple[Tensor, Tensor]:
        """Arg-max of each heat map -> image coordinates ``(R, J, 2)`` of that grid point
        and its score ``(R, J)`` (sigmoid of the logit)."""
        count, joints, oh, ow = logits.shape
        best, where = logits.flatten(2).max(dim=2)
        i, j = (where // ow).to(torch.float64), (where % ow).to(torch.float64)
        boxes = boxes[:, -4:].to(torch.float64)
        x = boxes[:, None, 0] + (j + 0.5) * (boxes[:, None, 2] - boxes[:, None, 0]) / ow
        y = boxes[:, None, 1] + (i + 0.5) * (boxes[:, None, 3] - boxes[:, None, 1]) / oh
        return torch.stack([x, y], dim=-1), torch.sigmoid(best)

    @staticmethod
    def metric(predicted: Tensor, keypoints: Tensor, boxes: Tensor, alpha: float = 0.1) -> Tensor:
        """PCK: the fraction of visible keypoints predicted within ``alpha * max(box w, h)``.

        ``predicted`` ``(R, J, 2)``, ``keypoints`` ``(R, J, 3)`` rows ``(x, y, visible)``,
        ``boxes`` ``(R, 4)`` or ``(R, 5)``. Returns a 0-d float64 tensor (NaN with no visible
        keypoint)."""
        boxes = boxes[:, -4:].to(torch.float64)
        size = torch.maximum((boxes[:, 2] - boxes[:, 0]).abs(), (boxes[:, 3] - boxes[:, 1]).abs())
        distance = (predicted.to(torch.float64) - keypoints[..., :2].to(torch.float64)).norm(dim=-1)
        visible = keypoints[..., 2] > 0
        correct = (distance <= alpha * size[:, None]) & visible
        return correct.sum().double() / visible.sum().double()


class PartTask(nn.Module):
    """Part labeling inside object boxes: a softmax over ``num_parts`` parts and background (0).

    Args:
        in_channels: ``C_l`` of each layer.
        num_parts: ``P`` parts; outputs ``P + 1`` scores per pixel, class 0 the background.
        grid_size, output_size, head: as in :class:`FigureGroundTask`.
    """

    def __init__(self, in_channels: Sequence[int], num_parts: int, grid_size: int = 5,
                 output_size: Tuple[int, int] = (50, 50), head: Type[nn.Module] = HypercolumnHead):
        super().__init__()
        self.num_parts = num_parts
        self.head = head(in_channels, num_parts + 1, grid_size, output_size)

    def forward(self, features: Sequence[Tensor], boxes: Tensor, image_size: Sequence[int]) -> Tensor:
        """Scores ``(R, P + 1, oh, ow)`` (logits of the softmax) from the maps
        ``[(B, C_l, H_l, W_l), ...]`` of images of ``image_size = (H, W)``; ``boxes`` ``(R, 5)``
        rows ``(batch_index, x1, y1, x2, y2)`` in image pixels."""
        return self.head(features, boxes, image_size)

    def targets(self, part_maps: Tensor, boxes: Tensor) -> Tensor:
        """Part label maps ``(R, H, W)`` int64 (0 background, one per box) -> ``(R, oh, ow)``,
        the label of the pixel containing each grid point."""
        return box_grid_targets(part_maps, boxes, self.head.output_size, "nearest")

    @staticmethod
    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        """Mean per-pixel cross-entropy of scores ``(R, P + 1, oh, ow)`` against labels
        ``(R, oh, ow)``; a 0-d float32 tensor."""
        return F.cross_entropy(logits.float(), targets.long())

    @staticmethod
    def decode(logits: Tensor, boxes: Tensor, image_size: Sequence[int]) -> Tensor:
        """Scores ``(R, P + 1, oh, ow)`` -> labels ``(R, H, W)`` in the image (background
        outside the box)."""
        values, inside = paste_box_grids(logits.float(), boxes.float(), image_size)
        return torch.where(inside, values.argmax(dim=1), torch.zeros_like(inside, dtype=torch.long))

    def metric(self, labels: Tensor, target_labels: Tensor) -> Tensor:
        """Mean IoU over the parts (background excluded) of labels ``(R, H, W)``, pooled over
        all boxes; parts absent from both are left out. Returns a 0-d float64 tensor."""
        iou = iou_per_class(confusion_matrix(labels, target_labels, self.num_parts + 1))[1:]
        return iou[~iou.isnan()].mean()
