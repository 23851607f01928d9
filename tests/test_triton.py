"""The ``"triton"`` backend against the reference.

Runs on a CUDA device, or on the CPU under Triton's interpreter, which must be switched on before
triton is first imported: tests/conftest.py sets TRITON_INTERPRET=1 on machines without an NVIDIA
device, so a plain ``python -m pytest tests`` runs these tests everywhere.
"""

import os

import pytest
import torch

os.environ.setdefault("HYPERCOLUMN_OPS_POISON", "1")  # the backend reads it at each call

import cases  # noqa: E402
import hypercolumn_ops  # noqa: E402
from hypercolumn_ops import _validation  # noqa: E402
from hypercolumn_ops import ops as api  # noqa: E402
from hypercolumn_ops.planning import PROJECT_SCORES, SAMPLE_FEATURES  # noqa: E402
from kernel_checks import (GRAPH_CASES, check_bias_segments, check_cuda_graph,  # noqa: E402
                           check_double_backward_raises, check_empty_batch, check_random_case,
                           deterministic_algorithms, random_seeds)

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETING else "cpu"

pytestmark = pytest.mark.skipif(
    "triton" not in hypercolumn_ops.available_backends(DEVICE),
    reason="the triton backend needs a CUDA device, or TRITON_INTERPRET=1 set before triton is imported "
           "(run: TRITON_INTERPRET=1 python -m pytest tests/test_triton.py)")

# (dtype, rtol, atol). float64: the same formulas summed in another order (channel blocks,
# atomics), so only a few ulps of the O(10) sums differ. float32: the kernels and the reference
# both accumulate in float32, in different orders, over up to ~20 products of O(1) terms and
# up to ~100 contributions per pixel in gradients: ~1e-6 absolute, with margin.
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-5)}


def _case_ids(case_list):
    return [repr(c) for c in case_list]


def _triton_ops():
    """``torch.ops.hypercolumn_ops_triton``, which importing the backend registers (imported here,
    not at the top: without triton this module must still load, and its tests be skipped)."""
    from hypercolumn_ops import triton_backend  # noqa: F401

    return torch.ops.hypercolumn_ops_triton


ALL_CASES_64 = cases.all_cases(torch.float64, DEVICE, requires_grad=True)
ALL_CASES_32 = cases.all_cases(torch.float32, DEVICE, requires_grad=True)
FUSED_CASES_64 = [c for c in cases.fused_cases(torch.float64, DEVICE, requires_grad=True) if c.name != "empty"]


@pytest.mark.parametrize("case", ALL_CASES_64, ids=_case_ids(ALL_CASES_64))
@pytest.mark.slow
def test_float64_matches_reference(case):
    cases.assert_close_to_reference(case, "triton", *TOLERANCES[torch.float64])


@pytest.mark.parametrize("case", ALL_CASES_32, ids=_case_ids(ALL_CASES_32))
@pytest.mark.slow
def test_float32_matches_reference(case):
    cases.assert_close_to_reference(case, "triton", *TOLERANCES[torch.float32])


def _force_orders(monkeypatch, order):
    monkeypatch.setattr(_validation, "_orders", lambda features, *rest: [order] * len(features))


@pytest.mark.parametrize("order", [SAMPLE_FEATURES, PROJECT_SCORES], ids=["sample_features", "project_scores"])
@pytest.mark.parametrize("case", FUSED_CASES_64, ids=_case_ids(FUSED_CASES_64))
@pytest.mark.slow
def test_both_orders_match_reference(case, order, monkeypatch):
    _force_orders(monkeypatch, order)
    cases.assert_close_to_reference(case, "triton", *TOLERANCES[torch.float64])


def _pick(case_list, *names):
    return [c for c in case_list if any(repr(c) == n for n in names)]


DETERMINISM_CASES = _pick(
    ALL_CASES_32, "sparse_hypercolumn[border-image_size-channels_last]", "box_hypercolumn[zeros-spatial_scale-strided]",
    "fused_hypercolumn[K3-M1-NC4-biasNone-None-zeros-contiguous]",
    "fused_hypercolumn_points[K3-M4-NCNone-biascells-sigmoid-zeros-channels_last]")


@pytest.mark.parametrize("order", [SAMPLE_FEATURES, PROJECT_SCORES], ids=["sample_features", "project_scores"])
@pytest.mark.parametrize("case", DETERMINISM_CASES, ids=_case_ids(DETERMINISM_CASES))
@pytest.mark.slow
def test_deterministic_algorithms(case, order, monkeypatch):
    """Under torch.use_deterministic_algorithms the scatter runs per pixel in sorted order: it must
    agree with the reference, give bitwise-equal runs and never raise."""
    _force_orders(monkeypatch, order)
    torch.use_deterministic_algorithms(True)
    try:
        first = cases.outputs_and_grads(case, "triton")
        second = cases.outputs_and_grads(case, "triton")
    finally:
        torch.use_deterministic_algorithms(False)
    expected = cases.outputs_and_grads(case, "reference")
    rtol, atol = TOLERANCES[torch.float32]
    torch.testing.assert_close(first[0], expected[0], rtol=rtol, atol=atol, equal_nan=True)
    for grad, expected_grad in zip(first[1], expected[1]):
        torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=atol)
    assert torch.equal(first[0].nan_to_num(), second[0].nan_to_num())
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("enabled", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("order", [SAMPLE_FEATURES, PROJECT_SCORES], ids=["sample_features", "project_scores"])
@pytest.mark.slow
def test_bias_segments(order, enabled):
    with deterministic_algorithms(enabled):
        check_bias_segments(_triton_ops(), DEVICE, order)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    """Half inputs compute in float32 and round once at the end: compare with the reference run in
    float64 on the same (rounded) inputs; tolerance = a few half ulps of the O(1) outputs."""
    tolerance = {torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    for case in _pick(cases.all_cases(dtype, DEVICE), "sparse_hypercolumn[border-image_size-channels_last]",
                      "fused_hypercolumn[K3-M4-NCNone-biascells-sigmoid-zeros-channels_last]"):
        with hypercolumn_ops.use_backend("triton"):
            out = case()
        wide = cases.Case(case.op, _map_tensors(case.args, _widen), _map_tensors(case.kwargs, _widen), case.name)
        with hypercolumn_ops.use_backend("reference"):
            expected = wide()
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance, equal_nan=True)


def _widen(tensor):
    return tensor.double() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _map_tensors(value, fn):
    """``fn`` applied to every tensor inside nested lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def test_invalid_points_give_nan_without_reading_out_of_bounds():
    """Batch indices outside [0, B) or not integers, non-finite coordinates and labels outside
    [0, NC) (value checks off) give NaN rows; the other rows are unaffected."""
    f = cases.features(torch.float64, DEVICE)
    points = torch.tensor([[0, 3.0, 4.0], [2, 3.0, 4.0], [-1, 3.0, 4.0], [0.5, 3.0, 4.0],
                           [1, float("nan"), 4.0], [1, 3.0, float("inf")], [1, 5.0, 6.0]], dtype=torch.float64,
                          device=DEVICE)
    weights = cases.classifier(1, 2, 3, torch.float64, DEVICE)
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 7], device=DEVICE)
    with hypercolumn_ops.set_value_checks(False), hypercolumn_ops.use_backend("triton"):
        sampled = hypercolumn_ops.sparse_hypercolumn(f, points, image_size=cases.IMAGE)
        fused = hypercolumn_ops.fused_hypercolumn_points(f, points, weights, image_size=cases.IMAGE, labels=labels)
    assert torch.isfinite(sampled[0]).all() and torch.isfinite(sampled[6]).all()
    assert torch.isnan(sampled[1:6]).all()
    assert torch.isfinite(fused[0]).all()
    assert torch.isnan(fused[1:]).all()


def test_empty_batch_gives_nan():
    def triton(case):
        with hypercolumn_ops.use_backend("triton"):
            return case()

    check_empty_batch(DEVICE, triton)


def _normalised(case):
    return getattr(api, "normalise_" + case.op)(*case.args, **case.kwargs)


OPCHECK_CASES = _pick(
    cases.all_cases(torch.float64, DEVICE, requires_grad=True), "sparse_hypercolumn[zeros-image_size-strided]",
    "box_hypercolumn[box-list]", "fused_hypercolumn[K5-M1-NCNone-biasbox-None-border-strided]",
    "fused_hypercolumn_points[K3-M4-NCNone-biascells-sigmoid-zeros-channels_last]")


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=_case_ids(OPCHECK_CASES))
@pytest.mark.slow
def test_opcheck(case):
    op = getattr(_triton_ops(), case.op)
    torch.library.opcheck(op, _normalised(case))


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=_case_ids(OPCHECK_CASES))
@pytest.mark.slow
def test_gradcheck(case):
    """float64 gradcheck of the public operator on this backend (fast mode: random projections of
    the Jacobian, which the interpreter can afford). NaN outputs (points outside) are masked. On a
    GPU the backward sums with atomics in no fixed order, so two backward passes differ by float64
    rounding of sums of O(1) terms (~1e-15): nondet_tol allows that, far below a wrong gradient."""
    leaves = cases.differentiable_inputs(case)

    def call(*inputs):
        replace = dict(zip(map(id, leaves), inputs))
        args = _map_tensors(case.args, lambda t: replace.get(id(t), t))
        kwargs = _map_tensors(case.kwargs, lambda t: replace.get(id(t), t))
        with hypercolumn_ops.use_backend("triton"):
            out = cases.Case(case.op, args, kwargs, case.name)()
        return torch.where(torch.isfinite(out), out, torch.zeros_like(out))

    assert torch.autograd.gradcheck(call, leaves, fast_mode=True, nondet_tol=1e-10)


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=_case_ids(OPCHECK_CASES))
@pytest.mark.slow
def test_compile_fullgraph(case):
    """torch.compile(fullgraph=True) traces the public call and its backward with no graph break.
    The interpreter runs on CPU tensors, where aot_eager traces the same graph inductor would get."""
    backend = "aot_eager" if INTERPRETING else "inductor"
    tensors = cases.differentiable_inputs(case)

    def loss():
        out = case()
        return torch.where(torch.isfinite(out), out, torch.zeros_like(out)).square().sum()

    with hypercolumn_ops.use_backend("triton"):
        expected = loss()
        expected_grads = torch.autograd.grad(expected, tensors)
        torch._dynamo.reset()
        compiled = torch.compile(loss, fullgraph=True, backend=backend)
        value = compiled()
        grads = torch.autograd.grad(value, tensors)
    torch.testing.assert_close(value, expected)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_double_backward_raises():
    check_double_backward_raises("triton", DEVICE)


@pytest.mark.needs_cuda
@pytest.mark.skipif(INTERPRETING, reason="a CUDA graph needs the compiled kernels, not the interpreter")
@pytest.mark.parametrize("enabled", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("op", list(GRAPH_CASES))
def test_cuda_graph(op, enabled):
    with deterministic_algorithms(enabled):
        check_cuda_graph("triton", op)


# Fewer and smaller than the compiled backends' random cases: the interpreter takes seconds per
# case, and on a GPU each new shape may compile new kernel variants.
@pytest.mark.parametrize("seed", random_seeds(12))
@pytest.mark.slow
def test_random_cases_match_reference(seed):
    check_random_case(_triton_ops(), seed, DEVICE, max_values=2000, max_rows=12)


# ----------------------------------------------------------------------------- sampling options
#
# sampling_ratio, aligned and padding="zeros_per_tap" against the reference in float64 (forward and
# the gradients of every input), both evaluation orders and deterministic mode. Two layers at
# spatial scales 1/2 and 1/4 of a 20 x 24 image, so that box extents in feature pixels are exact and
# adaptive counts (ceil(extent / cells)) are tested at their jumps.

SAMPLING_SHAPES = ((3, 10, 12), (2, 5, 6))
SAMPLING_SCALES = [0.5, 0.25]
# (sampling_ratio, aligned, padding): fixed and adaptive counts, both alignments, every padding.
SAMPLING_OPTIONS = [(2, True, "zeros"), (3, False, "border"), (0, True, "zeros_per_tap"), (-1, False, "zeros"),
                    (1, False, "zeros_per_tap")]


def _option_id(option):
    sampling_ratio, aligned, padding = option
    return f"ratio{sampling_ratio}-{'aligned' if aligned else 'unaligned'}-{padding}"


def _sampling_boxes(dtype=torch.float64):
    """Boxes ``(R, 5)`` on a 3 x 4 grid: extents of exactly 2 x 2 samples per cell on the finest
    layer, more than 2 (ceil of 2.75), across the border, wholly outside, reversed, empty, and
    narrower than a feature pixel (which aligned=False widens to one)."""
    return torch.tensor([[0, 2.0, 1.0, 18.0, 13.0],  # 8 x 6 feature pixels on layer 0: 2 x 2 per cell
                         [1, 1.0, 0.5, 23.0, 17.5],  # 11 x 8.5: 3 x 3 per cell
                         [1, -5.0, -3.0, 6.0, 5.0],
                         [0, -30.0, -25.0, -12.0, -3.0],
                         [0, 15.0, 12.0, 3.0, 2.0],
                         [1, 7.0, 7.0, 7.0, 7.0],
                         [0, 9.2, 4.1, 10.4, 4.5]], dtype=dtype, device=DEVICE)


def _sampling_case(op, option, dtype=torch.float64, boxes=None, seed=0):
    sampling_ratio, aligned, padding = option
    g = torch.Generator().manual_seed(seed)
    f = cases.features(dtype, DEVICE, "channels_last", g, requires_grad=True, shapes=SAMPLING_SHAPES)
    boxes = _sampling_boxes() if boxes is None else boxes
    kwargs = dict(spatial_scale=SAMPLING_SCALES, padding=padding, sampling_ratio=sampling_ratio, aligned=aligned)
    if op == "box_hypercolumn":
        return cases.Case(op, (f, boxes, (3, 4)), kwargs, _option_id(option))
    w = cases.classifier(2, 2, 3, dtype, DEVICE, g, requires_grad=True, shapes=SAMPLING_SHAPES)
    bias = torch.randn(3, 4, 2, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE).requires_grad_()
    labels = torch.randint(0, 3, (boxes.shape[0],), generator=g).to(DEVICE)
    return cases.Case(op, (f, boxes, w, bias), dict(output_size=(3, 4), labels=labels, activation="sigmoid", **kwargs),
                      _option_id(option))


@pytest.mark.parametrize("option", SAMPLING_OPTIONS, ids=_option_id)
def test_box_hypercolumn_sampling_options_match_reference(option):
    cases.assert_close_to_reference(_sampling_case("box_hypercolumn", option), "triton", *TOLERANCES[torch.float64])


@pytest.mark.parametrize("order", [SAMPLE_FEATURES, PROJECT_SCORES], ids=["sample_features", "project_scores"])
@pytest.mark.parametrize("option", SAMPLING_OPTIONS, ids=_option_id)
@pytest.mark.slow
def test_fused_hypercolumn_sampling_options_match_reference(option, order, monkeypatch):
    """Class-specific K = 2 classifiers, a class bias and sigmoid (whose backward resamples the
    scores), every sampling option, each evaluation order."""
    _force_orders(monkeypatch, order)
    cases.assert_close_to_reference(_sampling_case("fused_hypercolumn", option), "triton", *TOLERANCES[torch.float64])


@pytest.mark.parametrize("option", [(2, True, "zeros"), (0, False, "zeros_per_tap")], ids=_option_id)
def test_fused_hypercolumn_sampling_in_the_quick_tier(option, monkeypatch):
    """The quick tier's share of the sweep above: fixed and adaptive sampling, project-scores
    order (whose score maps are sampled per sub-sample) for one, sample-features for the other."""
    _force_orders(monkeypatch, PROJECT_SCORES if option[0] > 0 else SAMPLE_FEATURES)
    cases.assert_close_to_reference(_sampling_case("fused_hypercolumn", option), "triton", *TOLERANCES[torch.float64])


@pytest.mark.parametrize("op", ["box_hypercolumn", "fused_hypercolumn"])
@pytest.mark.parametrize("option", [(2, True, "zeros"), (-1, False, "zeros_per_tap")], ids=_option_id)
@pytest.mark.slow
def test_sampling_options_deterministic(op, option, monkeypatch):
    """Deterministic mode with S = 4 (fixed) and adaptive samples a point: the tap entries of every
    sample sorted per pixel; bitwise-equal runs, each order, equal to the reference."""
    for order in ((SAMPLE_FEATURES, PROJECT_SCORES) if op.startswith("fused") else (None,)):
        if order is not None:
            _force_orders(monkeypatch, order)
        case = _sampling_case(op, option)
        with deterministic_algorithms(True):
            first = cases.outputs_and_grads(case, "triton")
            second = cases.outputs_and_grads(case, "triton")
        expected = cases.outputs_and_grads(case, "reference")
        rtol, atol = TOLERANCES[torch.float64]
        torch.testing.assert_close(first[0], expected[0], rtol=rtol, atol=atol, equal_nan=True)
        for grad, expected_grad in zip(first[1], expected[1]):
            torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=atol)
        assert torch.equal(first[0].nan_to_num(), second[0].nan_to_num())
        for a, b in zip(first[1], second[1]):
            assert torch.equal(a, b)


def _zeros_per_tap_points():
    """Points ``(N, 3)`` on the 20 x 24 image of the sampling layers: inside, on the borders,
    within the last feature pixel outside (where zeros_per_tap fades to 0 and zeros does not),
    far outside, and far enough that ``x * scale`` alone is large."""
    return torch.tensor([[0, 5.0, 7.0], [1, 0.0, 0.0], [0, 24.0, 20.0], [1, -0.7, 9.0], [0, 24.9, 3.0],
                         [1, 11.0, -1.3], [0, 6.0, 21.5], [1, -40.0, 3.0], [0, 1e30, -1e30], [1, 23.2, 19.6]],
                        dtype=torch.float64, device=DEVICE)


def _zeros_per_tap_cases():
    g = torch.Generator().manual_seed(4)
    f = cases.features(torch.float64, DEVICE, "strided", g, requires_grad=True, shapes=SAMPLING_SHAPES)
    w = cases.classifier(3, 2, None, torch.float64, DEVICE, g, requires_grad=True, shapes=SAMPLING_SHAPES)
    points = _zeros_per_tap_points()
    locations = torch.rand(points.shape[0], 2, generator=g, dtype=torch.float64).to(DEVICE)
    common = dict(spatial_scale=SAMPLING_SCALES, padding="zeros_per_tap")
    return [cases.Case("sparse_hypercolumn", (f, points), common, "zeros_per_tap"),
            cases.Case("box_hypercolumn", (f, _sampling_boxes(), (3, 4)), common, "zeros_per_tap"),
            cases.Case("fused_hypercolumn", (f, _sampling_boxes(), w), dict(output_size=(3, 4), **common),
                       "zeros_per_tap"),
            cases.Case("fused_hypercolumn_points", (f, points, w), dict(locations=locations, **common),
                       "zeros_per_tap")]


@pytest.mark.parametrize("case", _zeros_per_tap_cases(), ids=_case_ids(_zeros_per_tap_cases()))
def test_zeros_per_tap_matches_reference(case, monkeypatch):
    """padding="zeros_per_tap" (grid_sample's zeros) on the four operators with the default
    sampling: forward and gradients against the reference, a fused operator in each order."""
    for order in ((SAMPLE_FEATURES, PROJECT_SCORES) if case.op.startswith("fused") else (None,)):
        if order is not None:
            _force_orders(monkeypatch, order)
        cases.assert_close_to_reference(case, "triton", *TOLERANCES[torch.float64])


@pytest.mark.parametrize("option", [(0, True, "zeros"), (2, False, "zeros_per_tap")], ids=_option_id)
def test_sampling_options_on_empty_inputs(option):
    """No boxes (adaptive sampling then has no count to read back), and a batch of no images
    (every box invalid: NaN outputs, zero gradients), forward and backward."""
    for op in ("box_hypercolumn", "fused_hypercolumn"):
        case = _sampling_case(op, option, boxes=_sampling_boxes()[:0])
        cases.assert_close_to_reference(case, "triton", *TOLERANCES[torch.float64])
        out, grads = cases.outputs_and_grads(case, "triton")
        assert out.shape[0] == 0 and all(not grad.any() for grad in grads)
    sampling_ratio, aligned, padding = option
    g = torch.Generator().manual_seed(1)
    f = cases.features(torch.float64, DEVICE, "contiguous", g, requires_grad=True, shapes=SAMPLING_SHAPES, batch=0)
    w = cases.classifier(2, 1, None, torch.float64, DEVICE, g, requires_grad=True, shapes=SAMPLING_SHAPES)
    options = dict(spatial_scale=SAMPLING_SCALES, padding=padding, sampling_ratio=sampling_ratio, aligned=aligned)
    with hypercolumn_ops.set_value_checks(False):
        for case in (cases.Case("box_hypercolumn", (f, _sampling_boxes(), (3, 4)), options),
                     cases.Case("fused_hypercolumn", (f, _sampling_boxes(), w), dict(output_size=(3, 4), **options))):
            out, grads = cases.outputs_and_grads(case, "triton")
            assert out.shape[0] == len(_sampling_boxes()) and torch.isnan(out).all(), case.op
            assert all(not grad.any() for grad in grads), case.op


@pytest.mark.parametrize("padding", ["border", "zeros", "zeros_per_tap"])
# The interpreter computes with numpy, which warns of the overflows this test makes on purpose.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_overflowing_coordinates_float32(padding):
    """float32 rows: a box whose corners are finite but whose extent overflows is invalid (NaN);
    a finite coordinate whose feature coordinate (times the scale) overflows is a far point and
    clamps or reads 0, never NaN; as the reference."""
    g = torch.Generator().manual_seed(2)
    f = cases.features(torch.float32, DEVICE, "contiguous", g, requires_grad=True, shapes=SAMPLING_SHAPES)
    boxes = torch.tensor([[0, -2e38, 1.0, 2e38, 9.0], [1, 1.0, -3e38, 5.0, 3e38], [0, 2e38, 3.0, 3e38, 8.0],
                          [1, 2.0, 1.0, 18.0, 13.0]], dtype=torch.float32, device=DEVICE)
    points = torch.tensor([[0, 3e38, 5.0], [1, 4.0, -3e38], [0, 5.0, 7.0]], dtype=torch.float32, device=DEVICE)
    # Outputs are float32 sums of a few O(1) products, in another order than the reference's.
    rtol, atol = TOLERANCES[torch.float32]
    scale = [8.0, 4.0]  # 3e38 times these overflows float32
    for sampling_ratio in (1, 2):
        case = cases.Case("box_hypercolumn", (f, boxes, (3, 4)),
                          dict(spatial_scale=scale, padding=padding, sampling_ratio=sampling_ratio))
        cases.assert_close_to_reference(case, "triton", rtol, atol)
        with hypercolumn_ops.use_backend("triton"):
            out = case()
        assert torch.isnan(out[:2]).all() and torch.isfinite(out[2:]).all()
    case = cases.Case("sparse_hypercolumn", (f, points), dict(spatial_scale=scale, padding=padding))
    cases.assert_close_to_reference(case, "triton", rtol, atol)
    with hypercolumn_ops.use_backend("triton"):
        assert torch.isfinite(case()).all()


def test_only_adaptive_sampling_reads_counts_back(monkeypatch):
    """The backward passes size their tap entries without reading the device, except with
    adaptive sampling, which reads the largest count of each layer once (a synchronisation on a
    GPU). Counted through the Tensor methods that read values to Python; value checks off, as on
    a GPU by default."""
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        method = getattr(torch.Tensor, name)

        def counting(self, *args, _method=method, _name=name, **kwargs):
            reads.append(_name)
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    with hypercolumn_ops.set_value_checks(False):
        for sampling_ratio, aligned, expected in ((1, True, 0), (2, True, 0), (1, False, 0), (0, True, 1)):
            reads.clear()
            case = _sampling_case("box_hypercolumn", (sampling_ratio, aligned, "zeros"), seed=3)
            cases.outputs_and_grads(case, "triton")
            assert len(reads) == expected, (sampling_ratio, aligned, reads)
