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
def test_float64_matches_reference(case):
    cases.assert_close_to_reference(case, "triton", *TOLERANCES[torch.float64])


@pytest.mark.parametrize("case", ALL_CASES_32, ids=_case_ids(ALL_CASES_32))
def test_float32_matches_reference(case):
    cases.assert_close_to_reference(case, "triton", *TOLERANCES[torch.float32])


def _force_orders(monkeypatch, order):
    monkeypatch.setattr(api, "_orders", lambda features, *rest: [order] * len(features))


@pytest.mark.parametrize("order", [SAMPLE_FEATURES, PROJECT_SCORES], ids=["sample_features", "project_scores"])
@pytest.mark.parametrize("case", FUSED_CASES_64, ids=_case_ids(FUSED_CASES_64))
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
    api.set_value_checks(False)
    try:
        with hypercolumn_ops.use_backend("triton"):
            sampled = hypercolumn_ops.sparse_hypercolumn(f, points, image_size=cases.IMAGE)
            fused = hypercolumn_ops.fused_hypercolumn_points(f, points, weights, image_size=cases.IMAGE,
                                                             labels=labels)
    finally:
        api.set_value_checks(True)
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
def test_opcheck(case):
    op = getattr(_triton_ops(), case.op)
    torch.library.opcheck(op, _normalised(case))


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=_case_ids(OPCHECK_CASES))
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
def test_random_cases_match_reference(seed):
    check_random_case(_triton_ops(), seed, DEVICE, max_values=2000, max_rows=12)
