"""The CUDA kernels of the ``"native"`` backend against the reference.

Every case of ``cases.py`` in float64 (forward and gradients), the fused operators with each
evaluation order forced, gradcheck, opcheck, ``torch.compile(fullgraph=True)``, bitwise
reproducibility under ``torch.use_deterministic_algorithms(True)``, reduced precision, and rows
with an invalid batch index, label or coordinate. Skipped where no CUDA device is visible.
"""

import functools

import pytest
import torch

import hypercolumn_ops
from hypercolumn_ops import ops as public
from hypercolumn_ops import reference

import cases

pytestmark = pytest.mark.needs_cuda

# Case lists are built lazily (CUDA tensors cannot be made at collection time without a GPU);
# the CPU list gives the ids, both lists come from the same seed and order.
CASE_IDS = [repr(c) for c in cases.all_cases(torch.float64, "cpu")]
FUSED_IDS = [i for i, name in enumerate(CASE_IDS) if name.startswith("fused")]

# float64 kernels differ from the float64 reference only in the order of their sums (atomics,
# warp reductions, cuBLAS for projected layers): ~1e-15 relative, 1e-9 leaves room for cancellation.
RTOL64, ATOL64 = 1e-9, 1e-9


@functools.lru_cache(maxsize=None)
def cuda_cases(dtype):
    return cases.all_cases(dtype, "cuda", requires_grad=True)


@pytest.fixture(autouse=True)
def native_cuda_built():
    assert "native" in hypercolumn_ops.available_backends("cuda"), (
        "the extension was built without its CUDA kernels (build with FORCE_CUDA=1)")


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def forward_and_grads(run, inputs, probe=None):
    """Output of ``run()`` and the gradients of a fixed random projection (``probe``, random by
    default) of its finite part."""
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


def normalised_args(case):
    return list(getattr(public, "normalise_" + case.op)(*case.args, **case.kwargs))


def run_in_order(case, module, order):
    """The case's fused operator through ``module`` with every layer in ``order``."""
    # Normalised afresh each time: it picks class bias rows, a step of the autograd graph.
    args = normalised_args(case)
    args[-1] = [order] * len(args[0])
    return getattr(module, case.op)(*args)


def leaf(value):
    """Tensors (also inside lists) as fresh autograd leaves, so that a test may run backward often."""
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(leaf(v) for v in value)
    return value


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_matches_reference_float64(index):
    cases.assert_close_to_reference(cuda_cases(torch.float64)[index], "native", RTOL64, ATOL64)


@pytest.mark.parametrize("order", [0, 1], ids=["sample_features", "project_scores"])
@pytest.mark.parametrize("index", FUSED_IDS, ids=[CASE_IDS[i] for i in FUSED_IDS])
def test_fused_orders_match_reference(index, order):
    case = cuda_cases(torch.float64)[index]
    inputs = cases.differentiable_inputs(case)
    native = forward_and_grads(lambda: run_in_order(case, torch.ops.hypercolumn_ops, order), inputs)
    expected = forward_and_grads(lambda: run_in_order(case, reference, order), inputs)
    assert_all_close(native, expected, RTOL64, ATOL64, f"{case} order {order}")


@pytest.mark.parametrize("order", [0, 1], ids=["sample_features", "project_scores"])
@pytest.mark.parametrize("index", FUSED_IDS, ids=[CASE_IDS[i] for i in FUSED_IDS])
def test_fused_orders_deterministic(index, order):
    # Each order's deterministic scatter (sorted per-pixel segments; order 1 keeps cuBLAS, which the
    # package's CUBLAS_WORKSPACE_CONFIG makes reproducible): the reference's values, the same bits twice.
    case64, case32 = cuda_cases(torch.float64)[index], cuda_cases(torch.float32)[index]
    inputs64, inputs32 = cases.differentiable_inputs(case64), cases.differentiable_inputs(case32)
    expected = forward_and_grads(lambda: run_in_order(case64, reference, order), inputs64)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        native = forward_and_grads(lambda: run_in_order(case64, torch.ops.hypercolumn_ops, order), inputs64)
        first = forward_and_grads(lambda: run_in_order(case32, torch.ops.hypercolumn_ops, order), inputs32)
        second = forward_and_grads(lambda: run_in_order(case32, torch.ops.hypercolumn_ops, order), inputs32)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert_all_close(native, expected, RTOL64, ATOL64, f"{case64} order {order}, deterministic")
    assert_all_close(second, first, 0.0, 0.0, f"{case32} order {order}, run to run")


def test_deterministic_without_cublas_config(monkeypatch, deterministic):
    # Without a reproducible cuBLAS configuration the kernels fall back to order 0 (exact too)
    # instead of raising.
    case = cuda_cases(torch.float64)[FUSED_IDS[0]]
    inputs = cases.differentiable_inputs(case)
    torch.use_deterministic_algorithms(False)
    expected = forward_and_grads(lambda: run_in_order(case, reference, 1), inputs)
    torch.use_deterministic_algorithms(True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    native = forward_and_grads(lambda: run_in_order(case, torch.ops.hypercolumn_ops, 1), inputs)
    assert_all_close(native, expected, RTOL64, ATOL64, f"{case} without CUBLAS_WORKSPACE_CONFIG")


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_gradcheck(index):
    case = cuda_cases(torch.float64)[index]
    inputs = cases.differentiable_inputs(case)
    with hypercolumn_ops.use_backend("native"):
        # gradcheck perturbs the inputs in place, so the case can call itself; backward sums with
        # atomics, so two backward passes differ by float64 rounding (nondet_tol).
        assert torch.autograd.gradcheck(lambda *_: case(), inputs, fast_mode=True, nondet_tol=1e-10)


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_opcheck(index):
    case = cuda_cases(torch.float64)[index]
    args = tuple(leaf(a) for a in normalised_args(case))
    torch.library.opcheck(getattr(torch.ops.hypercolumn_ops, case.op).default, args)


@pytest.mark.parametrize("op", ["sparse_hypercolumn", "box_hypercolumn", "fused_hypercolumn",
                                "fused_hypercolumn_points"])
def test_compile_fullgraph(op):
    torch._dynamo.reset()
    case = next(c for c in cuda_cases(torch.float64) if c.op == op and c.name != "empty")
    inputs = cases.differentiable_inputs(case)
    compiled = torch.compile(lambda *args: getattr(hypercolumn_ops, op)(*args, **case.kwargs), fullgraph=True)
    with hypercolumn_ops.use_backend("native"):
        actual = forward_and_grads(lambda: compiled(*case.args), inputs)
        eager = forward_and_grads(case, inputs)
    assert_all_close(actual, eager, RTOL64, ATOL64, f"{case} compiled")


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_deterministic_mode(index, deterministic):
    # The deterministic kernels are their own code path: check them against the reference too.
    cases.assert_close_to_reference(cuda_cases(torch.float64)[index], "native", RTOL64, ATOL64)
    case = cuda_cases(torch.float32)[index]
    inputs = cases.differentiable_inputs(case)
    with hypercolumn_ops.use_backend("native"):
        first = forward_and_grads(case, inputs)
        second = forward_and_grads(case, inputs)
    assert_all_close(second, first, 0.0, 0.0, f"{case} run to run")


# Why each tolerance: outputs round once to the dtype (float16: 2^-11, bfloat16: 2^-8 relative);
# feature gradients are summed in float32 and rounded once, but projected score maps and their
# gradients are stored in the features' dtype and go through a matrix product over up to C_l terms
# of O(1) there. float32 differs only in summation order.
LOW_PRECISION = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-1),
    torch.bfloat16: (1e-1, 5e-1),
}


@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_low_precision(index, dtype):
    rtol, atol = LOW_PRECISION[dtype]
    cases.assert_close_to_reference(cuda_cases(dtype)[index], "native", rtol, atol)


def test_invalid_rows_give_nan_and_no_gradient():
    # Rows with a batch index out of range, a non-integer one, a NaN or infinite coordinate, or a
    # label out of range: NaN outputs, and the other rows' outputs and gradients are those of a
    # call without the bad rows.
    g = torch.Generator().manual_seed(3)
    f = cases.features(torch.float64, "cuda", "channels_last", g, requires_grad=True)
    w = cases.classifier(3, 2, 4, torch.float64, "cuda", g, requires_grad=True)
    good = cases.points(5, torch.float64, "cuda", g)
    bad = torch.tensor([[2.0, 3.0, 4.0], [0.5, 3.0, 4.0], [0.0, float("nan"), 4.0], [1.0, 3.0, float("inf")],
                        [-1.0, 1.0, 1.0]], dtype=torch.float64, device="cuda")
    points = torch.cat([good, bad, good[:1]])
    valid_point = torch.tensor([True] * len(good) + [False] * len(bad) + [True], device="cuda")
    labels = torch.randint(0, 4, (len(points),), generator=g).to("cuda")
    labels[-1] = 7  # an invalid label on an otherwise good row
    valid_label = labels < 4
    locations = torch.rand(len(points), 2, generator=g, dtype=torch.float64).to("cuda")
    inputs = list(f) + list(w)
    hypercolumn_ops.set_value_checks(False)
    try:
        with hypercolumn_ops.use_backend("native"):
            for op, kwargs, keep in (
                    ("sparse_hypercolumn", {}, valid_point),
                    ("fused_hypercolumn_points", {"labels": labels, "locations": locations}, valid_point & valid_label)):
                def run(rows):
                    extra = {k: v[rows] for k, v in kwargs.items()}
                    args = (f, points[rows]) if op == "sparse_hypercolumn" else (f, points[rows], w)
                    return getattr(hypercolumn_ops, op)(*args, image_size=cases.IMAGE, **extra)

                everything = forward_and_grads(lambda: run(torch.ones_like(keep)), inputs)
                assert torch.isnan(everything[0][~keep]).all(), op
                probe = torch.randn(everything[0].shape, generator=g, dtype=torch.float64)
                everything = forward_and_grads(lambda: run(torch.ones_like(keep)), inputs, probe)
                subset = forward_and_grads(lambda: run(keep), inputs, probe[keep.cpu()])
                torch.testing.assert_close(everything[0][keep], subset[0], rtol=RTOL64, atol=ATOL64)
                for a, b in zip(everything[1], subset[1]):
                    torch.testing.assert_close(a, b, rtol=RTOL64, atol=ATOL64)
    finally:
        hypercolumn_ops.set_value_checks(True)


def test_bad_arguments_name_the_argument():
    f = cases.features(torch.float32, "cuda")
    ops = torch.ops.hypercolumn_ops
    with pytest.raises(RuntimeError, match="points"):
        ops.sparse_hypercolumn(f, torch.zeros(4, 2, device="cuda"), [1.0] * 3, [1.0] * 3, 0)
    with pytest.raises(RuntimeError, match="boxes"):
        ops.box_hypercolumn(f, torch.zeros(4, 4, device="cuda"), 2, 2, [1.0] * 3, [1.0] * 3, 0)
    with pytest.raises(RuntimeError, match="padding"):
        ops.sparse_hypercolumn(f, torch.zeros(4, 3, device="cuda"), [1.0] * 3, [1.0] * 3, 2)
    weights = [torch.zeros(1, 4, 2, c, device="cuda") for c in (3, 5, 7)]
    with pytest.raises(RuntimeError, match="locations"):
        ops.fused_hypercolumn_points(f, torch.zeros(4, 3, device="cuda"), None, weights, None, None, [1.0] * 3,
                                     [1.0] * 3, 0, 0, [0] * 3)
    with pytest.raises(RuntimeError, match=r"weights\[1\]"):
        ops.fused_hypercolumn(f, torch.zeros(4, 5, device="cuda"), [weights[0], weights[0], weights[2]], None, None,
                              2, 2, [1.0] * 3, [1.0] * 3, 0, 0, [0] * 3)


@pytest.mark.parametrize("dtype", [torch.float64] + list(LOW_PRECISION), ids=str)
def test_wide_channels_last_loads(dtype):
    # Channel counts that are multiples of every vector width (16 bytes: 2 float64 ... 8 float16), so
    # the sampling kernels take their wide-load path, which the odd channel counts of cases.py skip.
    g = torch.Generator().manual_seed(5)
    shapes = ((8, 10, 12), (16, 5, 6), (24, 3, 3))
    f = cases.features(dtype, "cuda", "channels_last", g, requires_grad=True, shapes=shapes)
    rtol, atol = (RTOL64, ATOL64) if dtype == torch.float64 else LOW_PRECISION[dtype]
    for case in (cases.Case("sparse_hypercolumn", (f, cases.points(40, torch.float32, "cuda", g)),
                            {"image_size": cases.IMAGE}, "wide"),
                 cases.Case("box_hypercolumn", (f, cases.boxes(6, torch.float32, "cuda", g), (5, 4)),
                            {"image_size": cases.IMAGE, "padding": "zeros"}, "wide")):
        cases.assert_close_to_reference(case, "native", rtol, atol)
