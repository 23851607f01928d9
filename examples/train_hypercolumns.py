"""Train a hypercolumn task head on synthetic data: the top layer alone against the hypercolumn
of all layers (Hariharan et al., CVPR 2015, on a CPU-sized problem).

The data set is generated on the fly from a seed: textured "creatures" (a body of one of three
shapes, the category, with four thin limbs pointing roughly up, right, down and left) on
textured backgrounds. Every object comes with its box (the tight box of its visible mask,
jittered like a detection), instance mask, category, four keypoints (the limb tips) and five
parts (body, four limbs). The limbs are 1 to 2.5 pixels wide: the stride-8 top layer cannot
place them, the stride-2 layer can.

    python examples/train_hypercolumns.py --task figure-ground
    torchrun --nproc_per_node 2 examples/train_hypercolumns.py --task parts --steps 200

Prints a Markdown table of the task's metrics for both models and writes it, with a PNG of
predictions beside the ground truth, to ``--out-dir``. Under ``torchrun`` it trains with
DistributedDataParallel (gloo on CPU, nccl on GPU); every rank draws different images
(DistributedSampler) and only rank 0 prints, evaluates and writes.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

import hypercolumn_ops
from hypercolumn_ops.models import HypercolumnFeatures, small_backbone
from hypercolumn_ops.tasks import FigureGroundTask, KeypointTask, MaskAveragePrecision, PartTask

NUM_CLASSES = 3  # body shapes: ellipse, square, diamond
NUM_KEYPOINTS = 4  # limb tips: up, right, down, left
NUM_PARTS = 5  # body, limb up, right, down, left
TASKS = ("figure-ground", "keypoints", "parts")
METRIC_NAMES = {"figure-ground": ("mean IoU", "AP^r 0.5", "AP^r 0.7"), "keypoints": ("PCK@0.1",),
                "parts": ("mean part IoU",)}


# ----------------------------------------------------------------------------- data


def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, period: float, contrast: float) -> np.ndarray:
    """An ``(H, W, 3)`` texture in [0, 1]: stripes of a random direction and about ``period``
    pixels between two random colours, over a smooth random shade."""
    angle = rng.uniform(0, math.pi)
    frequency = 2 * math.pi / (period * rng.uniform(0.8, 1.25))
    stripes = 0.5 + 0.5 * np.sin(frequency * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 7))
    low, high = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    shade = 0.15 * np.sin(xx / rng.uniform(8, 20) + rng.uniform(0, 7)) * np.cos(yy / rng.uniform(8, 20))
    colour = low + contrast * (high - low) * stripes[..., None]
    return np.clip(colour + shade[..., None], 0, 1)


def _segment_distance(yy, xx, x0, y0, x1, y1) -> np.ndarray:
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))


def render(seed: int, size: int, max_objects: int = 2) -> Dict[str, Tensor]:
    """One image ``(3, size, size)`` and its objects: ``boxes (R, 4)``, ``labels (R,)``,
    ``masks (R, H, W)``, ``parts (R, H, W)`` (0 background, 1 body, 2..5 limbs),
    ``keypoints (R, 4, 3)`` rows ``(x, y, visible)``; pixel ``(i, j)`` is centred at
    ``(j + 0.5, i + 0.5)``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    image = _texture(rng, yy, xx, period=rng.uniform(10, 24), contrast=0.5)
    owner = np.full((size, size), -1)
    part_of = np.zeros((size, size), dtype=np.int64)
    objects = []
    centres = []
    for index in range(int(rng.integers(1, max_objects + 1))):
        category = int(rng.integers(NUM_CLASSES))
        radius = rng.uniform(5, 8)
        # Bodies apart (limbs may still cross): one box rarely holds most of another object.
        for _ in range(20):
            cx, cy = rng.uniform(0.25, 0.75, 2) * size
            if all(math.hypot(cx - x, cy - y) > 0.4 * size for x, y in centres):
                break
        centres.append((cx, cy))
        theta = rng.uniform(0, math.pi)
        u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
        v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
        if category == 0:
            body = (u / (radius * 1.3)) ** 2 + (v / (radius * 0.75)) ** 2 <= 1
        elif category == 1:
            body = np.maximum(abs(u), abs(v)) <= radius * 0.8
        else:
            body = abs(u) + abs(v) <= radius * 1.15
        parts = np.where(body, 1, 0)
        tips = []
        for limb in range(NUM_KEYPOINTS):
            angle = math.radians(limb * 90 - 90 + rng.uniform(-25, 25))
            length = radius + rng.uniform(6, 13)
            tip = (cx + length * math.cos(angle), cy + length * math.sin(angle))
            width = rng.uniform(1.5, 3.0)
            stroke = _segment_distance(yy, xx, cx, cy, *tip) <= width / 2
            parts = np.where(stroke & (parts == 0), 2 + limb, parts)
            tips.append(tip)
        mask = parts > 0
        image = np.where(mask[..., None], _texture(rng, yy, xx, period=rng.uniform(3, 6), contrast=1.0), image)
        owner[mask] = index
        part_of[mask] = parts[mask]
        objects.append((category, tips))
    image = np.clip(image + rng.normal(0, 0.04, image.shape), 0, 1)
    boxes, labels, masks, part_maps, keypoints = [], [], [], [], []
    for index, (category, tips) in enumerate(objects):
        mask = owner == index
        if mask.sum() < 30:  # hidden behind a later object
            continue
        rows, cols = np.nonzero(mask)
        box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float64)
        box = np.clip(box + rng.uniform(-1.5, 1.5, 4), 0, size)  # detections are not tight
        points = []
        for x, y in tips:
            inside = 0 <= x < size and 0 <= y < size
            visible = inside and owner[int(y), int(x)] in (index, -1)
            points.append((x, y, float(visible)))
        boxes.append(box)
        labels.append(category)
        masks.append(mask)
        part_maps.append(np.where(mask, part_of, 0))
        keypoints.append(points)
    return {"image": torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32)),
            "boxes": torch.tensor(np.array(boxes), dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.array(masks, dtype=bool).reshape(-1, size, size)),
            "parts": torch.from_numpy(np.array(part_maps, dtype=np.int64).reshape(-1, size, size)),
            "keypoints": torch.tensor(keypoints, dtype=torch.float32).reshape(-1, NUM_KEYPOINTS, 3)}


class SyntheticCreatures(Dataset):
    """``length`` images, image ``i`` rendered from seed ``seed * 1_000_003 + i``."""

    def __init__(self, length: int, seed: int, size: int):
        self.length, self.seed, self.size = length, seed, size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Dict[str, Tensor]:
        return render(self.seed * 1_000_003 + index, self.size)


def collate(samples: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    """Images stacked ``(B, 3, H, W)``; objects concatenated, boxes as ``(R, 5)`` rows
    ``(batch_index, x1, y1, x2, y2)``."""
    batch = {key: torch.cat([s[key] for s in samples]) for key in ("labels", "masks", "parts", "keypoints")}
    batch["image"] = torch.stack([s["image"] for s in samples])
    batch["boxes"] = torch.cat([torch.cat([torch.full((len(s["boxes"]), 1), float(b)), s["boxes"]], dim=1)
                                for b, s in enumerate(samples)])
    return batch


# ----------------------------------------------------------------------------- model


class HypercolumnModel(nn.Module):
    """The small backbone's chosen stages (``layers``: indices into strides 2, 4, 8) and a
    task head over their hypercolumn."""

    def __init__(self, task: str, layers: List[int], widths=(16, 32, 64), grid_size: int = 5,
                 output_size=(24, 24)):
        super().__init__()
        self.task = task
        nodes = {str(i): f"stage{i + 1}" for i in layers}
        self.features = HypercolumnFeatures(small_backbone(widths), nodes, [widths[i] for i in layers],
                                            [2 ** (i + 1) for i in layers])
        channels = self.features.channels
        if task == "figure-ground":
            self.head = FigureGroundTask(channels, NUM_CLASSES, grid_size, output_size)
        elif task == "keypoints":
            self.head = KeypointTask(channels, NUM_KEYPOINTS, grid_size, output_size)
        else:
            self.head = PartTask(channels, NUM_PARTS, grid_size, output_size)

    def forward(self, images: Tensor, boxes: Tensor, labels: Tensor) -> Tensor:
        """The head's box-grid output for ``boxes (R, 5)``."""
        features = self.features(images)
        size = images.shape[-2:]
        if self.task == "figure-ground":
            return self.head(features, boxes, size, labels)
        return self.head(features, boxes, size)

    def loss(self, output: Tensor, batch: Dict[str, Tensor]) -> Tensor:
        """The task's loss against the batch's targets, cut to the box grids."""
        boxes = batch["boxes"]
        if self.task == "figure-ground":
            return self.head.loss(output, self.head.targets(batch["masks"], boxes))
        if self.task == "keypoints":
            return self.head.loss(output, *self.head.targets(batch["keypoints"], boxes))
        return self.head.loss(output, self.head.targets(batch["parts"], boxes))

    def decode(self, output: Tensor, boxes: Tensor, image_size) -> Tensor:
        """Masks ``(R, H, W)``, keypoints ``(R, J, 2)`` or part labels ``(R, H, W)``."""
        if self.task == "figure-ground":
            return self.head.decode(output, boxes, image_size)
        if self.task == "keypoints":
            return self.head.decode(output, boxes)[0]
        return self.head.decode(output, boxes, image_size)


def evaluate(model: HypercolumnModel, loader: DataLoader, device: torch.device) -> List[float]:
    """The task's metrics (METRIC_NAMES) over the whole loader. Figure-ground: mask IoU averaged
    over boxes, and AP^r at mask IoU 0.5 and 0.7 over categories, the boxes taken as detections
    scored by their mask's mean foreground probability. Keypoints: PCK over visible keypoints.
    Parts: part IoU pooled over all pixels."""
    model.eval()
    predictions, truths, all_boxes = [], [], []
    average_precision = MaskAveragePrecision(NUM_CLASSES)
    with torch.no_grad():
        for batch in loader:
            boxes = batch["boxes"].to(device)
            output = model(batch["image"].to(device), boxes, batch["labels"].to(device))
            decoded = model.decode(output, boxes, batch["image"].shape[-2:]).cpu()
            predictions.append(decoded)
            truths.append(batch[{"figure-ground": "masks", "keypoints": "keypoints", "parts": "parts"}[model.task]])
            all_boxes.append(batch["boxes"])
            if model.task == "figure-ground":
                foreground = (output >= 0.5).float()
                scores = ((output * foreground).sum((1, 2)) / foreground.sum((1, 2)).clamp(min=1)).cpu()
                image = batch["boxes"][:, 0]
                for index in image.unique():
                    mine = image == index
                    average_precision.update(decoded[mine], scores[mine], batch["labels"][mine],
                                             batch["masks"][mine], batch["labels"][mine])
    model.train()
    predicted, truth, boxes = torch.cat(predictions), torch.cat(truths), torch.cat(all_boxes)
    if model.task == "figure-ground":
        return [model.head.metric(predicted, truth).mean().item(), *average_precision.compute().nanmean(1).tolist()]
    if model.task == "keypoints":
        return [model.head.metric(predicted, truth, boxes).item()]
    return [model.head.metric(predicted, truth).item()]


# ----------------------------------------------------------------------------- training


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in ``named_parameters`` order."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train(args, layers: List[int], device: torch.device, rank: int, world: int, label: str):
    """Train one model on ``layers`` for ``args.steps`` steps -> (model, seconds, SHA-256 of
    the images this rank saw)."""
    torch.manual_seed(args.seed)  # the same initial model for both ranks (DDP broadcasts rank 0's anyway)
    model = HypercolumnModel(args.task, layers, output_size=(args.grid, args.grid)).to(device)
    wrapped = model
    if world > 1:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    data = SyntheticCreatures(args.steps * args.batch_size * world, args.seed, args.image_size)
    sampler = DistributedSampler(data, world, rank, shuffle=False) if world > 1 else None
    loader = DataLoader(data, args.batch_size, sampler=sampler, collate_fn=collate, num_workers=args.workers,
                        drop_last=True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, args.lr, total_steps=args.steps, pct_start=0.1)
    # Mixed precision: autocast's default dtype for the device; float16 needs its loss scaled.
    half = torch.get_autocast_dtype(device.type) == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and half)
    seen = hashlib.sha256()
    start = time.perf_counter()
    progress = tqdm(loader, total=args.steps, desc=label, disable=rank != 0, dynamic_ncols=True)
    for batch in progress:
        if args.checksum_file:
            seen.update(batch["image"].numpy().tobytes())
        boxes = batch["boxes"].to(device)
        with torch.autocast(device.type, enabled=args.amp):
            output = wrapped(batch["image"].to(device), boxes, batch["labels"].to(device))
            loss = model.loss(output, {k: v.to(device) for k, v in batch.items()})
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    return model, time.perf_counter() - start, seen.hexdigest()


def save_figure(path: str, task: str, models: Dict[str, HypercolumnModel], data: Dataset, device: torch.device,
                count: int = 4) -> None:
    """Rows: validation images; columns: the image with its boxes, the ground truth, and each
    model's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["image", "ground truth"] + list(models)
    figure, axes = plt.subplots(count, len(columns), figsize=(2.6 * len(columns), 2.6 * count), squeeze=False)
    colours = plt.get_cmap("tab10")
    for row in range(count):
        sample = collate([data[row]])
        image = sample["image"][0].permute(1, 2, 0).numpy()
        size = image.shape[:2]
        boxes = sample["boxes"]
        truth = {"figure-ground": sample["masks"], "keypoints": sample["keypoints"], "parts": sample["parts"]}[task]
        shown = [("image", None), ("ground truth", truth)]
        for name, model in models.items():
            model.eval()
            with torch.no_grad():
                output = model(sample["image"].to(device), boxes.to(device), sample["labels"].to(device))
                shown.append((name, model.decode(output, boxes.to(device), size).cpu()))
        for column, (name, value) in enumerate(shown):
            axis = axes[row, column]
            axis.imshow(image if value is None or task == "keypoints" else 0.35 * image)
            if value is not None and task != "keypoints":
                overlay = np.zeros((*size, 4))
                for r in range(len(boxes)):
                    labels = value[r].numpy().astype(int)
                    if task == "figure-ground":
                        overlay[labels > 0] = colours(r)
                    else:
                        overlay[labels > 0] = colours(labels[labels > 0] % 10)
                axis.imshow(overlay)
            if value is not None and task == "keypoints":
                for r in range(len(boxes)):
                    for j in range(NUM_KEYPOINTS):
                        if name == "ground truth" and value[r, j, 2] <= 0:
                            continue
                        axis.plot(value[r, j, 0], value[r, j, 1], "o", color=colours(j), markersize=4,
                                  markeredgecolor="white", markeredgewidth=0.6)
            for b in boxes:
                axis.add_patch(plt.Rectangle((b[1], b[2]), b[3] - b[1], b[4] - b[2], fill=False, color="white",
                                             linewidth=0.6, linestyle="--"))
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown_table(task: str, results) -> str:
    """Rows ``(name, channels, metrics, seconds)`` -> a Markdown table."""
    names = METRIC_NAMES[task]
    lines = [f"| layers | channels | {' | '.join(names)} | training time (s) |", "|---" * (len(names) + 3) + "|"]
    lines += [f"| {name} | {'+'.join(map(str, channels))} | {' | '.join(f'{m:.3f}' for m in metrics)} | "
              f"{seconds:.0f} |" for name, channels, metrics, seconds in results]
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name where the system says it (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=TASKS, default="figure-ground")
    parser.add_argument("--steps", type=int, default=800, help="training steps per model")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step and rank")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--grid", type=int, default=24, help="box grid points per side (output_size)")
    parser.add_argument("--val-images", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (0: torch's default); one thread per process keeps a "
                             "busy or small CPU from thrashing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true",
                        help="mixed-precision training (torch.autocast: float16 with a GradScaler on CUDA, "
                             "bfloat16 on the CPU, where torch's bfloat16 convolutions can be several times "
                             "slower than float32 ones)")
    parser.add_argument("--backend", choices=hypercolumn_ops.backends.NAMES, default=None,
                        help="force an operator backend (default: the best available)")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--no-save", action="store_true", help="write neither the table nor the figure")
    parser.add_argument("--checksum-file", default=None,
                        help="write every rank's SHA-256 of each model's parameters and of the images it "
                             "trained on to this JSON file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    backend = hypercolumn_ops.use_backend(args.backend) if args.backend else contextlib.nullcontext()
    variants = {"top layer (stride 8)": [2], "hypercolumn (strides 2, 4, 8)": [0, 1, 2]}
    validation = SyntheticCreatures(args.val_images, args.seed + 1, args.image_size)
    val_loader = DataLoader(validation, 32, collate_fn=collate)
    results, models, digests = [], {}, {}
    started = time.perf_counter()
    with backend:
        for name, layers in variants.items():
            model, seconds, images = train(args, layers, device, rank, world, name)
            models[name] = model
            digests[name] = {"parameters": parameter_digest(model), "images": images}
            if rank == 0:
                metrics = evaluate(model, val_loader, device)
                results.append((name, model.features.channels, metrics, seconds))
            if world > 1:
                dist.barrier()
        if rank == 0:
            table = markdown_table(args.task, results)
            total = time.perf_counter() - started
            used = args.backend or hypercolumn_ops.available_backends(device)[0]
            print(table)
            print(f"total {total:.0f} s on {device} ({world} process(es), backend {used})")
            if not args.no_save:
                os.makedirs(args.out_dir, exist_ok=True)
                stem = os.path.join(args.out_dir, args.task.replace("-", "_"))
                save_figure(stem + ".png", args.task, models, validation, device)
                hardware = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
                command = " ".join(sys.argv[1:] if argv is None else argv)
                with open(stem + ".md", "w") as handle:
                    handle.write(f"# {args.task}: top layer vs hypercolumn\n\n{table}\n\n"
                                 f"`train_hypercolumns.py {command}`: {args.steps} steps of {args.batch_size} "
                                 f"images ({args.image_size}x{args.image_size}) per model and process, {world} "
                                 f"process(es), {args.val_images} validation images. {total:.0f} s in all on "
                                 f"{device} ({hardware}, {os.cpu_count()} cores, {torch.get_num_threads()} threads "
                                 f"per process), torch {torch.__version__}, operator backend {used}.\n")
    if args.checksum_file:
        gathered = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, digests)
        else:
            gathered = [digests]
        if rank == 0:
            with open(args.checksum_file, "w") as handle:
                json.dump({"world_size": world, "digests": gathered}, handle, indent=1)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
