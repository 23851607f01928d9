"""The CUDA kernels of ``csrc/cuda/`` run on the CPU (``cuda_emulation/``), against the reference.

No GPU runs in CI, so this is where the CUDA kernels' logic is checked on every change: indexing,
strides, shared memory and barriers, the atomic and the deterministic (sorted-segment) backward,
both evaluation orders of the fused operators, invalid rows. Each block's threads run as real
threads, interleaving arbitrarily. Speed, the GPU's memory model and launch limits are only seen on
a GPU (tests/test_native_cuda.py, benchmarks/gpu_check.sh).
"""

import os
import sys

import pytest
import torch

import cases
from hypercolumn_ops import _native
from hypercolumn_ops import ops as public
from hypercolumn_ops import reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation"))
import build  # noqa: E402


class _Emulated:
    """``torch.ops.hypercolumn_ops_cuda_emulated``, built on first use (a run that deselects these
    tests, such as ``pytest -m needs_cuda`` on a GPU machine, does not compile it)."""

    namespace = None

    def __getattr__(self, name):
        if _Emulated.namespace is None:
            build.build()
            _native.register_fake_and_autograd(build.NAMESPACE)
            _Emulated.namespace = getattr(torch.ops, build.NAMESPACE)
        return getattr(_Emulated.namespace, name)


EMULATED = _Emulated()

# float64: the kernels differ from the reference only in the order of their sums (atomics,
# warp reductions, matrix products): ~1e-15 relative, 1e-9 leaves room for cancellation.
RTOL64, ATOL64 = 1e-9, 1e-9

CASES = cases.all_cases(torch.float64, "cpu", requires_grad=True)
RUNS = [(index, order) for index, case in enumerate(CASES)
        for order in ((0, 1) if case.op.startswith("fused") else (None,))]
RUN_IDS = [f"{CASES[index]!r}" + ("" if order is None else f"-order{order}") for index, order in RUNS]


def call(case, module, order):
    # Normalised afresh each time: it picks class bias rows, a step of the autograd graph.
    args = list(getattr(public, "normalise_" + case.op)(*case.args, **case.kwargs))
    if order is not None:
        args[-1] = [order] * len(args[0])
    return getattr(module, case.op)(*args)


def forward_and_grads(run, inputs):
    out = run()
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype)
    loss = (torch.where(torch.isfinite(out), out, torch.zeros_like(out)) * probe).sum()
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def assert_same(actual, expected, rtol, atol, what):
    torch.testing.assert_close(actual[0], expected[0], rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what} forward: {m}")
    for index, (g, ref) in enumerate(zip(actual[1], expected[1])):
        torch.testing.assert_close(g, ref, rtol=rtol, atol=atol, msg=lambda m: f"{what} grad {index}: {m}")


@pytest.fixture(params=[False, True], ids=["atomic", "deterministic"])
def deterministic(request):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("index,order", RUNS, ids=RUN_IDS)
def test_emulated_cuda_kernels_match_reference(index, order, deterministic):
    case = CASES[index]
    inputs = cases.differentiable_inputs(case)
    emulated = forward_and_grads(lambda: call(case, EMULATED, order), inputs)
    expected = forward_and_grads(lambda: call(case, reference, order), inputs)
    assert_same(emulated, expected, RTOL64, ATOL64, f"{case} order {order}")
    if deterministic:
        # No atomics in deterministic mode: the same bits again, whatever the threads' interleaving.
        assert_same(forward_and_grads(lambda: call(case, EMULATED, order), inputs), emulated, 0.0, 0.0,
                    f"{case} order {order} run to run")


# Why each tolerance: outputs round once to the dtype (float16: 2^-11, bfloat16: 2^-8 relative);
# feature gradients are summed in float32 and rounded once, but projected score maps and their
# gradients are stored in the features' dtype and go through a matrix product over up to C_l terms
# of O(1) there. float32 differs only in summation order. (tests/test_native_cuda.py, the same.)
LOW_PRECISION = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-1), torch.bfloat16: (1e-1, 5e-1)}


@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize("index,order", RUNS, ids=RUN_IDS)
def test_emulated_cuda_kernels_low_precision(index, order, dtype):
    # The reduced-precision instantiations (16-byte loads where channels_last allows them), against
    # the reference in the same dtype, as tests/test_native_cuda.py::test_low_precision on a GPU.
    case = cases.all_cases(dtype, "cpu", requires_grad=True)[index]
    inputs = cases.differentiable_inputs(case)
    emulated = forward_and_grads(lambda: call(case, EMULATED, order), inputs)
    expected = forward_and_grads(lambda: call(case, reference, order), inputs)
    assert_same(emulated, expected, *LOW_PRECISION[dtype], f"{case} order {order} {dtype}")


@pytest.mark.parametrize("order", [0, 1], ids=["sample_features", "project_scores"])
def test_emulated_invalid_rows_give_nan_and_no_gradient(order, deterministic):
    # Rows with a batch index out of range, a non-integer one, a NaN or infinite coordinate, or a
    # label out of range: NaN outputs, and the other rows' outputs and gradients are those of a
    # call without the bad rows.
    g = torch.Generator().manual_seed(3)
    f = cases.features(torch.float64, "cpu", "channels_last", g, requires_grad=True)
    w = cases.classifier(3, 2, 4, torch.float64, "cpu", g, requires_grad=True)
    good = cases.points(5, torch.float64, "cpu", g)
    bad = torch.tensor([[2.0, 3.0, 4.0], [0.5, 3.0, 4.0], [0.0, float("nan"), 4.0], [1.0, 3.0, float("inf")],
                        [-1.0, 1.0, 1.0]], dtype=torch.float64)
    points = torch.cat([good, bad, good[:1]])
    valid_point = torch.tensor([True] * len(good) + [False] * len(bad) + [True])
    labels = torch.randint(0, 4, (len(points),), generator=g)
    labels[-1] = 7  # an invalid label on an otherwise good row
    locations = torch.rand(len(points), 2, generator=g, dtype=torch.float64)
    inputs = list(f) + list(w)
    public.set_value_checks(False)
    try:
        for op, kwargs, keep, run_order in (
                ("sparse_hypercolumn", {}, valid_point, None),
                ("fused_hypercolumn_points", {"labels": labels, "locations": locations}, valid_point & (labels < 4),
                 order)):
            def run(rows):
                args = (f, points[rows]) if op == "sparse_hypercolumn" else (f, points[rows], w)
                extra = {k: v[rows] for k, v in kwargs.items()}
                return call(cases.Case(op, args, dict(image_size=cases.IMAGE, **extra)), EMULATED, run_order)

            everything = forward_and_grads(lambda: run(torch.ones_like(keep)), inputs)
            assert torch.isnan(everything[0][~keep]).all(), op
            assert torch.isfinite(everything[0][keep]).all(), op
            # The same probe on the kept rows: forward_and_grads draws it from a fixed seed.
            probe = torch.randn(everything[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            loss = (probe[keep] * run(keep)).sum()
            subset = torch.autograd.grad(loss, inputs, allow_unused=True)
            for a, b in zip(everything[1], subset):
                torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=RTOL64, atol=ATOL64)
    finally:
        public.set_value_checks(True)


@pytest.mark.parametrize("dtype", [torch.float64] + list(LOW_PRECISION), ids=str)
def test_emulated_wide_channels_last_loads(dtype):
    # Channel counts that are multiples of every vector width (16 bytes: 2 float64 ... 8 float16), so
    # the sampling kernels take their wide-load path, which the odd channel counts of cases.py skip.
    g = torch.Generator().manual_seed(5)
    shapes = ((8, 10, 12), (16, 5, 6), (24, 3, 3))
    f = cases.features(dtype, "cpu", "channels_last", g, requires_grad=True, shapes=shapes)
    rtol, atol = (RTOL64, ATOL64) if dtype == torch.float64 else LOW_PRECISION[dtype]
    for case in (cases.Case("sparse_hypercolumn", (f, cases.points(40, torch.float32, "cpu", g)),
                            {"image_size": cases.IMAGE}),
                 cases.Case("box_hypercolumn", (f, cases.boxes(6, torch.float32, "cpu", g), (5, 4)),
                            {"image_size": cases.IMAGE, "padding": "zeros"})):
        emulated = forward_and_grads(lambda: call(case, EMULATED, None), f)
        expected = forward_and_grads(lambda: call(case, reference, None), f)
        assert_same(emulated, expected, rtol, atol, f"{case} {dtype}")


@pytest.mark.parametrize("layers,outputs", [(1, 33), (13, 1)], ids=["M33", "13layers"])
@pytest.mark.parametrize("order", [0, 1], ids=["sample_features", "project_scores"])
def test_emulated_many_outputs_and_layers(order, layers, outputs, deterministic):
    # M = 33 outputs (two output blocks of the wide tile) and 13 layers (two launches of the fused
    # kernel, the raw scores carried from the first to the second): paths the shared cases miss.
    g = torch.Generator().manual_seed(7)
    shapes = tuple((3 + layer % 4, 4 + layer % 3, 5 + layer % 2) for layer in range(layers))
    f = cases.features(torch.float64, "cpu", "contiguous", g, requires_grad=True, shapes=shapes)
    w = cases.classifier(3, outputs, 2, torch.float64, "cpu", g, requires_grad=True, shapes=shapes)
    bias = torch.randn(2, 9, outputs, generator=g, dtype=torch.float64).requires_grad_(True)
    boxes = cases.boxes(1, torch.float32, "cpu", g)  # few points: each emulated warp shuffle is slow
    points = cases.points(2, torch.float32, "cpu", g)
    scale = {"spatial_scale": [0.25] * layers}
    for case in (
            cases.Case("fused_hypercolumn", (f, boxes, w, bias),
                       dict(output_size=(2, 3), activation="sigmoid",
                            labels=torch.randint(0, 2, (len(boxes),), generator=g), **scale)),
            cases.Case("fused_hypercolumn_points", (f, points, w, bias),
                       dict(labels=torch.randint(0, 2, (len(points),), generator=g),
                            locations=torch.rand(len(points), 2, generator=g, dtype=torch.float64), **scale))):
        inputs = cases.differentiable_inputs(case)
        emulated = forward_and_grads(lambda: call(case, EMULATED, order), inputs)
        expected = forward_and_grads(lambda: call(case, reference, order), inputs)
        assert_same(emulated, expected, RTOL64, ATOL64, f"{case} order {order}")
