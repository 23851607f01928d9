"""The CUDA kernels of ``csrc/cuda/`` run on the CPU (``cuda_emulation/``), against the reference.

No GPU runs in CI, so this is where the CUDA kernels' logic is checked on every change: indexing,
strides, shared memory and barriers, the atomic and the deterministic (gathered or sorted per
pixel) backward, both evaluation orders of the fused operators, invalid rows. Each block's threads
run as real threads, interleaving arbitrarily. Speed, the GPU's memory model and launch limits are
only seen on a GPU (tests/test_native_cuda.py, benchmarks/gpu_check.sh).
"""

import os
import sys

import pytest
import torch

import cases
from hypercolumn_ops import _native
from hypercolumn_ops import reference
from kernel_checks import (ATOL64, LOW_PRECISION, RTOL64, assert_all_close, block_path_cases, check_bias_segments,
                           check_case, check_deterministic_paths, check_empty_batch, check_index_values_valid,
                           check_invalid_rows, check_malformed_calls, check_random_case, check_score_bins,
                           check_score_products, deterministic_algorithms, forward_and_grads, random_seeds,
                           run_in_order, sampling_option_cases)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation"))
import build  # noqa: E402


class _Emulated:
    """``torch.ops.hypercolumn_ops_cuda_emulated``, built on first use (a run that deselects these
    tests, such as ``pytest -m needs_cuda`` on a GPU machine, does not compile it)."""

    namespace = None

    def __getattr__(self, name):
        if name.startswith("_"):  # pytest looks up names such as __test__ and _mock_name: no build
            raise AttributeError(name)
        if _Emulated.namespace is None:
            build.build()
            _native.register_fakes(build.NAMESPACE)
            _Emulated.namespace = getattr(torch.ops, build.NAMESPACE)
        return getattr(_Emulated.namespace, name)


EMULATED = _Emulated()

CASES = cases.all_cases(torch.float64, "cpu", requires_grad=True)
RUNS = [(index, order) for index, case in enumerate(CASES)
        for order in ((0, 1) if case.op.startswith("fused") else (None,))]
RUN_IDS = [f"{CASES[index]!r}" + ("" if order is None else f"-order{order}") for index, order in RUNS]


@pytest.fixture(params=[False, True], ids=["atomic", "deterministic"])
def deterministic(request):
    with deterministic_algorithms(request.param):
        yield request.param


@pytest.mark.parametrize("index,order", RUNS, ids=RUN_IDS)
@pytest.mark.slow
def test_emulated_cuda_kernels_match_reference(index, order, deterministic):
    case = CASES[index]
    inputs = cases.differentiable_inputs(case)
    emulated = forward_and_grads(lambda: run_in_order(case, EMULATED, order), inputs)
    expected = forward_and_grads(lambda: run_in_order(case, reference, order), inputs)
    assert_all_close(emulated, expected, RTOL64, ATOL64, f"{case} order {order}")
    if deterministic:
        # No atomics in deterministic mode: the same bits again, whatever the threads' interleaving.
        again = forward_and_grads(lambda: run_in_order(case, EMULATED, order), inputs)
        assert_all_close(again, emulated, 0.0, 0.0, f"{case} order {order} run to run")


OPTION_CASES = sampling_option_cases("cpu")
OPTION_RUNS = [(index, order) for index, case in enumerate(OPTION_CASES)
               for order in ((0, 1) if case.op.startswith("fused") else (None,))]
OPTION_IDS = [f"{OPTION_CASES[index]!r}" + ("" if order is None else f"-order{order}") for index, order in OPTION_RUNS]


@pytest.mark.parametrize("index,order", OPTION_RUNS, ids=OPTION_IDS)
@pytest.mark.slow
def test_emulated_sampling_options_match_reference(index, order, deterministic):
    # padding "zeros_per_tap", and every sampling_ratio / aligned on box grids: each cell's samples
    # looped over in every kernel, gathered per pixel in deterministic mode (the same bits twice).
    check_case(EMULATED, OPTION_CASES[index], order)


@pytest.mark.parametrize("name", ["ratio2-unaligned-border-contiguous", "ratio0-aligned-border-contiguous"])
def test_emulated_sampled_box_grids(name, deterministic):
    # The quick tier's look at sampled cells (the slow test above takes every option): both box
    # operators, the fused one projecting its scores.
    chosen = [case for case in OPTION_CASES if case.name == name]
    assert len(chosen) == 2, name
    for case in chosen:
        check_case(EMULATED, case, 1 if case.op.startswith("fused") else None)


@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize("index,order", RUNS, ids=RUN_IDS)
@pytest.mark.slow
def test_emulated_cuda_kernels_low_precision(index, order, dtype):
    # The reduced-precision instantiations (16-byte loads where channels_last allows them), against
    # the reference in the same dtype, as tests/test_native_cuda.py::test_low_precision on a GPU.
    case = cases.all_cases(dtype, "cpu", requires_grad=True)[index]
    inputs = cases.differentiable_inputs(case)
    emulated = forward_and_grads(lambda: run_in_order(case, EMULATED, order), inputs)
    expected = forward_and_grads(lambda: run_in_order(case, reference, order), inputs)
    assert_all_close(emulated, expected, *LOW_PRECISION[dtype], f"{case} order {order} {dtype}")


@pytest.mark.parametrize("order", [0, 1], ids=["sample_features", "project_scores"])
@pytest.mark.slow
def test_emulated_invalid_rows_give_nan_and_no_gradient(order, deterministic):
    check_invalid_rows("cpu", lambda case: run_in_order(case, EMULATED, order))


@pytest.mark.parametrize("order", [0, 1], ids=["sample_features", "project_scores"])
@pytest.mark.slow
def test_emulated_empty_batch_gives_nan(order, deterministic):
    check_empty_batch("cpu", lambda case: run_in_order(case, EMULATED, order))


@pytest.mark.parametrize("dtype", [torch.float64] + list(LOW_PRECISION), ids=str)
def test_emulated_sampling_block_paths(dtype):
    rtol, atol = (RTOL64, ATOL64) if dtype == torch.float64 else LOW_PRECISION[dtype]
    for case in block_path_cases(dtype, "cpu"):
        inputs = cases.differentiable_inputs(case)
        emulated = forward_and_grads(lambda: run_in_order(case, EMULATED), inputs)
        expected = forward_and_grads(lambda: run_in_order(case, reference), inputs)
        assert_all_close(emulated, expected, rtol, atol, f"{case} {dtype}")


@pytest.mark.parametrize("layers,outputs", [(1, 33), (13, 1)], ids=["M33", "13layers"])
@pytest.mark.parametrize("order", [0, 1], ids=["sample_features", "project_scores"])
@pytest.mark.slow
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
        emulated = forward_and_grads(lambda: run_in_order(case, EMULATED, order), inputs)
        expected = forward_and_grads(lambda: run_in_order(case, reference, order), inputs)
        assert_all_close(emulated, expected, RTOL64, ATOL64, f"{case} order {order}")


@pytest.mark.parametrize("order", [0, 1], ids=["sample_features", "project_scores"])
@pytest.mark.slow
def test_emulated_deterministic_paths(order, deterministic):
    check_deterministic_paths(EMULATED, "cpu", order)


@pytest.mark.parametrize("order", [0, 1], ids=["sample_features", "project_scores"])
@pytest.mark.slow
def test_emulated_bias_segments(order, deterministic):
    check_bias_segments(EMULATED, "cpu", order)


@pytest.mark.slow
def test_emulated_score_products(deterministic):
    check_score_products(EMULATED, "cpu")


@pytest.mark.slow
def test_emulated_score_bins():
    check_score_bins(EMULATED, "cpu")


def test_emulated_bias_of_another_dtype_raises():
    # As the CPU kernels do (the public functions check it first).
    f = cases.features(torch.float32, "cpu")
    weights = [torch.zeros(1, 4, 2, c) for c in (3, 5, 7)]
    with pytest.raises(RuntimeError, match="bias: dtype Half differs from the features' Float"):
        EMULATED.fused_hypercolumn(f, torch.zeros(4, 5), weights, torch.zeros(4, 4, 2).half(), None, 2, 2, [],
                                   [1.0] * 3, 0, 0, [0] * 3, 1, True)


@pytest.mark.slow
def test_emulated_index_values_valid():
    check_index_values_valid(EMULATED, "cpu")


@pytest.mark.parametrize("seed", random_seeds(24))
@pytest.mark.slow
def test_emulated_random_cases_match_reference(seed):
    check_random_case(EMULATED, seed, "cpu")


@pytest.mark.parametrize("seed", random_seeds(12))
@pytest.mark.slow
def test_emulated_malformed_direct_calls_raise_or_return(seed):
    check_malformed_calls(EMULATED, seed, "cpu")
