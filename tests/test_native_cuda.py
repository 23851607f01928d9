"""The CUDA kernels of the ``"native"`` backend against the reference.

Every case of ``cases.py`` in float64 (forward and gradients), the fused operators with each
evaluation order forced, the sampling options (padding, sampling_ratio, aligned), gradcheck, opcheck, ``torch.compile(fullgraph=True)``, CUDA graph capture,
bitwise reproducibility under ``torch.use_deterministic_algorithms(True)``, reduced precision, and
rows with an invalid batch index, label or coordinate. Skipped where no CUDA device is visible.
"""

import functools

import pytest
import torch

import hypercolumn_ops
from hypercolumn_ops import ops as public
from hypercolumn_ops import reference

import cases
from kernel_checks import (ATOL64, GRAPH_CASES, LOW_PRECISION, RTOL64, assert_all_close, block_path_cases,
                           check_bias_segments, check_case, check_cuda_graph, check_deterministic_paths, check_empty_batch,
                           check_index_values_valid, check_invalid_rows, check_malformed_calls, check_random_case,
                           check_score_bins, check_score_products, deterministic_algorithms, forward_and_grads,
                           random_seeds, run_in_order, sampling_option_cases)

pytestmark = pytest.mark.needs_cuda

# Case lists are built lazily (CUDA tensors cannot be made at collection time without a GPU);
# the CPU list gives the ids, both lists come from the same seed and order.
CASE_IDS = [repr(c) for c in cases.all_cases(torch.float64, "cpu")]
FUSED_IDS = [i for i, name in enumerate(CASE_IDS) if name.startswith("fused")]


@functools.lru_cache(maxsize=None)
def cuda_cases(dtype):
    return cases.all_cases(dtype, "cuda", requires_grad=True)


# The sampling options' cases (padding "zeros_per_tap", every sampling_ratio / aligned of box grids),
# built lazily as the shared ones; (case, order) runs, both orders for the fused operators.
OPTION_CASE_IDS = [repr(c) for c in sampling_option_cases("cpu")]
OPTION_RUNS = [(index, order) for index, name in enumerate(OPTION_CASE_IDS)
               for order in ((0, 1) if name.startswith("fused") else (None,))]


@functools.lru_cache(maxsize=None)
def option_cases():
    return sampling_option_cases("cuda")


@pytest.fixture(autouse=True)
def native_cuda_built():
    assert "native" in hypercolumn_ops.available_backends("cuda"), (
        "the extension was built without its CUDA kernels (build with FORCE_CUDA=1)")


@pytest.fixture
def deterministic():
    with deterministic_algorithms(True):
        yield


def normalised_args(case):
    return list(getattr(public, "normalise_" + case.op)(*case.args, **case.kwargs))


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
    # Each order's deterministic scatter (per-pixel sums; order 1 keeps cuBLAS, which the
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


@pytest.mark.parametrize("order", [0, 1], ids=["sample_features", "project_scores"])
def test_deterministic_paths(order, deterministic):
    check_deterministic_paths(torch.ops.hypercolumn_ops, "cuda", order)


@pytest.mark.parametrize("enabled", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("order", [0, 1], ids=["sample_features", "project_scores"])
def test_bias_segments(order, enabled):
    with deterministic_algorithms(enabled):
        check_bias_segments(torch.ops.hypercolumn_ops, "cuda", order)


@pytest.mark.parametrize("enabled", [False, True], ids=["atomic", "deterministic"])
def test_score_products(enabled):
    with deterministic_algorithms(enabled):
        check_score_products(torch.ops.hypercolumn_ops, "cuda")


def test_score_bins():
    check_score_bins(torch.ops.hypercolumn_ops, "cuda")


@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_low_precision(index, dtype):
    rtol, atol = LOW_PRECISION[dtype]
    cases.assert_close_to_reference(cuda_cases(dtype)[index], "native", rtol, atol)


def test_invalid_rows_give_nan_and_no_gradient():
    def native(case):
        with hypercolumn_ops.use_backend("native"):
            return case()

    check_invalid_rows("cuda", native)


@pytest.mark.parametrize("order", [0, 1], ids=["sample_features", "project_scores"])
def test_empty_batch_gives_nan(order):
    check_empty_batch("cuda", lambda case: run_in_order(case, torch.ops.hypercolumn_ops, order))


def test_bad_arguments_name_the_argument():
    f = cases.features(torch.float32, "cuda")
    ops = torch.ops.hypercolumn_ops
    # The whole message, numbers included (see test_native_cpu.test_error_messages_are_whole).
    with pytest.raises(RuntimeError, match=r"points: expected shape \(rows, 3\), got \[4, 2\]"):
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
    with pytest.raises(RuntimeError, match="bias: dtype Half differs from the features' Float"):
        ops.fused_hypercolumn(f, torch.zeros(4, 5, device="cuda"), weights, torch.zeros(4, 4, 2, device="cuda").half(),
                              None, 2, 2, [1.0] * 3, [1.0] * 3, 0, 0, [0] * 3)


@pytest.mark.parametrize("enabled", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("index,order", OPTION_RUNS,
                         ids=[OPTION_CASE_IDS[i] + ("" if o is None else f"-order{o}") for i, o in OPTION_RUNS])
def test_sampling_options_match_reference(index, order, enabled):
    with deterministic_algorithms(enabled):
        check_case(torch.ops.hypercolumn_ops, option_cases()[index], order)


@pytest.mark.parametrize("dtype", [torch.float64] + list(LOW_PRECISION), ids=str)
def test_sampling_block_paths(dtype):
    rtol, atol = (RTOL64, ATOL64) if dtype == torch.float64 else LOW_PRECISION[dtype]
    for case in block_path_cases(dtype, "cuda"):
        cases.assert_close_to_reference(case, "native", rtol, atol)


def test_index_values_valid():
    check_index_values_valid(torch.ops.hypercolumn_ops, "cuda")


@pytest.mark.parametrize("enabled", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("op", list(GRAPH_CASES))
def test_cuda_graph(op, enabled):
    with deterministic_algorithms(enabled):
        check_cuda_graph("native", op)


@pytest.mark.parametrize("seed", random_seeds(200))
@pytest.mark.slow
def test_random_cases_match_reference(seed):
    check_random_case(torch.ops.hypercolumn_ops, seed, "cuda")


@pytest.mark.parametrize("seed", random_seeds(100))
@pytest.mark.slow
def test_malformed_direct_calls_raise_or_return(seed):
    check_malformed_calls(torch.ops.hypercolumn_ops, seed, "cuda")
