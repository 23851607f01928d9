"""Export two models that call the operators to ONNX and run them in ONNX Runtime (CPU provider),
against eager PyTorch:

- the figure-ground model of ``train_hypercolumns.py`` (the small backbone's three stages and
  ``FigureGroundTask``: class-specific 5 x 5 classifiers, sigmoid), untrained unless
  ``--checkpoint`` gives its ``state_dict``; exported with the image size and the number of boxes
  dynamic, and run on another size and count;
- torchvision's Mask R-CNN (ResNet-18 FPN, random weights) with
  ``hypercolumn_ops.models.use_hypercolumn_masks``, in eval mode, up to its detections and each
  detection's 28 x 28 mask (:class:`MaskRCNNDetections`). Its post-processing pastes every mask
  into the image in a Python loop over the detections, which ``torch.export`` cannot trace; the
  masks are pasted here with torchvision's own function and compared with the eager model's.

Prints the largest difference between ONNX Runtime and eager, and the median time of each.

    python examples/export_onnx.py [--checkpoint figure_ground.pt] [--out-dir DIR]
"""

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn
from torch._library import utils as library_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hypercolumn_ops.onnx as hc_onnx  # noqa: E402
from torchvision.models.detection.transform import resize_boxes  # noqa: E402

from train_hypercolumns import HypercolumnModel, render  # noqa: E402


class MaskRCNNDetections(nn.Module):
    """A torchvision ``MaskRCNN`` in eval mode on one image ``(3, H, W)`` -> its detections as
    tensors: ``boxes (D, 4)`` in the input image's pixels, ``labels (D,)``, ``scores (D,)`` and
    ``masks (D, 1, 28, 28)``, each detection's mask probabilities on its box (what
    ``torchvision.models.detection.roi_heads.paste_masks_in_image`` pastes into the image).
    Everything the model runs in eval mode but that paste, which loops over the detections in
    Python."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        model = self.model
        images, _ = model.transform([image])
        features = model.backbone(images.tensors)
        proposals, _ = model.rpn(images, features)
        detections, _ = model.roi_heads(features, proposals, images.image_sizes)
        found = detections[0]
        boxes = resize_boxes(found["boxes"], images.image_sizes[0], image.shape[-2:])
        return boxes, found["labels"], found["scores"], found["masks"]


@contextlib.contextmanager
def optional_tensors_count_as_unmutated():
    """While ``torch.export.draft_export`` and the export of its program run: an optional tensor
    argument passed None counts as not mutated. Both run every custom operator on real tensors too
    and check that it mutated none of its inputs; torch 2.14's check takes a None ``Tensor?``
    argument (the fused operators' ``labels`` without classes) for a mutated one and raises."""
    original = library_utils.zip_schema

    def zip_schema(schema, args, kwargs):
        for info, mutated in original(schema, args, kwargs):
            yield info, (False if mutated is None and library_utils.is_tensor_like_type(info.type) else mutated)

    library_utils.zip_schema = zip_schema
    try:
        yield
    finally:
        library_utils.zip_schema = original


def export_mask_rcnn(model: nn.Module, image: Tensor) -> "torch.onnx.ONNXProgram":
    """:class:`MaskRCNNDetections` of ``model`` exported to ONNX with this package's translations.

    ``torch.export.export`` stops at torchvision's data-dependent branches (``if boxes.numel() ==
    0`` in ``batched_nms``); ``torch.export.draft_export`` takes each such branch as ``image`` does
    (the count of detections stays dynamic), which is what a detector needs that finds something
    in its images."""
    with optional_tensors_count_as_unmutated():  # the ONNX exporter's decompositions run the check too
        program = torch.export.draft_export(MaskRCNNDetections(model).eval(), (image,))
        return hc_onnx.export(program)


def ort_session(program) -> "onnxruntime.InferenceSession":
    import onnxruntime

    return onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def save(program, args, name: str) -> None:
    """Save ``program`` as ``--out-dir/name`` where ``--out-dir`` is given."""
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        program.save(os.path.join(args.out_dir, name))


def median_ms(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        call()
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def creature_batch(seeds: List[int], size: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Images ``(B, 3, size, size)`` of the training example, their objects' boxes ``(R, 5)`` and
    labels ``(R,)``."""
    items = [render(seed, size) for seed in seeds]
    boxes = torch.cat([torch.cat([torch.full((len(item["boxes"]), 1), float(b)), item["boxes"]], 1)
                       for b, item in enumerate(items)])
    return torch.stack([item["image"] for item in items]), boxes, torch.cat([item["labels"] for item in items])


def figure_ground(args) -> Dict[str, float]:
    torch.manual_seed(0)
    model = HypercolumnModel("figure-ground", [0, 1, 2])
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))
    model.eval()
    images, boxes, labels = creature_batch([0, 1], 64)
    batch, side, count = torch.export.Dim("batch"), torch.export.Dim("side", min=2, max=128), torch.export.Dim("R")
    # The backbone halves the size three times: export the size as 8 * side.
    shapes = {"images": {0: batch, 2: 8 * side, 3: 8 * side}, "boxes": {0: count}, "labels": {0: count}}
    begin = time.perf_counter()
    program = hc_onnx.export(model, (images, boxes, labels), dynamic_shapes=shapes)
    export_s = time.perf_counter() - begin
    save(program, args, "figure_ground.onnx")
    session = ort_session(program)
    images, boxes, labels = creature_batch([2, 3, 4], 96)  # another image size, batch and box count
    feed = {"images": images.numpy(), "boxes": boxes.numpy(), "labels": labels.numpy()}
    ort_out = torch.from_numpy(session.run(None, feed)[0])
    with torch.no_grad():
        eager = model(images, boxes, labels)
        eager_ms = median_ms(lambda: model(images, boxes, labels), args.repeats)
    return {"export s": export_s, "max |ORT - eager|": float((ort_out - eager).abs().max()),
            "eager ms": eager_ms, "ORT ms": median_ms(lambda: session.run(None, feed), args.repeats),
            "images": f"{tuple(images.shape)}", "boxes": len(boxes)}


def mask_rcnn(args) -> Dict[str, float]:
    from mask_rcnn_creatures import build
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    torch.manual_seed(0)
    model = build("hypercolumn", args.image_size).eval()
    # Random weights score every box about alike (0.25 to 0.3): keep the best, so that the number
    # of detections varies from image to image (13, 20, 13, 17 on the images used here). The export's
    # image needs two or more: the exported program assumes a count is not 0 or 1.
    model.roi_heads.score_thresh = 0.27
    begin = time.perf_counter()
    program = export_mask_rcnn(model, render(0, args.image_size)["image"])
    export_s = time.perf_counter() - begin
    save(program, args, "mask_rcnn_detections.onnx")
    session = ort_session(program)
    name = session.get_inputs()[0].name
    differences = {"boxes": 0.0, "scores": 0.0, "masks (28 x 28)": 0.0, "masks (pasted)": 0.0}
    counts = []
    for seed in range(1, 4):
        image = render(seed, args.image_size)["image"]
        boxes, labels, scores, masks = (torch.from_numpy(out) for out in session.run(None, {name: image.numpy()}))
        with torch.no_grad():
            eager = model([image])[0]
            eager_boxes, eager_labels, eager_scores, eager_masks = MaskRCNNDetections(model)(image)
        if not torch.equal(labels, eager_labels):
            raise AssertionError(f"image {seed}: ONNX Runtime found labels {labels.tolist()}, eager "
                                 f"{eager_labels.tolist()}")
        counts.append(len(labels))
        pasted = paste_masks_in_image(masks, boxes, image.shape[-2:])
        for key, ours, theirs in (("boxes", boxes, eager["boxes"]), ("scores", scores, eager["scores"]),
                                  ("masks (28 x 28)", masks, eager_masks), ("masks (pasted)", pasted, eager["masks"])):
            if ours.numel():
                differences[key] = max(differences[key], float((ours - theirs).abs().max()))
    image = render(1, args.image_size)["image"]
    with torch.no_grad():
        eager_ms = median_ms(lambda: model([image]), args.repeats)
    ort_ms = median_ms(lambda: session.run(None, {name: image.numpy()}), args.repeats)
    return {"export s": export_s, **{f"max |ORT - eager| {k}": v for k, v in differences.items()},
            "eager ms": eager_ms, "ORT ms": ort_ms, "images": f"{args.image_size} x {args.image_size}",
            "detections": counts}


def main(argv=None) -> Dict[str, Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a state_dict of train_hypercolumns.py's figure-ground HypercolumnModel "
                                             "(layers 0, 1, 2); untrained weights without it")
    parser.add_argument("--image-size", type=int, default=64, help="Mask R-CNN's image size")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of each model (median)")
    parser.add_argument("--out-dir", default=None, help="also save both ONNX models here")
    args = parser.parse_args(argv)
    results = {"figure-ground": figure_ground(args), "Mask R-CNN (hypercolumn masks)": mask_rcnn(args)}
    for model, row in results.items():
        print(f"{model}:")
        for key, value in row.items():
            print(f"  {key}: {value:.3g}" if isinstance(value, float) else f"  {key}: {value}")
    return results


if __name__ == "__main__":
    main()
