"""The native backend's C++ CPU kernels (csrc/cpu/) against the reference: every shared case in
float64, both evaluation orders of the fused operators, gradcheck, opcheck, determinism across
runs and thread counts, low-precision dtypes, and points that must give NaN without reading out
of bounds."""

import pytest
import torch

import hypercolumn_ops
from hypercolumn_ops import ops, reference
from hypercolumn_ops._codes import PADDINGS
from cases import (IMAGE, Case, all_cases, assert_close_to_reference, boxes, classifier, differentiable_inputs,
                   features, fused_cases, points, with_orders)
from kernel_checks import (check_double_backward_raises, check_empty_batch, check_index_values_valid,
                           check_malformed_calls, check_random_case, random_seeds, run_in_order,
                           sampling_option_cases)

# float64: the kernels sum in another order than the reference (blocked dot products, GEMM
# tiles), a few ulps apart; the issue bounds the difference at 1e-12 relative. The absolute
# floor is for elements that cancel to ~0 (inputs are O(1)), where a relative bound means nothing.
RTOL64 = ATOL64 = 1e-12

ORDERS = {"sample_features": lambda layers: [0] * layers, "project_scores": lambda layers: [1] * layers,
          "mixed": lambda layers: [layer % 2 for layer in range(layers)]}


@pytest.fixture(autouse=True)
def native_built():
    assert "native" in hypercolumn_ops.available_backends("cpu"), (
        "the compiled extension is not built: python setup.py build_ext --inplace")


@pytest.mark.parametrize("case", all_cases(torch.float64, "cpu", requires_grad=True), ids=repr)
def test_matches_reference_float64(case):
    assert_close_to_reference(case, "native", RTOL64, ATOL64)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "channels_last"])
def test_many_points_on_small_maps_match_reference_float64(layout):
    # Many points on maps of few pixels: the sampling kernels gather from channels_last copies.
    g = torch.Generator().manual_seed(21)
    f = features(torch.float64, "cpu", layout, g, True, shapes=((70, 3, 3), (5, 4, 5), (3, 10, 12)))
    cases = [Case("sparse_hypercolumn", (f, points(600, torch.float32, "cpu", g)), {"image_size": IMAGE}, layout),
             Case("box_hypercolumn", (f, boxes(3, torch.float32, "cpu", g), (10, 12)),
                  {"image_size": IMAGE, "padding": "zeros"}, layout)]
    for case in cases:
        assert_close_to_reference(case, "native", RTOL64, ATOL64)


def normalised_args(case):
    """The compiled operator's arguments of a fused case (still differentiable w.r.t. the case's tensors)."""
    normalise = (ops.normalise_fused_hypercolumn if case.op == "fused_hypercolumn"
                 else ops.normalise_fused_hypercolumn_points)
    return list(normalise(*case.args, **case.kwargs))


def finite_probe_loss(out, probe):
    return (torch.where(torch.isfinite(out), out, torch.zeros_like(out)) * probe).sum()


def forward_and_grads(function, args, inputs, probe):
    out = function(*args)
    if not inputs:
        return out.detach(), []
    grads = torch.autograd.grad(finite_probe_loss(out, probe), inputs, allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("case", fused_cases(torch.float64, "cpu", requires_grad=True), ids=repr)
def test_fused_orders_match_reference_float64(case, order):
    assert_order_matches_reference(case, order)


@pytest.mark.parametrize("order", list(ORDERS))
def test_tall_box_grids_match_reference_float64(order):
    # 23 grid rows: more than one block of the box-grid kernels (kBoxRows = 10 in
    # csrc/cpu/fused_kernel.cpp) and no multiple of it, so the separable forward and score-map
    # gradients take three blocks, the last one partial; the shared cases' grids have 6 rows.
    g = torch.Generator().manual_seed(23)
    f = features(torch.float64, "cpu", "contiguous", g, True)
    w = classifier(3, 2, 3, torch.float64, "cpu", g, True)
    b = boxes(6, torch.float32, "cpu", g)
    labels = torch.randint(0, 3, (b.shape[0],), generator=g)
    bias = torch.randn(3, 9, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    case = Case("fused_hypercolumn", (f, b, w, bias),
                dict(output_size=(23, 7), image_size=IMAGE, labels=labels, padding="zeros"), "tall")
    assert_order_matches_reference(case, order)


@pytest.mark.parametrize("grid, outputs", [(2, 3), (5, 23)], ids=["Q12", "Q575"])
def test_projection_of_nchw_maps_both_product_orders_float64(grid, outputs):
    # The CPU projection of an NCHW map multiplies weights @ features and transposes while the
    # score channels Q are at most a quarter of the feature channels C, else features @ weights.T
    # (project_scores in csrc/cpu/fused_kernel.cpp). C = 60 and 3: Q = 12 takes the first on the
    # wide layer and the second on the narrow one; Q = 575 the second on both, in two column
    # blocks of at most 512 (kGemmColumns), the last one partial.
    g = torch.Generator().manual_seed(7)
    shapes = ((60, 9, 11), (3, 4, 5))
    f = features(torch.float64, "cpu", "contiguous", g, True, shapes=shapes)
    w = classifier(grid, outputs, None, torch.float64, "cpu", g, True, shapes=shapes)
    bias = torch.randn(grid * grid, outputs, generator=g, dtype=torch.float64).requires_grad_(True)
    case = Case("fused_hypercolumn", (f, boxes(4, torch.float32, "cpu", g), w, bias),
                dict(output_size=(5, 6), image_size=IMAGE), f"Q{grid * grid * outputs}")
    assert_order_matches_reference(case, "project_scores")


OPTION_CASES = sampling_option_cases("cpu")
OPTION_RUNS = [(index, order) for index, case in enumerate(OPTION_CASES)
               for order in (ORDERS if case.op.startswith("fused") else (None,))]


@pytest.mark.parametrize("index,order", OPTION_RUNS,
                         ids=[f"{OPTION_CASES[i]!r}" + ("" if o is None else f"-{o}") for i, o in OPTION_RUNS])
def test_sampling_options_match_reference_float64(index, order):
    # padding "zeros_per_tap" and every sampling_ratio / aligned of the box operators, the fused
    # ones in each evaluation order: the separable box paths (per-line tap lists) and the per-point
    # ones (the products of a grid point's row and column taps).
    case = OPTION_CASES[index]
    if order is None:
        assert_close_to_reference(case, "native", RTOL64, ATOL64)
    else:
        assert_order_matches_reference(case, order)


@pytest.mark.parametrize("order", list(ORDERS))
def test_adaptive_sampling_is_capped_at_1024_samples_float64(order):
    # Adaptive sampling takes ceil(extent / cells) samples per axis, at most 1024: a box of 1e6
    # pixels on a 2 x 1 grid would take 62,500 a row. Its cells average 1024 samples spread over
    # the box (most of them outside the maps), as the reference's. One layer is 3 x 4 pixels at
    # scale 0.125 (a narrow box there samples too), and a box whose extent is infinite in feature
    # pixels (a finite extent times a scale of 1e300) takes 1024 too, never an integer conversion of
    # infinity.
    g = torch.Generator().manual_seed(41)
    f = features(torch.float64, "cpu", "contiguous", g, True, shapes=((3, 10, 12), (4, 3, 4)))
    w = classifier(2, 1, None, torch.float64, "cpu", g, True, shapes=((3, 10, 12), (4, 3, 4)))
    huge = torch.tensor([[0, -5e5, -3.0, 5e5, 20.0], [1, 2.0, -4e5, 18.0, 6e5], [0, 1.0, 2.0, 9.0, 11.0]],
                        dtype=torch.float64)
    for scale in ([0.5, 0.125], [0.5, 1e300]):
        for aligned in (True, False):
            options = dict(spatial_scale=scale, padding="zeros", sampling_ratio=0, aligned=aligned)
            assert_close_to_reference(Case("box_hypercolumn", (f, huge, (2, 1)), options, "huge"), "native",
                                      RTOL64, ATOL64)
            assert_order_matches_reference(Case("fused_hypercolumn", (f, huge, w), dict(options, output_size=(2, 1)),
                                                "huge"), order)


@pytest.mark.parametrize("padding", ["border", "zeros", "zeros_per_tap"])
def test_coordinates_whose_feature_coordinates_overflow_clamp(padding):
    # float32 coordinates near float32's largest value times scales above 1: the feature coordinate
    # overflows to +-inf. Such a point is far like any other: the border value ("border") or 0.
    g = torch.Generator().manual_seed(43)
    f = features(torch.float32, "cpu", "contiguous", g, shapes=((3, 5, 6),))
    big = 3e38
    pts = torch.tensor([[0, big, 0.1], [1, 2.0, -big], [0, -big, big], [1, 3.0, 4.0]], dtype=torch.float32)
    out = torch.ops.hypercolumn_ops.sparse_hypercolumn(f, pts, [], [1.7], PADDINGS[padding])
    with hypercolumn_ops.use_backend("reference"):
        expected = hypercolumn_ops.sparse_hypercolumn(f, pts, spatial_scale=1.7, padding=padding)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)  # float32 sums of four taps
    if padding == "border":  # the corner pixels: x clamps to the last column, y to the first row
        torch.testing.assert_close(out[0], f[0][0, :, 0, 5])
        torch.testing.assert_close(out[2], f[0][0, :, 4, 0])
    else:
        assert (out[:3] == 0).all()


def test_boxes_whose_extents_overflow_are_invalid():
    # Finite corners whose difference overflows float32 put every grid point at infinity: such a
    # box is invalid (NaN) on every path, as the reference's. One whose extent is finite but whose
    # last grid row overflows in (i + 0.5) * (y2 - y1) / oh clamps instead, as a far point.
    g = torch.Generator().manual_seed(47)
    f = features(torch.float32, "cpu", "contiguous", g)
    w = classifier(2, 1, None, torch.float32, "cpu", g)
    rows = torch.tensor([[0, -3e38, 1.0, 3e38, 6.0], [1, 1.0, -2e38, 5.0, 2e38], [0, 1.0, 1e38, 5.0, 2.5e38],
                         [1, 2.0, 3.0, 9.0, 8.0]], dtype=torch.float32)
    for sampling_ratio, aligned in ((1, True), (2, False)):
        options = dict(image_size=IMAGE, sampling_ratio=sampling_ratio, aligned=aligned)
        out = hypercolumn_ops.box_hypercolumn(f, rows, (3, 2), **options)
        fused = hypercolumn_ops.fused_hypercolumn(f, rows, w, output_size=(3, 2), **options)
        assert torch.isnan(out[:2]).all() and torch.isnan(fused[:2]).all()
        assert torch.isfinite(out[2:]).all() and torch.isfinite(fused[2:]).all()
        with hypercolumn_ops.use_backend("reference"):
            expected = hypercolumn_ops.box_hypercolumn(f, rows, (3, 2), **options)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, equal_nan=True)  # float32 sums


def assert_order_matches_reference(case, order):
    """A fused case with every layer in ``order`` (a key of ORDERS): native against the reference
    in float64, output and gradients."""
    def args():  # afresh per call: the normalised bias is a differentiable view of the case's
        normalised = normalised_args(case)
        normalised = with_orders(case.op, normalised, ORDERS[order](len(normalised[0])))
        return normalised

    inputs = differentiable_inputs(case)
    native = getattr(torch.ops.hypercolumn_ops, case.op)
    probe = torch.randn(native(*args()).shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out, grads = forward_and_grads(native, args(), inputs, probe)
    expected, expected_grads = forward_and_grads(getattr(reference, case.op), args(), inputs, probe)
    torch.testing.assert_close(out, expected, rtol=RTOL64, atol=ATOL64, equal_nan=True)
    for index, (grad, expected_grad) in enumerate(zip(grads, expected_grads)):
        torch.testing.assert_close(grad, expected_grad, rtol=RTOL64, atol=ATOL64,
                                   msg=lambda m: f"grad of input {index}: {m}")


# ----------------------------------------------------------------------------- gradcheck, opcheck

SMALL_SHAPES = ((2, 5, 6), (3, 3, 2))
SMALL_IMAGE = (9, 11)


def small_inputs(seed, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    f = features(torch.float64, "cpu", layout, g, True, shapes=SMALL_SHAPES)
    p = points(5, torch.float64, "cpu", g, image=SMALL_IMAGE)
    b = boxes(2, torch.float64, "cpu", g, image=SMALL_IMAGE)
    w = classifier(2, 2, None, torch.float64, "cpu", g, True, shapes=SMALL_SHAPES)
    bias = torch.randn(4, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    locations = torch.rand(p.shape[0], 2, generator=g, dtype=torch.float64)
    return f, p, b, w, bias, locations


@pytest.mark.parametrize("seed,layout", [(0, "contiguous"), (1, "channels_last"), (2, "strided")])
@pytest.mark.slow
def test_gradcheck_sampling(seed, layout):
    f, p, b, _, _, _ = small_inputs(seed, layout)
    with hypercolumn_ops.use_backend("native"):
        assert torch.autograd.gradcheck(lambda *fs: hypercolumn_ops.sparse_hypercolumn(list(fs), p, image_size=SMALL_IMAGE), f)
        assert torch.autograd.gradcheck(
            lambda *fs: hypercolumn_ops.box_hypercolumn(list(fs), b, (3, 2), image_size=SMALL_IMAGE, padding="zeros"), f)


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("activation", [None, "sigmoid"])
@pytest.mark.slow
def test_gradcheck_fused(order, activation):
    f, p, b, w, bias, locations = small_inputs(4)
    layers = len(f)

    def fused(*tensors):
        args = list(ops.normalise_fused_hypercolumn(list(tensors[:layers]), b, list(tensors[layers:2 * layers]),
                                                    tensors[-1], output_size=(3, 2), image_size=SMALL_IMAGE,
                                                    activation=activation))
        args = with_orders("fused_hypercolumn", args, ORDERS[order](layers))
        return torch.ops.hypercolumn_ops.fused_hypercolumn(*args)

    def fused_points(*tensors):
        args = list(ops.normalise_fused_hypercolumn_points(list(tensors[:layers]), p, list(tensors[layers:2 * layers]),
                                                           tensors[-1], locations=locations, image_size=SMALL_IMAGE,
                                                           activation=activation, padding="zeros"))
        args = with_orders("fused_hypercolumn_points", args, ORDERS[order](layers))
        return torch.ops.hypercolumn_ops.fused_hypercolumn_points(*args)

    assert torch.autograd.gradcheck(fused, (*f, *w, bias))
    assert torch.autograd.gradcheck(fused_points, (*f, *w, bias))


def opcheck_args(case):
    """(operator overload, compiled arguments) of a case."""
    normalise = getattr(ops, "normalise_" + case.op)
    return getattr(torch.ops.hypercolumn_ops, case.op).default, tuple(normalise(*case.args, **case.kwargs))


def opcheck_cases():
    chosen = {}
    for requires_grad in (False, True):
        for case in all_cases(torch.float64, "cpu", requires_grad=requires_grad):
            key = (case.op, requires_grad, case.name.split("-")[-1])  # one per op, grad mode and layout
            chosen.setdefault(key, case)
    return list(chosen.values())


@pytest.mark.parametrize("case", opcheck_cases(), ids=lambda c: f"{c!r}-grad{differentiable_inputs(c) != []}")
@pytest.mark.slow
def test_opcheck(case):
    op, args = opcheck_args(case)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", [c for c in all_cases(torch.float64, "cpu") if c.name.endswith("strided")
                                  or c.name.endswith("channels_last")], ids=repr)
@pytest.mark.slow
def test_opcheck_backward_ops(case):
    op, args = opcheck_args(case)
    out = op(*args)
    grad = torch.randn_like(out)
    torch.library.opcheck(getattr(torch.ops.hypercolumn_ops, case.op + "_backward").default, (grad, *args))


# ----------------------------------------------------------------------------- determinism

def determinism_cases():
    """Large enough to split into many point blocks, channel blocks, row bands and GEMM tiles."""
    g = torch.Generator().manual_seed(7)
    shapes = ((24, 150, 130), (300, 19, 17))
    image = (300, 260)
    f = [t.requires_grad_(True) for t in features(torch.float32, "cpu", "contiguous", g, shapes=shapes, batch=2)]
    f[1] = f[1].detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = classifier(3, 2, 3, torch.float32, "cpu", g, True, shapes=shapes)
    b = boxes(10, torch.float32, "cpu", g, image=image, batch=2)
    p = points(3000, torch.float32, "cpu", g, image=image, batch=2)
    labels = torch.randint(0, 3, (b.shape[0],), generator=g)
    point_labels = torch.randint(0, 3, (p.shape[0],), generator=g)
    locations = torch.rand(p.shape[0], 2, generator=g)
    bias = torch.randn(3, 9, 2, generator=g).requires_grad_(True)
    cases = {
        "sparse": (lambda: hypercolumn_ops.sparse_hypercolumn(f, p, image_size=image), f),
        "box": (lambda: hypercolumn_ops.box_hypercolumn(f, b, (13, 11), image_size=image), f),
    }

    def fused(orders):  # normalised afresh per call: the bias rows are a differentiable view
        args = ops.normalise_fused_hypercolumn(f, b, w, bias, output_size=(20, 18), image_size=image, labels=labels,
                                               activation="sigmoid")
        return torch.ops.hypercolumn_ops.fused_hypercolumn(*with_orders("fused_hypercolumn", args, orders))

    def fused_points(orders):
        args = ops.normalise_fused_hypercolumn_points(f, p, w, bias, locations=locations, image_size=image,
                                                      labels=point_labels, activation="sigmoid")
        args = with_orders("fused_hypercolumn_points", args, orders)
        return torch.ops.hypercolumn_ops.fused_hypercolumn_points(*args)

    for order, orders in (("sample_features", [0, 0]), ("project_scores", [1, 1])):
        cases["fused-" + order] = (lambda orders=orders: fused(orders), [*f, *w, bias])
        cases["fused_points-" + order] = (lambda orders=orders: fused_points(orders), [*f, *w, bias])
    return cases


DETERMINISM_CASES = determinism_cases()


def run_with_threads(name, threads):
    call, inputs = DETERMINISM_CASES[name]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    # Deterministic mode as docs/semantics.md states it: it also covers PyTorch's own backward of
    # the class-bias lookup (an index with accumulation) around the kernels.
    torch.use_deterministic_algorithms(True)
    try:
        with hypercolumn_ops.use_backend("native"):
            out = call()
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        grads = torch.autograd.grad(finite_probe_loss(out, probe), inputs)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(previous)
    return [out.detach(), *grads]


@pytest.mark.parametrize("name", list(DETERMINISM_CASES))
def test_bitwise_deterministic_across_runs_and_thread_counts(name):
    first = run_with_threads(name, 2)
    again = run_with_threads(name, 2)
    single = run_with_threads(name, 1)
    for index, (a, b, c) in enumerate(zip(first, again, single)):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), f"{name}: tensor {index} differs from run to run"
        assert torch.equal(a.nan_to_num(), c.nan_to_num()), f"{name}: tensor {index} differs with 1 thread"


# ----------------------------------------------------------------------------- low precision

# Against the float64 reference evaluated on the same (rounded) inputs. The kernels accumulate
# in float32, so the error is float32 summation over ~20-70 terms plus one final rounding to the
# output dtype: float32 ~1e-6 relative (tolerance 1e-5 with a 1e-5 floor for values that
# cancel); float16 rounds to 2^-11 ~ 4.9e-4 relative (2e-3); bfloat16 to 2^-8 ~ 3.9e-3
# relative (1.6e-2). The floors are the same multiples of O(1) outputs and gradients.
LOW_PRECISION = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def upcast(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().double().requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(upcast(v) for v in value)
    return value


@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize("index", range(len(all_cases(torch.float64, "cpu"))))
@pytest.mark.slow
def test_low_precision_close_to_float64_reference(dtype, index):
    case = all_cases(dtype, "cpu", requires_grad=True)[index]
    case64 = type(case)(case.op, upcast(case.args), {k: upcast(v) for k, v in case.kwargs.items()}, case.name)
    with hypercolumn_ops.use_backend("native"):
        out = case()
    with hypercolumn_ops.use_backend("reference"):
        expected = case64()
    assert out.dtype == dtype
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    inputs, inputs64 = differentiable_inputs(case), differentiable_inputs(case64)
    tolerance = LOW_PRECISION[dtype]
    torch.testing.assert_close(out.double(), expected.detach(), rtol=tolerance, atol=tolerance, equal_nan=True)
    if not inputs:
        return
    grads = torch.autograd.grad(finite_probe_loss(out, probe), inputs, allow_unused=True)
    grads64 = torch.autograd.grad(finite_probe_loss(expected, probe.double()), inputs64, allow_unused=True)
    for position, (grad, grad64, t) in enumerate(zip(grads, grads64, inputs)):
        grad = torch.zeros_like(t) if grad is None else grad
        grad64 = torch.zeros_like(t, dtype=torch.float64) if grad64 is None else grad64
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), grad64, rtol=tolerance, atol=tolerance,
                                   msg=lambda m: f"{case} grad of input {position}: {m}")


# ----------------------------------------------------------------------------- bad points


def mixed_points(count, generator):
    """Valid points, then rows whose coordinates or batch index make them sample nothing."""
    valid = points(count, torch.float64, "cpu", generator)
    nan, inf = float("nan"), float("inf")
    bad = torch.tensor([[0, nan, 3.0], [1, 4.0, inf], [0, -inf, 2.0], [1, nan, nan],  # coordinates
                        [2.0, 3.0, 3.0], [-1.0, 3.0, 3.0], [0.5, 3.0, 3.0], [nan, 3.0, 3.0], [1e30, 3.0, 3.0]],
                       dtype=torch.float64)
    return valid, torch.cat([valid, bad])


def check_bad_rows(out, clean, rows):
    """Rows [:rows] equal the call without the bad points; the rest are all NaN."""
    torch.testing.assert_close(out[:rows], clean, rtol=0, atol=0)
    assert torch.isnan(out[rows:]).all()


@pytest.mark.parametrize("order", [0, 1], ids=["sample_features", "project_scores"])
def test_empty_batch_gives_nan(order):
    check_empty_batch("cpu", lambda case: run_in_order(case, torch.ops.hypercolumn_ops, order))


@pytest.mark.parametrize("padding", [0, 1])
def test_bad_points_give_nan_and_no_gradient(padding):
    g = torch.Generator().manual_seed(11)
    f = features(torch.float64, "cpu", "channels_last", g, True)
    valid, mixed = mixed_points(13, g)
    rows = valid.shape[0]
    scales = (list(IMAGE), [])  # image_size, spatial_scale
    ours = torch.ops.hypercolumn_ops
    out = ours.sparse_hypercolumn(f, mixed, *scales, padding)
    clean = ours.sparse_hypercolumn(f, valid, *scales, padding)
    check_bad_rows(out, clean, rows)
    grad = torch.randn_like(out)
    grads = ours.sparse_hypercolumn_backward(grad, f, mixed, *scales, padding)
    clean_grads = ours.sparse_hypercolumn_backward(grad[:rows].contiguous(), f, valid, *scales, padding)
    for a, b in zip(grads, clean_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    w = classifier(3, 2, 2, torch.float64, "cpu", g, True)
    labels = torch.randint(0, 2, (mixed.shape[0],), generator=g)
    labels[3] = 2  # out of [0, NC) on a valid point
    labels[5] = -1
    locations = torch.rand(mixed.shape[0], 2, generator=g, dtype=torch.float64)
    locations[7] = float("nan")  # a place that is not finite
    bad_rows = torch.zeros(mixed.shape[0], dtype=torch.bool)
    bad_rows[[3, 5, 7]] = True
    bad_rows[rows:] = True
    keep = ~bad_rows
    for order in (0, 1):
        args = (f, mixed, locations, w, None, labels, *scales, padding, 1, [order] * 3)
        out = ours.fused_hypercolumn_points(*args)
        clean = ours.fused_hypercolumn_points(f, mixed[keep], locations[keep], w, None, labels[keep], *scales,
                                              padding, 1, [order] * 3)
        assert torch.isnan(out[bad_rows]).all()
        torch.testing.assert_close(out[keep], clean, rtol=RTOL64, atol=ATOL64)
        grad = torch.randn_like(out)
        grad_features, grad_weights, grad_bias = ours.fused_hypercolumn_points_backward(grad, *args)
        clean_features, clean_weights, clean_bias = ours.fused_hypercolumn_points_backward(
            grad[keep].contiguous(), f, mixed[keep], locations[keep], w, None, labels[keep], *scales, padding, 1,
            [order] * 3)
        for a, b in zip(grad_features + grad_weights, clean_features + clean_weights):
            torch.testing.assert_close(a, b, rtol=RTOL64, atol=ATOL64)
        assert (grad_bias[bad_rows] == 0).all()


def test_bad_boxes_give_nan():
    g = torch.Generator().manual_seed(12)
    f = features(torch.float64, "cpu", "contiguous", g)
    valid = boxes(3, torch.float64, "cpu", g)
    bad = torch.tensor([[0, float("nan"), 1.0, 5.0, 6.0], [1, 1.0, 1.0, float("inf"), 6.0], [2.0, 1.0, 1.0, 5.0, 6.0],
                        [0.25, 1.0, 1.0, 5.0, 6.0]], dtype=torch.float64)
    mixed = torch.cat([valid, bad])
    rows = valid.shape[0]
    scales = ([], [0.5, 0.25, 0.15])  # image_size, spatial_scale
    ours = torch.ops.hypercolumn_ops
    out = ours.box_hypercolumn(f, mixed, 4, 3, *scales, 0, 1, True)
    check_bad_rows(out, ours.box_hypercolumn(f, valid, 4, 3, *scales, 0, 1, True), rows)
    w = [x.unsqueeze(0) for x in classifier(2, 3, None, torch.float64, "cpu", g)]
    labels = torch.zeros(mixed.shape[0], dtype=torch.int64)
    labels[1] = 1  # NC = 1: label 1 is out of range
    for order in (0, 1):
        out = ours.fused_hypercolumn(f, mixed, w, None, labels, 4, 3, *scales, 0, 0, [order] * 3, 1, True)
        assert torch.isnan(out[[1, *range(rows, mixed.shape[0])]]).all()
        assert torch.isfinite(out[[0, 2]]).all()


# ----------------------------------------------------------------------------- argument checks

def compiled_args(op):
    g = torch.Generator().manual_seed(0)
    f = features(torch.float32, "cpu", "contiguous", g)
    scales = [0.5, 0.25, 0.15]
    if op == "sparse_hypercolumn":
        return dict(features=f, points=points(4, torch.float32, "cpu", g), image_size=[], spatial_scale=scales,
                    padding=0)
    w = [x.unsqueeze(0) for x in classifier(2, 3, None, torch.float32, "cpu", g)]
    return dict(features=f, boxes=boxes(2, torch.float32, "cpu", g), weights=w, bias=None, labels=None,
                output_height=3, output_width=4, image_size=[], spatial_scale=scales, padding=0, activation=0,
                orders=[0, 1, 0], sampling_ratio=1, aligned=True)


BAD_ARGUMENTS = [
    ("sparse_hypercolumn", "features", lambda a: a.update(features=[])),
    ("sparse_hypercolumn", "features", lambda a: a.update(features=[a["features"][0][0]])),
    ("sparse_hypercolumn", "features", lambda a: a.update(features=[a["features"][0].double(), a["features"][1]])),
    ("sparse_hypercolumn", "features", lambda a: a.update(features=[a["features"][0].long()])),
    ("sparse_hypercolumn", "points", lambda a: a.update(points=a["points"][:, :2])),
    ("sparse_hypercolumn", "spatial_scale", lambda a: a.update(spatial_scale=[0.5])),
    ("sparse_hypercolumn", "image_size", lambda a: a.update(image_size=[40, 50])),
    ("sparse_hypercolumn", "image_size", lambda a: a.update(image_size=[40, 0], spatial_scale=[])),
    ("sparse_hypercolumn", "padding", lambda a: a.update(padding=3)),
    ("fused_hypercolumn", "boxes", lambda a: a.update(boxes=a["boxes"][:, :4])),
    ("fused_hypercolumn", "weights", lambda a: a.update(weights=a["weights"][:2])),
    ("fused_hypercolumn", "weights", lambda a: a.update(weights=[a["weights"][0][..., :1]] + a["weights"][1:])),
    ("fused_hypercolumn", "weights", lambda a: a.update(weights=[w[:, :3] for w in a["weights"]])),
    ("fused_hypercolumn", "bias", lambda a: a.update(bias=torch.zeros(1, 4, 3))),
    ("fused_hypercolumn", "labels", lambda a: a.update(labels=torch.zeros(a["boxes"].shape[0]))),
    ("fused_hypercolumn", "labels", lambda a: a.update(weights=[torch.cat([w, w]) for w in a["weights"]])),
    ("fused_hypercolumn", "orders", lambda a: a.update(orders=[0, 1])),
    ("fused_hypercolumn", "orders", lambda a: a.update(orders=[0, 2, 0])),
    ("fused_hypercolumn", "activation", lambda a: a.update(activation=3)),
    ("fused_hypercolumn", "output_height", lambda a: a.update(output_height=0)),
]


@pytest.mark.parametrize("op,name,change", BAD_ARGUMENTS, ids=[f"{o}-{n}-{i}" for i, (o, n, _) in
                                                                  enumerate(BAD_ARGUMENTS)])
def test_kernels_check_arguments(op, name, change):
    args = compiled_args(op)
    change(args)
    with pytest.raises(RuntimeError, match=name):
        getattr(torch.ops.hypercolumn_ops, op)(*args.values())


def test_error_messages_are_whole():
    """A message with numbers in it comes out whole. An extension that carries its own static copy
    of the C++ runtime (a compiler set to link libstdc++ statically) formats numbers with stream
    state that is not torch's: the message stops at the first number, or the process crashes."""
    f = features(torch.float32, "cpu", "contiguous", torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match=r"points: expected shape \(rows, 3\), got \[4, 2\]"):
        torch.ops.hypercolumn_ops.sparse_hypercolumn(f, torch.zeros(4, 2), [], [0.5] * 3, 0)


def test_fused_points_requires_locations_for_several_cells():
    g = torch.Generator().manual_seed(0)
    f = features(torch.float32, "cpu", "contiguous", g)
    w = [x.unsqueeze(0) for x in classifier(2, 1, None, torch.float32, "cpu", g)]
    with pytest.raises(RuntimeError, match="locations"):
        torch.ops.hypercolumn_ops.fused_hypercolumn_points(f, points(3, torch.float32, "cpu", g), None, w, None, None,
                                                           [], [0.5] * 3, 0, 0, [0, 0, 0])


def test_double_backward_raises():
    check_double_backward_raises("native", "cpu")


def test_index_values_valid():
    check_index_values_valid(torch.ops.hypercolumn_ops, "cpu")


@pytest.mark.parametrize("seed", random_seeds(200))
@pytest.mark.slow
def test_random_cases_match_reference_float64(seed):
    check_random_case(torch.ops.hypercolumn_ops, seed, "cpu")


@pytest.mark.parametrize("seed", random_seeds(100))
@pytest.mark.slow
def test_malformed_direct_calls_raise_or_return(seed):
    check_malformed_calls(torch.ops.hypercolumn_ops, seed, "cpu")
