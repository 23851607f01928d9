"""Checks shared by the tests of the CUDA kernels: on a GPU (test_native_cuda.py) and emulated on
the CPU (test_cuda_emulated.py). The same cases, tolerances and comparisons in both places, so
that what passes emulated is what the GPU run checks. The Triton tests (test_triton.py) share the
bias-gradient check."""

import contextlib
import math
import os
from typing import Callable, List

import pytest
import torch

import hypercolumn_ops
from hypercolumn_ops import ops as public
from hypercolumn_ops import reference

import cases
import malformed_calls
import random_cases

# float64 kernels differ from the float64 reference only in the order of their sums (atomics,
# warp reductions, cuBLAS for projected layers): ~1e-15 relative, 1e-9 leaves room for cancellation.
RTOL64, ATOL64 = 1e-9, 1e-9

# Why each tolerance: outputs round once to the dtype (float16: 2^-11, bfloat16: 2^-8 relative);
# feature gradients are summed in float32 and rounded once, but projected score maps and their
# gradients are stored in the features' dtype and go through a matrix product over up to C_l terms
# of O(1) there. float32 differs only in summation order.
LOW_PRECISION = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-1),
    torch.bfloat16: (1e-1, 5e-1),
}


def run_in_order(case, module, order=None):
    """The case's operator through ``module`` (an operator namespace or the reference) on its
    normalised arguments, every layer of a fused operator in ``order`` (None: as planned; the
    sampling operators have no order)."""
    # Normalised afresh each time: it picks class bias rows, a step of the autograd graph.
    args = list(getattr(public, "normalise_" + case.op)(*case.args, **case.kwargs))
    if order is not None and case.op.startswith("fused"):
        args = cases.with_orders(case.op, args, [order] * len(args[0]))
    return getattr(module, case.op)(*args)


def forward_and_grads(run: Callable[[], torch.Tensor], inputs: List[torch.Tensor], probe=None):
    """Output of ``run()`` and the gradients of a fixed random projection (``probe``, drawn from
    seed 1 by default) of its finite part."""
    out = run()
    if probe is None:
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    probe = probe.to(dtype=out.dtype, device=out.device)
    loss = (torch.where(torch.isfinite(out), out, torch.zeros_like(out)) * probe).sum()
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def assert_all_close(actual, expected, rtol, atol, what):
    out, grads = actual
    ref_out, ref_grads = expected
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what} forward: {m}")
    for index, (g, ref_g) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(g, ref_g, rtol=rtol, atol=atol, msg=lambda m: f"{what} grad {index}: {m}")


def check_case(ops, case: cases.Case, order) -> None:
    """One case through ``ops`` (an operator namespace) against the reference in float64, output
    and gradients, fused layers in ``order``; the same bits twice when deterministic algorithms
    are on."""
    inputs = cases.differentiable_inputs(case)
    actual = forward_and_grads(lambda: run_in_order(case, ops, order), inputs)
    expected = forward_and_grads(lambda: run_in_order(case, reference, order), inputs)
    assert_all_close(actual, expected, RTOL64, ATOL64, f"{case} order {order}")
    if torch.are_deterministic_algorithms_enabled():
        again = forward_and_grads(lambda: run_in_order(case, ops, order), inputs)
        assert_all_close(again, actual, 0.0, 0.0, f"{case} order {order} run to run")


def random_seeds(default: int) -> List[int]:
    """Seeds of ``random_cases.random_case`` for a test: ``default`` of them, or as many as
    HYPERCOLUMN_OPS_RANDOM_CASES says (a longer search: HYPERCOLUMN_OPS_RANDOM_CASES=5000)."""
    return list(range(int(os.environ.get("HYPERCOLUMN_OPS_RANDOM_CASES", default))))


def check_random_case(ops, seed: int, device, **limits) -> None:
    """``random_cases.random_case(seed, **limits)`` through ``ops`` (an operator namespace) against
    the reference in float64, output and gradients, a fused operator in each evaluation order; odd
    seeds under deterministic algorithms, where a second run must give the same bits."""
    case = random_cases.random_case(seed, device=device, **limits)
    with deterministic_algorithms(seed % 2 == 1):
        for order in ((0, 1) if case.op.startswith("fused") else (None,)):
            check_case(ops, case, order)


def check_malformed_calls(ops, seed: int, device) -> None:
    """Each call of ``malformed_calls.malformed_calls(seed, device)`` through ``ops`` (an operator
    namespace), forward then backward: it raises (RuntimeError, ValueError, TypeError or
    IndexError) or returns; it never brings the process down, and on CUDA never faults (a CUDA
    error, seen at the synchronisation after each call, fails the test)."""
    for what, op, args in malformed_calls.malformed_calls(seed, device):
        try:
            out = getattr(ops, op)(*args)
            getattr(ops, op + "_backward")(torch.ones_like(out), *args)
            if device == "cuda":
                torch.cuda.synchronize()
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            assert "CUDA error" not in str(error), f"seed {seed}, {op} with {what}: {error}"


def block_path_cases(dtype, device) -> List[cases.Case]:
    """Sampling cases for the block shapes of the CUDA forward kernels that the shared cases miss
    (their layers have 3 to 7 channels of odd counts):

    - channels_last maps whose channel counts are multiples of every vector width (16 bytes: 2
      float64 ... 8 float16), so that the kernels take their wide-load path;
    - NCHW and strided maps of 70 and 131 channels, more than a block takes (64 channels of 32
      sparse points, 16 channels of 128 box grid places) and no multiple of it, with 41 points
      and 9 boxes x 35 grid places: several blocks each way, the last ones partial."""
    g = torch.Generator().manual_seed(5)
    f = cases.features(dtype, device, "channels_last", g, requires_grad=True,
                       shapes=((8, 10, 12), (16, 5, 6), (24, 3, 3)))
    out = [cases.Case("sparse_hypercolumn", (f, cases.points(40, torch.float32, device, g)),
                      {"image_size": cases.IMAGE}, "wide"),
           cases.Case("box_hypercolumn", (f, cases.boxes(6, torch.float32, device, g), (5, 4)),
                      {"image_size": cases.IMAGE, "padding": "zeros"}, "wide")]
    for layout in ("contiguous", "strided"):
        f = cases.features(dtype, device, layout, g, requires_grad=True, shapes=((70, 6, 7), (131, 4, 5)))
        out += [cases.Case("sparse_hypercolumn", (f, cases.points(29, torch.float32, device, g)),
                           {"image_size": cases.IMAGE}, f"many-channels-{layout}"),
                cases.Case("box_hypercolumn", (f, cases.boxes(5, torch.float32, device, g), (5, 7)),
                           {"image_size": cases.IMAGE, "padding": "zeros"}, f"many-channels-{layout}")]
    return out


# roi_align's samplings of a box grid's cells: sampling_ratio (fixed, or adaptive when <= 0) x aligned.
SAMPLINGS = [(ratio, aligned) for ratio in (1, 2, 3, 0, -1) for aligned in (True, False)]
PADDINGS = ("border", "zeros", "zeros_per_tap")


def sampling_option_cases(device) -> List[cases.Case]:
    """Cases of the sampling options, float64: padding ``"zeros_per_tap"`` on the point operators
    (points inside, on and across the border, far outside), and on the box operators every
    ``(sampling_ratio, aligned)`` of SAMPLINGS, the three paddings in turn, over boxes inside,
    across and outside the image, reversed, empty, under one feature pixel (``aligned=False``
    widens them to one) and whose corners sit on pixel edges. A box grid whose cells average
    several samples takes other kernel paths (each sample's taps, and per-pixel gathers in
    deterministic mode). Small (3 x 4 grids, a few boxes): the CUDA emulation runs every sample of
    every channel in a thread of its own."""
    g = torch.Generator().manual_seed(31)
    out = []
    for index, layout in enumerate(("channels_last", "contiguous")):
        f = cases.features(torch.float64, device, layout, g, requires_grad=True)
        w = cases.classifier(3, 2, 2, torch.float64, device, g, requires_grad=True)
        points = cases.points(8, torch.float32, device, g)
        labels = torch.randint(0, 2, (len(points),), generator=g).to(device)
        locations = torch.rand(len(points), 2, generator=g, dtype=torch.float64).to(device)
        scale = {"image_size": cases.IMAGE}
        out += [cases.Case("sparse_hypercolumn", (f, points), dict(scale, padding="zeros_per_tap"), layout),
                cases.Case("fused_hypercolumn_points", (f, points, w),
                           dict(scale, padding="zeros_per_tap", labels=labels, locations=locations,
                                activation="sigmoid"), layout)]
    boxes = torch.cat([cases.boxes(2, torch.float32, device, g),
                       torch.tensor([[0, 9.0, 7.0, 2.0, 1.0],      # reversed
                                     [1, 3.0, 3.0, 3.0, 8.0],      # no width
                                     [0, 4.2, 5.1, 4.9, 5.3],      # under one pixel of every layer
                                     [1, -9.0, -6.0, -1.0, -2.0],  # wholly outside
                                     [0, 2.0, 4.0, 10.0, 12.0]],   # on pixel edges of the finest layer
                                    device=device)])
    labels = torch.randint(0, 2, (len(boxes),), generator=g).to(device)
    for index, (ratio, aligned) in enumerate(SAMPLINGS):
        layout = ("contiguous", "channels_last", "strided")[index % 3]
        padding = PADDINGS[index % 3]
        f = cases.features(torch.float64, device, layout, g, requires_grad=True)
        w = cases.classifier(3, 2, 2, torch.float64, device, g, requires_grad=True)
        bias = torch.randn(2, 9, 2, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
        options = dict(image_size=cases.IMAGE, padding=padding, sampling_ratio=ratio, aligned=aligned)
        name = f"ratio{ratio}-{'aligned' if aligned else 'unaligned'}-{padding}-{layout}"
        out += [cases.Case("box_hypercolumn", (f, boxes, (3, 4)), options, name),
                cases.Case("fused_hypercolumn", (f, boxes, w, bias),
                           dict(options, output_size=(3, 4), labels=labels, activation="sigmoid"), name)]
    return out


def check_deterministic_paths(ops, device, order) -> None:
    """The paths of the deterministic CUDA backward that the shared cases miss. A box grid gathers
    per pixel while B * H * W <= 64 * oh * ow (kGatherPixelsPerGridPoint in csrc/cuda/common.cuh)
    and sorts its tap entries otherwise; the shared cases' grids all gather. 1 x 1 grids sort on
    the first layer (2 x 10 x 12 = 240 pixels) and gather on the others (60 and 18) in one call;
    their 44 boxes are more than a gather block's 32 threads (thin layers), so it takes them in
    two chunks. Crowded pixels: 700 of 1,000 points in a 4 x 4 square (sorted) and a 20 x 20 grid of
    3 boxes (gathered) put more taps on pixels of the 3 x 3 layer than one staged tile (256). ``ops`` (an
    operator namespace) against the reference in float64, fused layers in ``order``; the same bits
    twice when deterministic algorithms are on."""
    g = torch.Generator().manual_seed(11)
    f = cases.features(torch.float64, device, "channels_last", g, requires_grad=True)
    boxes = cases.boxes(40, torch.float32, device, g)
    w = cases.classifier(3, 2, None, torch.float64, device, g, requires_grad=True)
    crowd = torch.tensor([[0, 0.0, 0.0, 23.0, 19.0], [0, 2.0, 3.0, 20.0, 15.0], [1, 0.0, 0.0, 23.0, 19.0]],
                         device=device)
    cluster = torch.rand(700, 3, generator=g) * torch.tensor([0.0, 4.0, 4.0]) + torch.tensor([0.0, 9.0, 7.0])
    crowded_points = torch.cat([cases.points(300, torch.float32, device, g), cluster.to(device)])
    for case in (cases.Case("box_hypercolumn", (f, boxes, (1, 1)), {"image_size": cases.IMAGE}, "grid1x1"),
                 cases.Case("fused_hypercolumn", (f, boxes, w),
                            dict(output_size=(1, 1), image_size=cases.IMAGE, padding="zeros"), "grid1x1"),
                 cases.Case("sparse_hypercolumn", (f, crowded_points), {"image_size": cases.IMAGE}, "crowded"),
                 cases.Case("box_hypercolumn", (f, crowd, (20, 20)), {"image_size": cases.IMAGE}, "crowded")):
        check_case(ops, case, order)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """torch.use_deterministic_algorithms(enabled) inside the block, the previous setting after."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def check_bias_segments(ops, device, order) -> None:
    """The bias gradient sums each row's slots (4 per grid point) in segments, then the segments
    in order; CUDA also splits the cells into chunks of 32 (kBiasCellChunk in
    csrc/cuda/fused_kernels.cu). The shared cases' grids are too small for more than one segment.
    Two boxes with a 21 x 23 grid (1,932 slots a row: 8 CUDA segments, 4 Triton ones), 3 x 3 cells
    and 3 classes (keys label * 9 + cell); one box with a 9 x 11 grid and 7 x 7 cells (two CUDA
    chunks). ``ops`` against the reference in float64, fused layers in ``order``; the same bits
    twice when deterministic algorithms are on."""
    g = torch.Generator().manual_seed(5)
    f = cases.features(torch.float64, device, "contiguous", g, requires_grad=True)
    boxes = torch.tensor([[0, 1.0, 2.0, 20.0, 17.0], [1, 3.0, 0.0, 22.0, 18.0]], dtype=torch.float64, device=device)
    labelled = cases.Case(
        "fused_hypercolumn",
        (f, boxes, cases.classifier(3, 2, 3, torch.float64, device, g, requires_grad=True),
         torch.randn(3, 9, 2, generator=g, dtype=torch.float64).to(device).requires_grad_()),
        dict(labels=torch.tensor([2, 0], device=device), output_size=(21, 23), image_size=cases.IMAGE,
             activation="sigmoid"), "bias-segments")
    many_cells = cases.Case(
        "fused_hypercolumn",
        (f, boxes[:1], cases.classifier(7, 1, None, torch.float64, device, g, requires_grad=True),
         torch.randn(49, 1, generator=g, dtype=torch.float64).to(device).requires_grad_()),
        dict(output_size=(9, 11), image_size=cases.IMAGE), "bias-cell-chunks")
    for case in (labelled, many_cells):
        check_case(ops, case, order)


def check_score_products(ops, device) -> None:
    """Order 1 (project the map to score channels), forward and gradients. Small products of NCHW
    maps in the CUDA kernels (project_scores_in_kernels, project_grads_in_kernels: 18 score
    channels here, at most 32): tiles of 32 pixels (40 pixels over 2 images: the second tile
    short), channel chunks of 128 added in order where a layer has more (129 and 300 channels: 2
    and 3 chunks, the last short), weight-gradient tiles of 64 pixels and blocks of 32 channels
    (300 channels: the tenth block short), at most 64 blocks over the pixels (4,300 pixels over 2
    images: 68 tiles, the first 4 blocks take two, tiles across the images' boundary, the last
    short). cuBLAS for channels_last maps
    and for 36 score channels: one 2-D product where the images' pixels stack in memory (one image;
    a channels_last map), a batched product otherwise. Each layout, with contiguous weights and
    with strided ones (the weight gradient then takes the weights' strides), against the reference
    in float64."""
    g = torch.Generator().manual_seed(17)
    wide = ((300, 4, 5), (129, 3, 3), (7, 3, 3))
    # The large map's every pixel takes a gradient: a box over each whole image, about a bin a pixel.
    large = ((9, 43, 50), (7, 3, 3))
    whole = torch.tensor([[0, 0, 0, cases.IMAGE[1], cases.IMAGE[0]], [1, 0, 0, cases.IMAGE[1], cases.IMAGE[0]]],
                         dtype=torch.float32, device=device)
    for batch, layout, shapes, output_size in (
            (1, "contiguous", cases.LAYER_SHAPES, (4, 3)), (1, "channels_last", cases.LAYER_SHAPES, (4, 3)),
            (2, "channels_last", cases.LAYER_SHAPES, (4, 3)), (2, "contiguous", cases.LAYER_SHAPES, (4, 3)),
            (2, "contiguous", wide, (4, 3)), (2, "contiguous", large, (45, 52))):
        f = cases.features(torch.float64, device, layout, g, requires_grad=True, batch=batch, shapes=shapes)
        boxes = whole if shapes is large else cases.boxes(5, torch.float32, device, g, batch=batch)
        for strided, outputs in ((False, 2), (True, 2), (False, 4)):
            w = cases.classifier(3, outputs, None, torch.float64, device, g, shapes=shapes)
            if strided:  # every other output of a classifier with twice as many
                w = [torch.cat([x, x], dim=1)[:, ::2] for x in w]
            w = [x.requires_grad_() for x in w]
            case = cases.Case("fused_hypercolumn", (f, boxes, w),
                              dict(output_size=output_size, image_size=cases.IMAGE, activation="sigmoid"),
                              f"B{batch}-{layout}-C{shapes[0][0]}-M{outputs}-"
                              f"{'strided' if strided else 'contiguous'}-weights")
            check_case(ops, case, 1)


def check_score_bins(ops, device) -> None:
    """The deterministic gradient of a projected score map (order 1) adds each slot's M outputs
    into per-group bins in shared memory, at most 24 KB of them (ScoreBins in
    csrc/cuda/fused_kernels.cu: 3,072 float64 bins), and splits the cell keys and the outputs into
    chunks past that. Box grids (gathered) and points (sorted), with: 5 classes x 25 cells x 30
    outputs (3,750 bins: key chunks); 300 outputs (more than a block's 256 lanes: each lane takes
    two); 3,100 outputs (output chunks); and a 30 x 30 grid of 3 boxes over the 3 x 3 layer (about
    5,000 taps a pixel: many groups). Deterministic algorithms on: against the reference in
    float64, and the same bits twice."""
    g = torch.Generator().manual_seed(23)
    f = cases.features(torch.float64, device, "contiguous", g, requires_grad=True)
    boxes = cases.boxes(4, torch.float32, device, g)
    points = cases.points(30, torch.float32, device, g)
    locations = torch.rand(len(points), 2, generator=g, dtype=torch.float64).to(device)
    crowd = torch.tensor([[0, 0.0, 0.0, 23.0, 19.0], [0, 2.0, 3.0, 20.0, 15.0], [1, 1.0, 0.0, 22.0, 19.0]],
                         device=device)
    labelled = cases.classifier(5, 30, 5, torch.float64, device, g, requires_grad=True)
    box_labels = torch.randint(0, 5, (len(boxes),), generator=g).to(device)
    point_labels = torch.randint(0, 5, (len(points),), generator=g).to(device)
    wide = cases.classifier(1, 300, None, torch.float64, device, g, requires_grad=True)
    widest = cases.classifier(1, 3100, None, torch.float64, device, g, requires_grad=True)
    few = cases.classifier(2, 3, None, torch.float64, device, g, requires_grad=True)
    kwargs = {"image_size": cases.IMAGE}
    with deterministic_algorithms(True):
        for case in (
                cases.Case("fused_hypercolumn", (f, boxes, labelled),
                           dict(kwargs, labels=box_labels, output_size=(5, 6)), "key-chunks"),
                cases.Case("fused_hypercolumn_points", (f, points, labelled),
                           dict(kwargs, labels=point_labels, locations=locations), "key-chunks"),
                cases.Case("fused_hypercolumn", (f, boxes, wide), dict(kwargs, output_size=(3, 4)), "300-outputs"),
                cases.Case("fused_hypercolumn_points", (f, points, wide), kwargs, "300-outputs"),
                cases.Case("fused_hypercolumn", (f, boxes[:2], widest), dict(kwargs, output_size=(2, 3)),
                           "output-chunks"),
                cases.Case("fused_hypercolumn", (f, crowd, few), dict(kwargs, output_size=(30, 30)), "crowded")):
            check_case(ops, case, 1)


def check_index_values_valid(ops, device) -> None:
    """``index_values_valid`` (csrc/index_check.h: on CUDA one kernel that raises a flag) against
    its definition, every value an integer in [0, size): float32 and float64 batch columns, read
    in place from (N, 3) rows whose other columns are not integers (so a kernel that ignores the
    stride fails), and int64 labels; counts of 1, 257 (two blocks of 256 threads) and 300,000
    (past the CUDA kernel's 1,024 blocks: a grid-stride loop); all values valid, then one bad value
    (a fraction, -1, size, NaN, infinity) at the first, a middle or the last place. -0.0 is a valid
    0, and an empty tensor is valid. Any other rank or dtype raises."""
    g = torch.Generator().manual_seed(29)
    size = 3
    for dtype in (torch.float32, torch.float64, torch.int64):
        bad_values = (-1, size, 2 ** 40) if dtype == torch.int64 else (0.5, -1.0, size, math.nan, math.inf)
        for count in (1, 257, 300_000):
            index = torch.randint(0, size, (count,), generator=g)
            if dtype == torch.int64:
                values = index.to(device)
            else:
                rows = torch.rand(count, 3, generator=g, dtype=dtype) * 10 + 0.25
                rows[:, 0] = index
                rows[0, 0] = -0.0
                values = rows.to(device)[:, 0]
            assert ops.index_values_valid(values, size), (dtype, count)
            for place in sorted({0, count // 2, count - 1}):
                for bad in bad_values:
                    spoiled = values.clone()
                    spoiled[place] = bad
                    assert not ops.index_values_valid(spoiled, size), (dtype, count, place, bad)
                    # The values after the bad one: a view with an offset.
                    assert ops.index_values_valid(spoiled[place + 1:], size), (dtype, count, place, bad)
        assert ops.index_values_valid(torch.empty(0, dtype=dtype, device=device), size)
        assert not ops.index_values_valid(torch.zeros(2, dtype=dtype, device=device), 0)
    with pytest.raises(RuntimeError, match="values: expected a 1-D tensor"):
        ops.index_values_valid(torch.zeros(2, 3, device=device), size)
    with pytest.raises(RuntimeError, match="values: expected float32, float64 or int64"):
        ops.index_values_valid(torch.zeros(2, dtype=torch.float16, device=device), size)


def check_double_backward_raises(backend: str, device) -> None:
    """A gradient of the gradients (create_graph=True, then backward through the backward
    operators) raises NotImplementedError on ``backend``, for every operator, instead of a
    silently wrong result; the gradients themselves still come out."""
    seen = set()
    for case in cases.all_cases(torch.float64, device, requires_grad=True):
        if case.op in seen or case.name == "empty":
            continue
        seen.add(case.op)
        inputs = cases.differentiable_inputs(case)
        with hypercolumn_ops.use_backend(backend):
            out = case()
            grads = torch.autograd.grad(out.nan_to_num().square().sum(), inputs, create_graph=True)
            assert all(g.requires_grad for g in grads), case
            with pytest.raises(NotImplementedError, match=f"{case.op}_backward: the gradient of this gradient"):
                torch.autograd.grad(sum(g.sum() for g in grads), inputs)
    assert len(seen) == 4, seen


def check_invalid_rows(device, call: Callable[[cases.Case], torch.Tensor]) -> None:
    """Rows with a batch index out of range, a non-integer one, a NaN or infinite coordinate, or a
    label out of range give NaN outputs, and the other rows' outputs and gradients are those of a
    call without the bad rows. ``call(case)`` runs a case on the kernels under test."""
    g = torch.Generator().manual_seed(3)
    f = cases.features(torch.float64, device, "channels_last", g, requires_grad=True)
    w = cases.classifier(3, 2, 4, torch.float64, device, g, requires_grad=True)
    good = cases.points(5, torch.float64, device, g)
    bad = torch.tensor([[2.0, 3.0, 4.0], [0.5, 3.0, 4.0], [0.0, float("nan"), 4.0], [1.0, 3.0, float("inf")],
                        [-1.0, 1.0, 1.0]], dtype=torch.float64, device=device)
    points = torch.cat([good, bad, good[:1]])
    valid_point = torch.tensor([True] * len(good) + [False] * len(bad) + [True], device=device)
    labels = torch.randint(0, 4, (len(points),), generator=g).to(device)
    labels[-1] = 7  # an invalid label on an otherwise good row
    locations = torch.rand(len(points), 2, generator=g, dtype=torch.float64).to(device)
    inputs = list(f) + list(w)
    with hypercolumn_ops.set_value_checks(False):
        for op, kwargs, keep in (
                ("sparse_hypercolumn", {}, valid_point),
                ("fused_hypercolumn_points", {"labels": labels, "locations": locations}, valid_point & (labels < 4))):
            def run(rows):
                args = (f, points[rows]) if op == "sparse_hypercolumn" else (f, points[rows], w)
                extra = {k: v[rows] for k, v in kwargs.items()}
                return call(cases.Case(op, args, dict(image_size=cases.IMAGE, **extra)))

            everything = forward_and_grads(lambda: run(torch.ones_like(keep)), inputs)
            assert torch.isnan(everything[0][~keep]).all(), op
            assert torch.isfinite(everything[0][keep]).all(), op
            probe = torch.randn(everything[0].shape, generator=g, dtype=torch.float64)
            everything = forward_and_grads(lambda: run(torch.ones_like(keep)), inputs, probe)
            subset = forward_and_grads(lambda: run(keep), inputs, probe[keep.cpu()])
            torch.testing.assert_close(everything[0][keep], subset[0], rtol=RTOL64, atol=ATOL64)
            for a, b in zip(everything[1], subset[1]):
                torch.testing.assert_close(a, b, rtol=RTOL64, atol=ATOL64)


def check_empty_batch(device, call: Callable[[cases.Case], torch.Tensor]) -> None:
    """A batch of no images (B = 0) with points and boxes, the value checks off: every row's batch
    index is out of range, so every output is NaN, and no kernel reads the empty maps, forward or
    backward. NCHW maps of 70 channels (more than a block of the sampling kernels takes) and
    channels_last ones; ``call(case)`` runs a case on the kernels under test."""
    g = torch.Generator().manual_seed(9)
    shapes = ((70, 6, 7), (3, 3, 4))
    points = cases.points(4, torch.float32, device, g, batch=1)
    boxes = cases.boxes(3, torch.float32, device, g, batch=1)
    scale = {"image_size": cases.IMAGE}
    with hypercolumn_ops.set_value_checks(False):
        for layout in ("contiguous", "channels_last"):
            f = cases.features(torch.float64, device, layout, g, requires_grad=True, shapes=shapes, batch=0)
            w = cases.classifier(3, 2, None, torch.float64, device, g, requires_grad=True, shapes=shapes)
            for case in (cases.Case("sparse_hypercolumn", (f, points), scale),
                         cases.Case("box_hypercolumn", (f, boxes, (3, 2)), scale),
                         cases.Case("fused_hypercolumn", (f, boxes, w), dict(output_size=(3, 2), **scale)),
                         cases.Case("fused_hypercolumn_points", (f, points, w),
                                    dict(locations=torch.rand(len(points), 2, generator=g).to(device), **scale))):
                out, grads = forward_and_grads(lambda: call(case), list(f) + list(w))
                assert out.shape[0] == len(case.args[1]), (case.op, layout, out.shape)  # one per point or box
                assert torch.isnan(out).all(), (case.op, layout)
                assert all(not grad.any() for grad in grads), (case.op, layout)


# A case of each operator for check_cuda_graph: the fused ones with labels, so that both value
# checks (batch indices, labels) are met inside the capture.
GRAPH_CASES = {"sparse_hypercolumn": "border-image_size-channels_last",
               "box_hypercolumn": "zeros-spatial_scale-contiguous",
               "fused_hypercolumn": "K5-M2-NC3-biasclass-sigmoid-border-contiguous",
               "fused_hypercolumn_points": "K5-M2-NC3-biasclass-sigmoid-border-contiguous"}


def check_cuda_graph(backend: str, op: str) -> None:
    """The public ``op`` on ``backend``, forward and backward, captured in one CUDA graph with the
    value checks left on (a capture skips them: they need a synchronisation), then replayed on new
    feature, weight, bias and coordinate values: the output and gradients of an eager call on the
    new values; with deterministic algorithms on, a second replay gives the same bits."""
    case = next(c for c in cases.all_cases(torch.float64, "cuda", requires_grad=True)
                if c.op == op and c.name == GRAPH_CASES[op])
    inputs = cases.differentiable_inputs(case)
    coordinates = case.args[1]
    generator = torch.Generator(device="cuda").manual_seed(4)
    with hypercolumn_ops.use_backend(backend):
        probe = torch.randn(case().shape, generator=generator, dtype=torch.float64, device="cuda")

        def step():
            for tensor in inputs:
                tensor.grad = None
            out = case()
            out.backward(probe)
            return out

        # Warm-up on the capture's stream: Triton compiles its kernels, and cuBLAS makes its
        # handle and this stream's workspace, on first use; a capture may do neither.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            captured = step()
        captured_grads = [tensor.grad for tensor in inputs]
        with torch.no_grad():
            for tensor in inputs:
                tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype, device="cuda"))
            coordinates[:, 1:] += 0.37  # moves every point or box by a fraction of a pixel
        graph.replay()
        replayed = (captured.detach().clone(), [grad.clone() for grad in captured_grads])
        eager = forward_and_grads(case, inputs, probe)
    what = f"{case} on {backend}, graph replay"
    assert_all_close(replayed, eager, RTOL64, ATOL64, what)
    if torch.are_deterministic_algorithms_enabled():
        graph.replay()
        assert_all_close((captured.detach(), captured_grads), replayed, 0.0, 0.0, f"{what} twice")
