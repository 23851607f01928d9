"""Random calls of the four operators, one per seed, for differential tests against the reference.

The shared cases (``cases.py``) are fixed shapes chosen by hand. These draw every size and option
from a seed instead, weighted toward the edges where kernels change path: channel counts at and
beside the kernels' block widths (32, 64, 128), layers of no channels, 1 x 1 and one-row maps,
maps larger than the image, score channels at and beside 32 (the CUDA small-projection limit), K
up to 6 on grids smaller than K, one and many layers, batch indices of every image, coordinates
on pixel centres, borders and corners, far outside and huge, boxes backwards and degenerate,
lists of boxes with empty images, every bias form, both activations, the three paddings, every
sampling of box grids (``sampling_ratio`` 1, 2, 3 and adaptive, ``aligned`` or not), three memory
layouts.

``random_case(seed)`` is reproducible: a failing test names its seed.
"""

import random
from typing import List

import torch

import cases
from cases import Case

OPS = ("sparse_hypercolumn", "box_hypercolumn", "fused_hypercolumn", "fused_hypercolumn_points")
# Block widths of the kernels and their neighbours, beside small odd counts.
CHANNELS = (1, 2, 3, 5, 7, 12, 31, 32, 33, 63, 64, 65, 127, 128, 129)


def _channels(r: random.Random) -> int:
    kind = r.random()
    if kind < 0.04:  # a layer of no channels: its columns of the output are empty
        return 0
    return r.choice(CHANNELS[:6]) if kind < 0.6 else r.choice(CHANNELS)


def _map_size(r: random.Random) -> int:
    return r.choice((1, 1, 2, 3)) if r.random() < 0.3 else r.randint(4, 11)


def _features(r: random.Random, g: torch.Generator, batch: int, dtype, device, max_values: int):
    """-> (feature maps, their layout)."""
    layers = r.choice((1, 1, 2, 3, 3, 4, 6))
    layout = r.choice(("contiguous", "channels_last", "strided"))
    shapes = []
    for _ in range(layers):
        channels, height, width = _channels(r), _map_size(r), _map_size(r)
        while channels * height * width * batch > max_values and channels > 1:
            channels = max(1, channels // 2)
        shapes.append((channels, height, width))
    return cases.features(dtype, device, layout, g, requires_grad=True, shapes=shapes, batch=batch), layout


def _coordinate(r: random.Random, size: float) -> float:
    """A coordinate along an image side of ``size`` pixels: mostly inside or near it, sometimes on
    a pixel centre, a pixel edge or a border, far outside, or huge."""
    kind = r.random()
    if kind < 0.5:
        return r.uniform(-3.0, size + 3.0)
    if kind < 0.65:
        return r.randint(0, max(0, int(size) - 1)) + 0.5
    if kind < 0.8:
        return float(r.choice((0, int(size), r.randint(0, int(size)))))
    if kind < 0.9:
        return r.uniform(-4.0 * size - 50.0, 4.0 * size + 50.0)
    # Huge, up to where feature coordinates (times scales up to 1.7) or box extents overflow
    # float32 (3e38) or float64 (1e308): such points clamp, such boxes are invalid.
    return r.choice((-1.0, 1.0)) * r.choice((1e4, 3e9, 1e30, 3e38, 1e308))


def _adaptive_box(r: random.Random, image) -> List[float]:
    """Corners of a box for adaptive sampling, whose sample counts grow with its extent: near the
    image and at most 12 pixels a side (a few samples a cell: the CUDA emulation and Triton's
    interpreter run each one), sometimes empty or reversed."""
    height, width = image
    x1, y1 = r.uniform(-3.0, width + 3.0), r.uniform(-3.0, height + 3.0)
    return [x1, y1, x1 + r.choice((0.0, r.uniform(-4.0, 12.0))), y1 + r.choice((0.0, r.uniform(-4.0, 12.0)))]


def _rows(r: random.Random, count: int, batch: int, image, corners: int, device, adaptive: bool = False) -> torch.Tensor:
    height, width = image
    rows = []
    for _ in range(count):
        row = [float(r.randrange(batch))]
        if adaptive:
            row += _adaptive_box(r, image)
        else:
            for corner in range(corners):
                row += [_coordinate(r, width), _coordinate(r, height)]
        rows.append(row)
    dtype = r.choice((torch.float32, torch.float32, torch.float64))
    return torch.tensor(rows, dtype=dtype).reshape(count, 1 + 2 * corners).to(device)


def _count(r: random.Random, most: int) -> int:
    return r.choice((0, 1, r.randint(2, most), r.randint(2, most)))


def _scales(r: random.Random, maps: List[torch.Tensor], image):
    """image_size, or spatial_scale as one float or one per layer (maps may be larger than the
    image: scales above 1)."""
    kind = r.random()
    if kind < 0.5:
        return {"image_size": image}
    if kind < 0.7:
        return {"spatial_scale": r.choice((0.125, 0.3, 1.0, 1.7))}
    return {"spatial_scale": [m.shape[2] / image[0] * r.uniform(0.7, 1.3) for m in maps]}


def random_case(seed: int, dtype=torch.float64, device="cpu", max_values: int = 20000, max_rows: int = 40) -> Case:
    """One random call (named by its seed and what was drawn), inputs on ``device`` in ``dtype``,
    features, weights and bias requiring gradients. ``max_values`` bounds each feature map's size,
    ``max_rows`` the number of points or boxes."""
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    op = r.choice(OPS)
    batch = r.choice((1, 1, 2, 3))
    image = (r.randint(1, 40), r.randint(1, 40))
    maps, layout = _features(r, g, batch, dtype, device, max_values)
    kwargs = dict(_scales(r, maps, image), padding=r.choice(("border", "zeros", "zeros_per_tap")))
    name = [f"seed{seed}", f"B{batch}", "C" + "-".join(str(m.shape[1]) for m in maps), layout, kwargs["padding"]]
    if op in ("sparse_hypercolumn", "fused_hypercolumn_points"):
        rows = _rows(r, _count(r, max_rows), batch, image, 1, device)
    else:
        # roi_align's sampling: the default (one sample at each grid point) half the time.
        if r.random() < 0.5:
            kwargs["sampling_ratio"] = r.choice((1, 2, 3, 0, -1))
            kwargs["aligned"] = r.random() < 0.5
            name.append(f"ratio{kwargs['sampling_ratio']}-{'aligned' if kwargs['aligned'] else 'unaligned'}")
        adaptive = kwargs.get("sampling_ratio", 1) <= 0
        rows = _rows(r, _count(r, max(1, max_rows // 4)), batch, image, 2, device, adaptive)
        if r.random() < 0.25:  # torchvision's form: a list of (R_b, 4), images may have none
            rows = [rows[rows[:, 0] == b, 1:] for b in range(r.randint(1, batch))]
    count = len(rows) if isinstance(rows, torch.Tensor) else sum(len(p) for p in rows)
    name.append(f"rows{count}" if isinstance(rows, torch.Tensor) else f"rows{count}-list")
    if op == "sparse_hypercolumn":
        return Case(op, (maps, rows), kwargs, "-".join(name))
    if op == "box_hypercolumn":
        size = (r.randint(1, 7), r.randint(1, 7))
        return Case(op, (maps, rows, size), kwargs, "-".join(name + [f"grid{size[0]}x{size[1]}"]))

    grid = r.choice((1, 1, 2, 3, 4, 5, 6))
    outputs = r.choice((1, 1, 2, 3, 5, 8, 33))
    classes = r.choice((None, None, 2, 3))
    lead = (grid * grid, outputs) if classes is None else (classes, grid * grid, outputs)
    weights = cases.classifier(grid, outputs, classes, dtype, device, g, requires_grad=True,
                               shapes=[m.shape[1:] for m in maps])
    bias_forms = [None, lead[-2:]] + ([lead] if classes is not None else [])
    if op == "fused_hypercolumn" and classes is None:
        bias_forms.append((count, grid * grid, outputs))
    bias_shape = r.choice(bias_forms)
    bias = None if bias_shape is None else torch.randn(*bias_shape, generator=g, dtype=torch.float64).to(
        dtype=dtype, device=device).requires_grad_(True)
    if classes is not None:
        kwargs["labels"] = torch.randint(0, classes, (count,), generator=g).to(device)
    if r.random() < 0.5:
        kwargs["activation"] = "sigmoid"
    name += [f"K{grid}", f"M{outputs}", f"NC{classes}", "nobias" if bias_shape is None else f"bias{len(bias_shape)}d",
             str(kwargs.get("activation"))]
    if op == "fused_hypercolumn":
        size = (r.randint(1, 7), r.randint(1, 7))
        kwargs["output_size"] = size
        return Case(op, (maps, rows, weights, bias), kwargs, "-".join(name + [f"grid{size[0]}x{size[1]}"]))
    if grid > 1 or r.random() < 0.5:
        locations = torch.rand(count, 2, generator=g, dtype=torch.float64)
        if count:  # the ends of [0, 1] and a cell boundary
            locations[: min(count, 3)] = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 1.0 / grid]],
                                                      dtype=torch.float64)[: min(count, 3)]
        kwargs["locations"] = locations.to(device)
    return Case(op, (maps, rows, weights, bias), kwargs, "-".join(name))
