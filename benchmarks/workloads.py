"""The benchmark workloads: fixed, seeded inputs shaped like the paper's three tasks.

Every workload has the same three feature layers over its image: 128 channels at stride 4, 512 at
stride 8 and 4096 at stride 32 (4736 channels in all, as in the paper's AlexNet example),
batch 1. Features are standard normal, weights normal divided by ``sqrt(C_l)``, one bias per
classifier cell ``(KK, M)``. Boxes have width and height uniform in ``[32, 0.6 * side]`` and are
placed uniformly inside the image; points are uniform over the image.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

LAYERS = ((128, 4), (512, 8), (4096, 32))  # (channels, stride)
BATCH = 1


@dataclass(frozen=True)
class Workload:
    """One workload. ``op`` is the public operator it calls; ``count`` is boxes or points."""

    name: str
    op: str
    image: Tuple[int, int]
    count: int
    grid: int
    outputs: int
    output_size: Optional[Tuple[int, int]]
    whole_image_box: bool = False

    @property
    def cells(self) -> int:
        return self.grid * self.grid

    @property
    def num_points(self) -> int:
        """Points sampled: ``R * oh * ow`` for boxes, ``N`` for points."""
        if self.output_size is None:
            return self.count
        return self.count * self.output_size[0] * self.output_size[1]

    def feature_shapes(self) -> List[Tuple[int, int, int, int]]:
        """``(B, C_l, H_l, W_l)`` of each layer."""
        height, width = self.image
        return [(BATCH, channels, height // stride, width // stride) for channels, stride in LAYERS]

    @property
    def channels(self) -> int:
        return sum(channels for channels, _ in LAYERS)


# "points" and "points-sparse" are the same 19,600 points (the same seed), through
# fused_hypercolumn_points and through sparse_hypercolumn (no classifier).
WORKLOADS: Dict[str, Workload] = {w.name: w for w in [
    Workload("sds-small", "fused_hypercolumn", (256, 256), 32, 5, 1, (50, 50)),
    Workload("sds", "fused_hypercolumn", (512, 512), 100, 5, 1, (50, 50)),
    Workload("keypoints", "fused_hypercolumn", (512, 512), 20, 5, 17, (56, 56)),
    Workload("parts", "fused_hypercolumn", (256, 256), 1, 1, 7, (256, 256), whole_image_box=True),
    Workload("points", "fused_hypercolumn_points", (512, 512), 19600, 1, 21, None),
    Workload("points-sparse", "sparse_hypercolumn", (512, 512), 19600, 1, 21, None),
    # box_hypercolumn alone (no classifier): RoI features of sds-small's kind of boxes on Mask
    # R-CNN's 14x14 grid, 119 MB of output.
    Workload("boxes", "box_hypercolumn", (256, 256), 32, 1, 1, (14, 14)),
]}

_SEEDS = {"sds-small": 1, "sds": 2, "keypoints": 3, "parts": 4, "points": 5, "points-sparse": 5, "boxes": 6}
SAMPLING_OPS = ("sparse_hypercolumn", "box_hypercolumn")  # no classifier: no weights, no bias


@dataclass
class Inputs:
    """A workload's tensors. ``rows`` is ``(R, 5)`` boxes or ``(N, 3)`` points, float32 (float64
    for float64 features); ``weights`` and ``bias`` are None for ``sparse_hypercolumn``."""

    workload: Workload
    features: List[Tensor]
    rows: Tensor
    weights: Optional[List[Tensor]]
    bias: Optional[Tensor]

    def differentiable(self) -> List[Tensor]:
        """The tensors that take gradients: features, weights, bias."""
        tensors = list(self.features) + list(self.weights or []) + ([] if self.bias is None else [self.bias])
        return [t for t in tensors if t.requires_grad]

    def call_args(self) -> Tuple[tuple, dict]:
        """Positional and keyword arguments of the workload's public operator (and of the
        baselines, which take the same)."""
        w = self.workload
        kwargs = {"image_size": w.image}
        if w.op == "sparse_hypercolumn":
            return (self.features, self.rows), kwargs
        if w.op == "box_hypercolumn":
            return (self.features, self.rows, w.output_size), kwargs
        if w.op == "fused_hypercolumn":
            kwargs["output_size"] = w.output_size
        return (self.features, self.rows, self.weights, self.bias), kwargs


def _boxes(workload: Workload, generator: torch.Generator) -> Tensor:
    height, width = workload.image
    if workload.whole_image_box:
        return torch.tensor([[0.0, 0.0, 0.0, width, height]], dtype=torch.float64).repeat(workload.count, 1)
    rand = torch.rand(workload.count, 4, generator=generator, dtype=torch.float64)
    box_w = 32 + rand[:, 0] * (0.6 * width - 32)
    box_h = 32 + rand[:, 1] * (0.6 * height - 32)
    x1 = rand[:, 2] * (width - box_w)
    y1 = rand[:, 3] * (height - box_h)
    batch = torch.zeros_like(x1)
    return torch.stack([batch, x1, y1, x1 + box_w, y1 + box_h], dim=1)


def _points(workload: Workload, generator: torch.Generator) -> Tensor:
    height, width = workload.image
    rand = torch.rand(workload.count, 2, generator=generator, dtype=torch.float64)
    batch = torch.zeros(workload.count, 1, dtype=torch.float64)
    return torch.cat([batch, rand[:, :1] * width, rand[:, 1:] * height], dim=1)


def build(name: str, device="cpu", dtype: torch.dtype = torch.float32, requires_grad: bool = False) -> Inputs:
    """The tensors of workload ``name`` on ``device``; features, weights and bias in ``dtype``
    (leaves with ``requires_grad`` if asked). The same name always gives the same values."""
    workload = WORKLOADS[name]
    generator = torch.Generator().manual_seed(_SEEDS[name])

    def leaf(values: Tensor) -> Tensor:
        return values.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    features = [leaf(torch.randn(shape, generator=generator, dtype=torch.float64))
                for shape in workload.feature_shapes()]
    rows = _boxes(workload, generator) if workload.output_size is not None else _points(workload, generator)
    rows = rows.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    weights = bias = None
    if workload.op not in SAMPLING_OPS:
        weights = [leaf(torch.randn(workload.cells, workload.outputs, channels, generator=generator,
                                    dtype=torch.float64) / channels ** 0.5) for channels, _ in LAYERS]
        bias = leaf(torch.randn(workload.cells, workload.outputs, generator=generator, dtype=torch.float64))
    return Inputs(workload, features, rows, weights, bias)
