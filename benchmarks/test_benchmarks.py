"""The cases of ``run.py`` as a pytest-benchmark suite (times only; run.py also measures memory
and errors).

    python -m pytest benchmarks/ --benchmark-only
    HYPERCOLUMN_OPS_BENCH_FULL=1 HYPERCOLUMN_OPS_BENCH_DEVICE=cuda python -m pytest benchmarks/ --benchmark-only

Environment: ``HYPERCOLUMN_OPS_BENCH_DEVICE`` (default cpu), ``HYPERCOLUMN_OPS_BENCH_DTYPE``
(default float32), ``HYPERCOLUMN_OPS_BENCH_FULL=1`` for every workload and baseline (default: run.py's
quick set). Not part of the test run: ``pytest tests`` does not collect this folder.
"""

import functools
import os

import pytest
import torch

from methods import (MODES, available_bytes, estimated_bytes, fused_backends, grad_output, method_function,
                     method_names, output_shape, run_once)
from run import DTYPES, MEMORY_HEADROOM, QUICK_WORKLOADS, selected_modes
from workloads import WORKLOADS, build

pytestmark = pytest.mark.slow

DEVICE = torch.device(os.environ.get("HYPERCOLUMN_OPS_BENCH_DEVICE", "cpu"))
DTYPE = DTYPES[os.environ.get("HYPERCOLUMN_OPS_BENCH_DTYPE", "float32")]
FULL = os.environ.get("HYPERCOLUMN_OPS_BENCH_FULL") == "1"
NAMES = list(WORKLOADS) if FULL else list(QUICK_WORKLOADS)
BACKENDS = fused_backends(DEVICE.type)
CASES = [(name, method, mode) for name in NAMES for method in method_names(WORKLOADS[name].op, BACKENDS)
         for mode in MODES]


@functools.lru_cache(maxsize=1)
def inputs_of(name):
    """One workload's tensors at a time (they are large)."""
    return build(name, DEVICE, DTYPE, requires_grad=True)


def _synchronised(call):
    def run():
        out = call()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        return out
    return run


@pytest.mark.parametrize("name,method,mode", CASES, ids=["-".join(case) for case in CASES])
def test_benchmark(benchmark, name, method, mode):
    if mode not in selected_modes(name, method, DEVICE, FULL):
        pytest.skip("not in the quick set (HYPERCOLUMN_OPS_BENCH_FULL=1 runs it)")
    workload = WORKLOADS[name]
    needed = estimated_bytes(workload, method, mode)
    if needed > MEMORY_HEADROOM * available_bytes(DEVICE):
        pytest.skip(f"needs {needed / 2 ** 30:.1f} GB")
    inputs = inputs_of(name)
    gradient = grad_output(workload, DTYPE, DEVICE)
    call = _synchronised(lambda: run_once(method_function(workload.op, method), inputs, mode, gradient))
    try:
        call()
    except NotImplementedError as error:
        pytest.skip(f"unavailable: {str(error).splitlines()[0][:120]}")
    benchmark.extra_info.update(workload=name, op=workload.op, method=method, mode=mode, dtype=str(DTYPE),
                                device=str(DEVICE))
    # The call above was the warm-up on CPU; CUDA gets one more (the first may compile or autotune).
    out = benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1 if DEVICE.type == "cuda" else 0)
    assert out.shape == output_shape(workload)
