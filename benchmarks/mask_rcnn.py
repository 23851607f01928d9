"""The mask branch of torchvision's Mask R-CNN against the hypercolumn head that
``hypercolumn_ops.models.use_hypercolumn_masks`` puts in its place, alone, on COCO-sized inputs.

- ``torchvision``: ``MultiScaleRoIAlign`` (levels "0" .. "3", 14 x 14, sampling ratio 2),
  ``MaskRCNNHeads`` (four 3x3 convolutions of 256 channels) and ``MaskRCNNPredictor`` (a 2x
  deconvolution and a 1x1 convolution to one 28 x 28 logit map per class), as
  ``maskrcnn_resnet50_fpn`` builds them.
- ``hypercolumn``: ``MaskRCNNHypercolumnHead``: a K x K grid of classifiers per class over the
  hypercolumn of the same four levels, fused, 28 x 28 logits per class.
- ``hypercolumn-agnostic``: the same with one mask for all classes (``class_agnostic=True``).

Inputs: FPN maps of 256 channels at strides 4 .. 32 of a padded batch (two 800 x 1088 images by
default, COCO's size after torchvision's resize), and the boxes the mask branch sees in training
(``--boxes`` per image: 512 sampled proposals, 25% positive), 32 to 400 pixels a side. Modes:
forward under ``torch.no_grad()``, and forward+backward into the maps and the branch's
parameters. Records the median time and the peak memory (CUDA: ``max_memory_allocated`` over the
call; CPU: the peak resident-set growth of a fresh process running only that call).

Usage: python benchmarks/mask_rcnn.py [--device cuda] [--dtype bfloat16] [--classes 91] [--out DIR]
"""

import argparse
import json
import os
import sys
from typing import Dict, List

import torch
from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hypercolumn_ops.models import MaskRCNNHypercolumnHead  # noqa: E402
from methods import FORWARD, FORWARD_BACKWARD, MODES, cuda_peak_bytes, time_calls  # noqa: E402
from run import DTYPES, machine_info, memory_in_fresh_process, peak_rss_growth  # noqa: E402

LEVELS = ("0", "1", "2", "3")
STRIDES = (4, 8, 16, 32)
CHANNELS = 256
METHODS = ("torchvision", "hypercolumn", "hypercolumn-agnostic")


class TorchvisionMaskBranch(nn.Module):
    """RoIAlign, the mask head and the predictor, called as ``RoIHeads`` calls them."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.pool = MultiScaleRoIAlign(list(LEVELS), 14, 2)
        self.head = MaskRCNNHeads(CHANNELS, [256, 256, 256, 256], 1)
        self.predictor = MaskRCNNPredictor(256, 256, num_classes)

    def forward(self, features, boxes, image_shapes):
        return self.predictor(self.head(self.pool(features, boxes, image_shapes)))


def branch(method: str, num_classes: int) -> nn.Module:
    if method == "torchvision":
        return TorchvisionMaskBranch(num_classes)
    return MaskRCNNHypercolumnHead(CHANNELS, num_classes, LEVELS, class_agnostic=method == "hypercolumn-agnostic")


def inputs(args, device: torch.device, dtype: torch.dtype, requires_grad: bool):
    g = torch.Generator().manual_seed(0)
    height, width = args.image_size
    features = {name: torch.randn(args.images, CHANNELS, height // s, width // s, generator=g).to(device, dtype)
                .requires_grad_(requires_grad) for name, s in zip(LEVELS, STRIDES)}
    boxes = []
    for _ in range(args.images):
        size = 32 + torch.rand(args.boxes, 2, generator=g) * 368
        corner = torch.rand(args.boxes, 2, generator=g) * (torch.tensor([width, height]) - size)
        boxes.append(torch.cat([corner, corner + size], 1).to(device, dtype))
    return features, boxes, [(height, width)] * args.images


def make_call(args, method: str, mode: str, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    module = branch(method, args.classes).to(device, dtype)
    features, boxes, image_shapes = inputs(args, device, dtype, mode == FORWARD_BACKWARD)
    if mode == FORWARD:
        def call():
            with torch.no_grad():
                return module(features, boxes, image_shapes)
        return call
    gradient = torch.randn(args.images * args.boxes, args.classes, 28, 28, generator=torch.Generator().manual_seed(1))
    gradient = gradient.to(device, dtype)
    leaves = [*features.values(), *module.parameters()]

    def call():
        out = module(features, boxes, image_shapes)
        torch.autograd.grad(out, leaves, gradient)
        return out
    return call


def measure(args, method: str, mode: str, device: torch.device) -> Dict:
    dtype = DTYPES[args.dtype]
    call = make_call(args, method, mode, device, dtype)
    timing = time_calls(call, device, min_reps=args.repetitions, min_seconds=0.0, max_reps=args.repetitions)
    row = {"method": method, "mode": mode, "median_ms": timing["median_ms"], "times_ms": timing["times_ms"]}
    if device.type == "cuda":
        row["peak_bytes"] = cuda_peak_bytes(call, device)
    else:
        row.update(memory_in_fresh_process([os.path.abspath(__file__), *args.argv, "--measure-memory", method, mode]))
    return row


def markdown(report: Dict) -> str:
    settings, machine = report["settings"], report["machine"]
    lines = ["# Mask R-CNN's mask branch: torchvision's against the hypercolumn head\n",
             f"{machine.get('gpu') or machine['cpu']}, {settings['dtype']}, torch {machine['torch']}, "
             f"{machine['date']}; {settings['images']} images of {settings['image_size'][0]} x "
             f"{settings['image_size'][1]}, {settings['boxes']} boxes each, {settings['classes']} classes; "
             f"median of {settings['repetitions']} calls; `python benchmarks/mask_rcnn.py {settings['command']}`.\n",
             "| mode | branch | ms | speed-up | peak MiB |", "|---|---|---:|---:|---:|"]
    stock = {row["mode"]: row["median_ms"] for row in report["rows"] if row["method"] == "torchvision"}
    for row in report["rows"]:
        memory = f"{row['peak_bytes'] / 2 ** 20:,.0f}" if "peak_bytes" in row else row.get("error", "")
        lines.append(f"| {row['mode']} | {row['method']} | {row['median_ms']:,.1f} | "
                     f"{stock[row['mode']] / row['median_ms']:.2f}x | {memory} |")
    return "\n".join(lines) + "\n"


def parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--classes", type=int, default=91, help="classes with background (COCO: 91)")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1088), metavar=("H", "W"))
    parser.add_argument("--boxes", type=int, default=128, help="boxes per image")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--out", help="folder for mask_rcnn.json and mask_rcnn.md")
    parser.add_argument("--measure-memory", nargs=2, metavar=("METHOD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(argv)
    return args


def main(argv: List[str]) -> None:
    args = parse(argv)
    device = torch.device(args.device)
    if args.measure_memory:
        method, mode = args.measure_memory
        call = make_call(args, method, mode, device, DTYPES[args.dtype])
        print(json.dumps({"peak_bytes": peak_rss_growth(call)}))
        return
    rows = []
    for mode in MODES:
        for method in METHODS:
            rows.append(measure(args, method, mode, device))
            print(f"{mode:>16} {method:>12}: {rows[-1]['median_ms']:,.1f} ms", flush=True)
    settings = {key: getattr(args, key) for key in ("dtype", "classes", "images", "image_size", "boxes", "repetitions")}
    settings["command"] = " ".join(args.argv)
    report = {"machine": machine_info(device), "settings": settings, "rows": rows}
    text = markdown(report)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "mask_rcnn.json"), "w") as file:
            json.dump(report, file, indent=1)
        with open(os.path.join(args.out, "mask_rcnn.md"), "w") as file:
            file.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
