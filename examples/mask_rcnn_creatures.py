"""Train torchvision's Mask R-CNN on the synthetic creatures of ``train_hypercolumns.py`` with
each mask branch, everything else equal (detector, seed, data, steps):

- ``torchvision``: its own branch (RoIAlign 14 x 14, four 3x3 convolutions, a deconvolution,
  one 28 x 28 map per class);
- ``hypercolumn``: ``hypercolumn_ops.models.use_hypercolumn_masks``, per class;
- ``hypercolumn-agnostic``: the same, one mask for all classes.

The detector is a ResNet-18 FPN (random weights, BatchNorm trained) on 64 x 64 images. Reports,
on held-out images: AP^r at mask IoU 0.5 and 0.7 of the detections' masks
(``hypercolumn_ops.tasks.MaskAveragePrecision``), the mean IoU of the mask each branch predicts in
each ground-truth box with its true category (the mask branch alone), and the median time of a
training step.

    python examples/mask_rcnn_creatures.py
"""

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.roi_heads import maskrcnn_inference, paste_masks_in_image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hypercolumn_ops.models import use_hypercolumn_masks  # noqa: E402
from hypercolumn_ops.tasks import MaskAveragePrecision  # noqa: E402
from train_hypercolumns import NUM_CLASSES, SyntheticCreatures, render  # noqa: E402

BRANCHES = ("torchvision", "hypercolumn", "hypercolumn-agnostic")


def build(branch: str, size: int) -> nn.Module:
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d,
                                   trainable_layers=5)
    # Category 0 is the background: the creatures' categories are shifted by one. An image holds
    # one or two objects: a few hundred proposals and 64 sampled RoIs per image are plenty (the
    # COCO defaults, 2,000 and 512, would spend most of a CPU step in the box head).
    model = MaskRCNN(backbone, num_classes=NUM_CLASSES + 1, min_size=size, max_size=size,
                     rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150, rpn_pre_nms_top_n_test=150,
                     rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64, box_batch_size_per_image=64,
                     box_detections_per_img=20)
    if branch != "torchvision":
        use_hypercolumn_masks(model, class_agnostic=branch == "hypercolumn-agnostic")
    return model


def detection_pair(item: Dict[str, torch.Tensor]):
    """A rendered image and its objects as torchvision's detection models take them."""
    target = {"boxes": item["boxes"], "labels": item["labels"] + 1, "masks": item["masks"].to(torch.uint8)}
    return item["image"], target


def masks_in_true_boxes(model: nn.Module, images: List[torch.Tensor], targets: List[Dict]) -> List[torch.Tensor]:
    """The mask branch alone: each ground-truth box's mask for its true category, pasted into
    the image, as probabilities ``(G, H, W)`` per image."""
    batch, _ = model.transform(images)
    features = model.backbone(batch.tensors)
    heads = model.roi_heads
    boxes = [t["boxes"] for t in targets]
    logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, boxes, batch.image_sizes)))
    probabilities = maskrcnn_inference(logits, [t["labels"] for t in targets])
    return [paste_masks_in_image(p, b, image.shape[-2:])[:, 0] for p, b, image in zip(probabilities, boxes, images)]


@torch.no_grad()
def evaluate(model: nn.Module, args) -> Dict[str, float]:
    model.eval()
    metric = MaskAveragePrecision(NUM_CLASSES)
    intersection = union = 0.0
    for first in range(0, args.val_images, args.batch_size):
        pairs = [detection_pair(render(10_000_000 + i, args.image_size))
                 for i in range(first, min(first + args.batch_size, args.val_images))]
        images, targets = [p[0] for p in pairs], [p[1] for p in pairs]
        for found, target in zip(model(images), targets):
            metric.update(found["masks"][:, 0] >= 0.5, found["scores"], found["labels"] - 1, target["masks"],
                          target["labels"] - 1)
        for predicted, target in zip(masks_in_true_boxes(model, images, targets), targets):
            predicted, truth = predicted >= 0.5, target["masks"].bool()
            intersection += (predicted & truth).sum().item()
            union += (predicted | truth).sum().item()
    ap = metric.compute().nanmean(1)
    model.train()
    return {"AP^r 0.5": ap[0].item(), "AP^r 0.7": ap[1].item(), "mask IoU in true boxes": intersection / union}


def train(branch: str, args) -> Dict[str, float]:
    torch.manual_seed(args.seed)
    model = build(branch, args.image_size)
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    warmup = torch.optim.lr_scheduler.LinearLR(optimiser, start_factor=0.01, total_iters=min(100, args.steps))
    data = SyntheticCreatures(args.steps * args.batch_size, args.seed, args.image_size)
    times = []
    progress = tqdm(range(args.steps), desc=branch, disable=args.quiet)
    for step in progress:
        pairs = [detection_pair(data[step * args.batch_size + i]) for i in range(args.batch_size)]
        begin = time.perf_counter()
        losses = model([p[0] for p in pairs], [p[1] for p in pairs])
        loss = sum(losses.values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        warmup.step()
        times.append(time.perf_counter() - begin)
        progress.set_postfix(loss=f"{loss.item():.3f}", mask=f"{losses['loss_mask'].item():.3f}")
    return {**evaluate(model, args), "step ms": 1e3 * statistics.median(times)}


def markdown(results: Dict[str, Dict[str, float]], args) -> str:
    lines = ["# Mask R-CNN on the synthetic creatures: torchvision's mask branch and the hypercolumn head\n",
             f"ResNet-18 FPN, random weights, {args.image_size} x {args.image_size} images, {args.steps} steps of "
             f"{args.batch_size} images, lr {args.lr}, seed {args.seed}; {args.val_images} held-out images; "
             f"{torch.get_num_threads()} torch threads, torch {torch.__version__}.\n",
             "| mask branch | AP^r 0.5 | AP^r 0.7 | mask IoU in true boxes | step ms |", "|---|---:|---:|---:|---:|"]
    for branch, row in results.items():
        lines.append(f"| {branch} | {row['AP^r 0.5']:.3f} | {row['AP^r 0.7']:.3f} | "
                     f"{row['mask IoU in true boxes']:.3f} | {row['step ms']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> Dict[str, Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--branches", nargs="+", choices=BRANCHES, default=list(BRANCHES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--val-images", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", help="a Markdown file for the table")
    args = parser.parse_args(argv)
    results = {branch: train(branch, args) for branch in args.branches}
    text = markdown(results, args)
    print(text)
    if args.out:
        with open(args.out, "w") as file:
            file.write(text)
    return results


if __name__ == "__main__":
    main()
