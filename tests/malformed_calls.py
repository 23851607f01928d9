"""Direct calls of the compiled operators (``torch.ops.hypercolumn_ops.*``) with one malformed
argument, for the promise of ``csrc/ops.cpp``: the kernels check what they are given, so a direct
caller gets an exception (or, for values such as an invalid batch index, NaN rows), never a crash
or a read out of bounds.

``malformed_calls(seed, device)`` starts from ``random_cases.random_case(seed)``'s normalised
arguments and yields ``(what, op, args)``, each with one argument replaced: a layer dropped, of
another batch size, rank, dtype or height 0; coordinate rows with a column too few or too many, of
another dtype, strided, out-of-range batch indices; image sizes of the wrong length, zero,
negative or huge, both or neither of image_size and spatial_scale, scale lists too short or long,
NaN, negative, zero or huge; an unknown padding or activation; sampling ratios past the bound;
grid sizes 0 and negative; weights dropped or of
another C_l, KK, M, NC, rank or dtype; bias rows too few or too many, of another shape or dtype;
labels missing, unexpected, short, float, int32, huge, negative or 2-D; locations missing, short,
of three columns, another dtype, huge, NaN or strided; orders too short, too long or unknown.
"""

from typing import Iterator, List, Tuple

import torch

from hypercolumn_ops import ops as public

import random_cases


def _with(args: List, index: int, value) -> List:
    args = list(args)
    args[index] = value
    return args


def _other_dtype(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.to(dtype or (torch.float32 if t.dtype == torch.float64 else torch.float64))


def malformed_calls(seed: int, device) -> Iterator[Tuple[str, str, List]]:
    case = random_cases.random_case(seed, device=device)
    args = [[t.detach() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
            else a.detach() if isinstance(a, torch.Tensor) else a
            for a in getattr(public, "normalise_" + case.op)(*case.args, **case.kwargs)]
    op = case.op
    fused = op.startswith("fused")
    # Positions in the normalised arguments (csrc/ops.cpp's schema).
    rows_at, size_at = 1, {"sparse_hypercolumn": 2, "box_hypercolumn": 4, "fused_hypercolumn": 7,
                           "fused_hypercolumn_points": 6}[op]
    scales_at, padding_at = size_at + 1, size_at + 2
    features, rows = args[0], args[rows_at]
    last = features[-1]

    yield "a layer dropped", op, _with(args, 0, features[:-1])
    yield "a layer of batch B + 1", op, _with(args, 0, features[:-1] + [torch.cat([last, last[:1]])])
    yield "a 3-D layer", op, _with(args, 0, features[:-1] + [last[0]])
    yield "a layer of another dtype", op, _with(args, 0, features[:-1] + [_other_dtype(last)])
    yield "a layer of height 0", op, _with(args, 0, features[:-1] + [last[:, :, :0]])
    yield "an integer layer", op, _with(args, 0, features[:-1] + [last.long()])
    yield "rows without their last column", op, _with(args, rows_at, rows[:, :-1])
    yield "rows with a column more", op, _with(args, rows_at, torch.cat([rows, rows[:, :1]], 1))
    yield "rows flattened", op, _with(args, rows_at, rows.reshape(-1))
    yield "rows of another dtype", op, _with(args, rows_at, _other_dtype(rows))
    yield "integer rows", op, _with(args, rows_at, rows.long())
    yield "strided rows", op, _with(args, rows_at, rows.t().contiguous().t())
    yield "batch indices past B", op, _with(args, rows_at, torch.cat([rows[:, :1] + 1000, rows[:, 1:]], 1))
    yield "batch indices far below 0", op, _with(args, rows_at, torch.cat([rows[:, :1] - 1e9, rows[:, 1:]], 1))
    layers = len(features)
    scaled = _with(_with(args, size_at, []), scales_at, [0.5] * layers)
    sized = _with(_with(args, size_at, [40, 50]), scales_at, [])
    yield "both image_size and spatial_scale", op, _with(sized, scales_at, [0.5] * layers)
    yield "neither image_size nor spatial_scale", op, _with(sized, size_at, [])
    for size in ([40], [40, 50, 60], [0, 50], [40, -2], [2 ** 62, 1]):
        yield f"image_size {size}", op, _with(sized, size_at, size)
    yield "a scale list too short", op, _with(scaled, scales_at, [0.5] * (layers - 1))
    yield "a scale list too long", op, _with(scaled, scales_at, [0.5] * (layers + 1))
    for value in (float("nan"), -1.0, 0.0, 1e300):
        yield f"scales {value}", op, _with(scaled, scales_at, [value] * layers)
    yield "padding 3", op, _with(args, padding_at, 3)
    yield "padding -1", op, _with(args, padding_at, -1)
    if op in ("box_hypercolumn", "fused_hypercolumn"):
        sampling_at = 7 if op == "box_hypercolumn" else 12
        yield "sampling_ratio 1025", op, _with(args, sampling_at, 1025)
        yield "sampling_ratio 2^40", op, _with(args, sampling_at, 2 ** 40)
    if op != "sparse_hypercolumn" and op != "fused_hypercolumn_points":
        grid_at = 2 if op == "box_hypercolumn" else 5
        yield "grid height 0", op, _with(args, grid_at, 0)
        yield "grid width -3", op, _with(args, grid_at + 1, -3)
    if not fused:
        return

    weights_at = 2 if op == "fused_hypercolumn" else 3
    bias_at, labels_at = weights_at + 1, weights_at + 2
    weights = args[weights_at]
    classes, cells, outputs, channels = weights[-1].shape
    count, dtype = rows.shape[0], features[0].dtype

    def new(*shape, kind=dtype):
        return torch.zeros(*shape, dtype=kind, device=device)

    yield "a weight dropped", op, _with(args, weights_at, weights[:-1])
    for what, shape in (("C_l + 1", (classes, cells, outputs, channels + 1)),
                        ("KK + 1", (classes, cells + 1, outputs, channels)),
                        ("M + 1", (classes, cells, outputs + 1, channels)),
                        ("NC + 1", (classes + 1, cells, outputs, channels))):
        yield f"a weight of {what}", op, _with(args, weights_at, weights[:-1] + [new(*shape)])
    yield "3-D weights", op, _with(args, weights_at, [w[0] for w in weights])
    yield "weights of another dtype", op, _with(args, weights_at, [_other_dtype(w) for w in weights])
    yield "weights of KK = 2", op, _with(args, weights_at, [new(w.shape[0], 2, *w.shape[2:]) for w in weights])
    yield "bias of a row more", op, _with(args, bias_at, new(count + 1, cells, outputs))
    yield "bias of a row less", op, _with(args, bias_at, new(max(count - 1, 0), cells, outputs))
    yield "2-D bias", op, _with(args, bias_at, new(cells, outputs))
    yield "bias of M + 1", op, _with(args, bias_at, new(count, cells, outputs + 1))
    yield "float16 bias", op, _with(args, bias_at, new(count, cells, outputs, kind=torch.float16))
    yield "no labels", op, _with(args, labels_at, None)
    yield "labels", op, _with(args, labels_at, new(count, kind=torch.int64))
    yield "labels of a row less", op, _with(args, labels_at, new(max(count - 1, 0), kind=torch.int64))
    yield "float labels", op, _with(args, labels_at, new(count, kind=torch.float32))
    yield "int32 labels", op, _with(args, labels_at, new(count, kind=torch.int32))
    yield "labels of 2^40", op, _with(args, labels_at, new(count, kind=torch.int64) + 2 ** 40)
    yield "labels of -5", op, _with(args, labels_at, new(count, kind=torch.int64) - 5)
    yield "2-D labels", op, _with(args, labels_at, new(count, 1, kind=torch.int64))
    activation_at, orders_at = padding_at + 1, padding_at + 2
    yield "activation 7", op, _with(args, activation_at, 7)
    orders = args[orders_at]
    yield "orders too short", op, _with(args, orders_at, orders[:-1])
    yield "orders too long", op, _with(args, orders_at, orders + [0])
    yield "orders 2", op, _with(args, orders_at, [2] * len(orders))
    yield "orders -1", op, _with(args, orders_at, [-1] * len(orders))
    if op == "fused_hypercolumn_points":
        kind = rows.dtype
        yield "no locations", op, _with(args, 2, None)
        yield "locations of a row less", op, _with(args, 2, new(max(count - 1, 0), 2, kind=kind))
        yield "locations of three columns", op, _with(args, 2, new(count, 3, kind=kind))
        yield "float16 locations", op, _with(args, 2, new(count, 2, kind=torch.float16))
        yield "huge locations", op, _with(args, 2, new(count, 2, kind=kind) + 1e30)
        yield "NaN locations", op, _with(args, 2, new(count, 2, kind=kind) + float("nan"))
        yield "strided locations", op, _with(args, 2, new(2, count, kind=kind).t())
