"""Random inputs for every operator, shared by the tests of every backend.

Each case is a call of a public operator (name, positional args, keyword args). The shapes are
small and not powers of two; points and boxes lie on pixel centres, on the image's borders,
outside it and partly outside; both paddings, K in {1, 3, 5}, M in {1, several}, labels,
every bias form, both activations, channels_last and strided features, empty inputs.
"""

import itertools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch

import hypercolumn_ops

IMAGE = (19, 23)  # (H, W) of the image the network saw
# Layers at strides ~2, ~4 and ~8 of IMAGE (not exact: scales need not be round), odd channel counts.
LAYER_SHAPES = ((3, 10, 12), (5, 5, 6), (7, 3, 3))
BATCH = 2
# Where the normalised arguments of a fused operator (csrc/ops.cpp's schema) hold the per-layer
# evaluation orders.
ORDERS_AT = {"fused_hypercolumn": 11, "fused_hypercolumn_points": 10}


def with_orders(op: str, args, orders) -> List:
    """The normalised arguments ``args`` of fused operator ``op`` with ``orders`` instead."""
    args = list(args)
    args[ORDERS_AT[op]] = orders
    return args


@dataclass
class Case:
    op: str
    args: Tuple
    kwargs: Dict = field(default_factory=dict)
    name: str = ""

    def __call__(self):
        return getattr(hypercolumn_ops, self.op)(*self.args, **self.kwargs)

    def __repr__(self) -> str:
        return f"{self.op}[{self.name}]"


def features(dtype, device, layout="contiguous", generator=None, requires_grad=False,
             shapes=LAYER_SHAPES, batch=BATCH) -> List[torch.Tensor]:
    """Feature maps (B, C_l, H_l, W_l), standard normal, in the given memory layout."""
    maps = []
    for channels, height, width in shapes:
        if layout == "strided":  # every other channel and column of a larger map
            base = torch.randn(batch, 2 * channels, height, 2 * width + 1, generator=generator, dtype=torch.float64)
            f = base.to(dtype=dtype, device=device)[:, ::2, :, 1::2]
        else:
            f = torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64)
            f = f.to(dtype=dtype, device=device)
            if layout == "channels_last":
                f = f.contiguous(memory_format=torch.channels_last)
        maps.append(f.requires_grad_(requires_grad))
    return maps


def points(count, dtype, device, generator=None, image=IMAGE, batch=BATCH) -> torch.Tensor:
    """(N, 3) rows (batch_index, x, y): random inside and around the image, plus borders,
    corners, pixel centres and points a few pixels outside."""
    height, width = image
    special = torch.tensor(
        [[0, 0, 0], [1, width, height], [0, width, 0], [1, 0, height], [0, 0.5, 0.5],
         [1, width - 0.5, height - 0.5], [0, -1.0, 3.0], [1, width + 1.0, 4.0], [0, 5.0, -2.5],
         [1, 7.0, height + 3.0], [0, -40.0, -40.0], [1, width / 2, height / 2]], dtype=torch.float64)
    rand = torch.rand(count, 3, generator=generator, dtype=torch.float64)
    rand[:, 0] = (rand[:, 0] * batch).floor()
    rand[:, 1] = rand[:, 1] * (width + 6) - 3
    rand[:, 2] = rand[:, 2] * (height + 6) - 3
    return torch.cat([special, rand]).to(dtype=dtype, device=device)


def boxes(count, dtype, device, generator=None, image=IMAGE, batch=BATCH) -> torch.Tensor:
    """(R, 5) rows (batch_index, x1, y1, x2, y2): random boxes, some partly outside the image,
    one backwards (x2 < x1), one degenerate, one covering the whole image."""
    height, width = image
    special = torch.tensor([[0, 0, 0, width, height], [1, -4.0, -3.0, 6.0, 5.0],
                            [0, 15.0, 12.0, 3.0, 2.0], [1, 7.0, 7.0, 7.0, 7.0]], dtype=torch.float64)
    rand = torch.rand(count, 5, generator=generator, dtype=torch.float64)
    rand[:, 0] = (rand[:, 0] * batch).floor()
    x1 = rand[:, 1] * (width + 4) - 4
    y1 = rand[:, 2] * (height + 4) - 4
    rand[:, 1], rand[:, 2] = x1, y1
    rand[:, 3] = x1 + 2 + rand[:, 3] * width * 0.7
    rand[:, 4] = y1 + 2 + rand[:, 4] * height * 0.7
    special[:, 0] = special[:, 0].clamp(max=batch - 1)
    return torch.cat([special, rand]).to(dtype=dtype, device=device)


def classifier(grid, outputs, classes, dtype, device, generator=None, requires_grad=False,
               shapes=LAYER_SHAPES):
    """Weights per layer (KK, M, C_l), or (NC, KK, M, C_l) when classes is not None."""
    lead = (grid * grid, outputs) if classes is None else (classes, grid * grid, outputs)
    return [(torch.randn(*lead, c, generator=generator, dtype=torch.float64) / c ** 0.5)
            .to(dtype=dtype, device=device).requires_grad_(requires_grad) for c, _, _ in shapes]


def _scale_kwargs(kind):
    if kind == "image_size":
        return {"image_size": IMAGE}
    # torchvision-style: one spatial scale per layer
    return {"spatial_scale": [h / IMAGE[0] for _, h, _ in LAYER_SHAPES]}


def sampling_cases(dtype, device, requires_grad=False, seed=0) -> List[Case]:
    """sparse_hypercolumn and box_hypercolumn over paddings, scales, layouts and empty inputs."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for padding, scale, layout in itertools.product(("border", "zeros"), ("image_size", "spatial_scale"),
                                                    ("contiguous", "channels_last", "strided")):
        f = features(dtype, device, layout, g, requires_grad)
        kw = dict(padding=padding, **_scale_kwargs(scale))
        name = f"{padding}-{scale}-{layout}"
        cases.append(Case("sparse_hypercolumn", (f, points(29, torch.float32, device, g)), kw, name))
        cases.append(Case("box_hypercolumn", (f, boxes(5, torch.float32, device, g), (7, 9)), kw, name))
    f = features(dtype, device, "contiguous", g, requires_grad)
    cases.append(Case("sparse_hypercolumn", (f, points(0, torch.float32, device, g)[:0]),
                      {"image_size": IMAGE}, "empty"))
    cases.append(Case("box_hypercolumn", (f, boxes(0, torch.float32, device, g)[:0], 3),
                      {"image_size": IMAGE}, "empty"))
    box_list = [boxes(3, torch.float32, device, g)[:, 1:], boxes(0, torch.float32, device, g)[:2, 1:]]
    cases.append(Case("box_hypercolumn", (f, box_list, (4, 5)), {"image_size": IMAGE}, "box-list"))
    return cases


def fused_cases(dtype, device, requires_grad=False, seed=0) -> List[Case]:
    """fused_hypercolumn and fused_hypercolumn_points over K, M, labels, bias forms, activation,
    padding and layout, plus empty inputs."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    combos = [  # (K, M, NC, bias form, activation, padding, layout)
        (1, 1, None, None, None, "border", "contiguous"),
        (3, 4, None, "cells", "sigmoid", "zeros", "channels_last"),
        (5, 1, None, "box", None, "border", "strided"),
        (5, 2, 3, "class", "sigmoid", "border", "contiguous"),
        (3, 1, 4, None, None, "zeros", "contiguous"),
        (1, 5, None, "cells", "sigmoid", "zeros", "strided"),
    ]
    for grid, outputs, classes, bias_form, activation, padding, layout in combos:
        name = f"K{grid}-M{outputs}-NC{classes}-bias{bias_form}-{activation}-{padding}-{layout}"
        f = features(dtype, device, layout, g, requires_grad)
        w = classifier(grid, outputs, classes, dtype, device, g, requires_grad)
        b = boxes(6, torch.float32, device, g)
        count = b.shape[0]
        labels = None if classes is None else torch.randint(0, classes, (count,), generator=g).to(device)
        bias_shape = {None: None, "cells": (grid * grid, outputs), "box": (count, grid * grid, outputs),
                      "class": (classes, grid * grid, outputs)}[bias_form]
        bias = None
        if bias_shape is not None:
            bias = torch.randn(*bias_shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
            bias.requires_grad_(requires_grad)
        kw = dict(output_size=(6, 5), image_size=IMAGE, labels=labels, activation=activation, padding=padding)
        cases.append(Case("fused_hypercolumn", (f, b, w, bias), kw, name))

        p = points(23, torch.float32, device, g)
        n = p.shape[0]
        locations = torch.rand(n, 2, generator=g, dtype=torch.float64).to(device) if grid > 1 else None
        point_labels = None if classes is None else torch.randint(0, classes, (n,), generator=g).to(device)
        point_bias = bias if bias_form in ("cells", "class") else None
        pkw = dict(locations=locations, spatial_scale=[h / IMAGE[0] for _, h, _ in LAYER_SHAPES],
                   labels=point_labels, activation=activation, padding=padding)
        cases.append(Case("fused_hypercolumn_points", (f, p, w, point_bias), pkw, name))
    f = features(dtype, device, "contiguous", g, requires_grad)
    w = classifier(3, 2, None, dtype, device, g, requires_grad)
    cases.append(Case("fused_hypercolumn", (f, boxes(0, torch.float32, device, g)[:0], w),
                      dict(output_size=4, image_size=IMAGE), "empty"))
    cases.append(Case("fused_hypercolumn_points", (f, points(0, torch.float32, device, g)[:0], w),
                      dict(locations=torch.zeros(0, 2, device=device), image_size=IMAGE), "empty"))
    return cases


def all_cases(dtype, device, requires_grad=False, seed=0) -> List[Case]:
    return sampling_cases(dtype, device, requires_grad, seed) + fused_cases(dtype, device, requires_grad, seed)


def differentiable_inputs(case: Case) -> List[torch.Tensor]:
    """The tensors of a case that take gradients: features, weights, bias."""
    tensors = list(case.args[0])
    if case.op.startswith("fused"):
        tensors += list(case.args[2])
        if len(case.args) > 3 and case.args[3] is not None:
            tensors.append(case.args[3])
    return [t for t in tensors if t.requires_grad]


def outputs_and_grads(case: Case, backend: str, seed: int = 1) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Output of a case on a backend and the gradients of a fixed random projection of it."""
    inputs = differentiable_inputs(case)
    for t in inputs:
        t.grad = None
    with hypercolumn_ops.use_backend(backend):
        out = case()
    if not inputs:
        return out.detach(), []
    g = torch.Generator().manual_seed(seed)
    probe = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype=out.dtype, device=out.device)
    finite = torch.isfinite(out)
    loss = (torch.where(finite, out, torch.zeros_like(out)) * probe).sum()
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(inputs, grads)]
    return out.detach(), grads


def assert_close_to_reference(case: Case, backend: str, rtol: float, atol: float,
                              compare: Callable = torch.testing.assert_close) -> None:
    """Forward and gradients of ``backend`` against the reference on the same case."""
    out, grads = outputs_and_grads(case, backend)
    ref_out, ref_grads = outputs_and_grads(case, "reference")
    compare(out, ref_out, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{case} forward: {m}")
    for index, (grad, ref_grad) in enumerate(zip(grads, ref_grads)):
        compare(grad, ref_grad, rtol=rtol, atol=atol, msg=lambda m: f"{case} grad of input {index}: {m}")
