"""The contenders of the benchmarks: baselines and this package's operators on each backend,
how one call of them is run and timed, and how much memory a baseline needs.

Every method takes the workload operator's public arguments. The roi_align baselines default
to padding ``"zeros"``, the others to ``"border"``: every benchmark point lies inside the image,
where the two paddings agree, so all methods compute the same function.
"""

import math
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

import hypercolumn_ops
from hypercolumn_ops import baselines
from workloads import Inputs, Workload

FORWARD = "forward"
FORWARD_BACKWARD = "forward+backward"
MODES = (FORWARD, FORWARD_BACKWARD)
# forward+backward under torch.use_deterministic_algorithms(True): the package's operators only,
# on CUDA (where it is another code path; the CPU kernels are deterministic in either mode).
DETERMINISTIC = "forward+backward, deterministic"
ALL_MODES = MODES + (DETERMINISTIC,)

FUSED_PREFIX = "fused/"

BASELINES: Dict[str, Dict[str, Callable]] = {
    "fused_hypercolumn": {
        "naive": baselines.naive_fused_hypercolumn,
        "roi_align_concat": baselines.roi_align_concat,
        "classify_then_sample": baselines.classify_then_sample,
    },
    "fused_hypercolumn_points": {
        "naive": baselines.naive_fused_hypercolumn_points,
        "grid_sample": baselines.grid_sample_fused_points,
    },
    "box_hypercolumn": {
        "naive": baselines.naive_box_hypercolumn,
        "roi_align_concat": baselines.roi_align_boxes,
    },
    "sparse_hypercolumn": {
        "naive": baselines.naive_sparse_hypercolumn,
        "grid_sample": baselines.grid_sample_points,
    },
}


def fused_backends(device: str) -> List[str]:
    """The package's backends to time on ``device``: all available but the reference, which is
    the error reference rather than a contender."""
    return [name for name in hypercolumn_ops.available_backends(device) if name != "reference"]


def method_names(op: str, backends: List[str]) -> List[str]:
    """Baselines of ``op`` then ``fused/<backend>`` for each backend."""
    return list(BASELINES[op]) + [FUSED_PREFIX + name for name in backends]


def method_function(op: str, method: str) -> Callable:
    """The callable of ``method`` with the public signature of operator ``op``."""
    if not method.startswith(FUSED_PREFIX):
        return BASELINES[op][method]
    backend = method[len(FUSED_PREFIX):]
    operator = getattr(hypercolumn_ops, op)

    def call(*args, **kwargs):
        with hypercolumn_ops.use_backend(backend):
            return operator(*args, **kwargs)

    return call


def output_shape(workload: Workload) -> tuple:
    if workload.op == "sparse_hypercolumn":
        return (workload.count, workload.channels)
    if workload.op == "fused_hypercolumn_points":
        return (workload.count, workload.outputs)
    if workload.op == "box_hypercolumn":
        return (workload.count, workload.channels) + tuple(workload.output_size)
    return (workload.count, workload.outputs) + tuple(workload.output_size)


def grad_output(workload: Workload, dtype: torch.dtype, device) -> Tensor:
    """The fixed gradient fed to every backward pass of a workload."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(output_shape(workload), generator=generator).to(device=device, dtype=dtype)


def run_once(function: Callable, inputs: Inputs, mode: str, gradient: Optional[Tensor]) -> Tensor:
    """One call: forward under ``torch.no_grad()``, or forward then backward of ``gradient`` into
    the features, weights and bias (their ``.grad`` cleared first, so nothing accumulates), in
    deterministic mode for ``DETERMINISTIC``."""
    args, kwargs = inputs.call_args()
    if mode == FORWARD:
        with torch.no_grad():
            return function(*args, **kwargs)
    for tensor in inputs.differentiable():
        tensor.grad = None
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(mode == DETERMINISTIC or previous)
    try:
        out = function(*args, **kwargs)
        out.backward(gradient)
    finally:
        torch.use_deterministic_algorithms(previous)
    return out.detach()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call: Callable[[], Tensor], device: torch.device, min_reps: int, min_seconds: float,
               max_reps: int) -> Dict:
    """Median wall time of ``call`` after two warm-up calls (the first may compile or autotune on
    CUDA; on the CPU the first calls fault in freshly mapped output and gradient buffers): at least
    ``min_reps`` repetitions and ``min_seconds`` in all, at most ``max_reps``.
    On CUDA each repetition is timed with events between synchronisations, and the host time until
    the call returns is kept beside it (where the two are close, the call waits on the host).

    Returns ``{"median_ms", "times_ms", "host_times_ms", "output"}`` (the last call's output;
    ``host_times_ms`` empty off CUDA, where ``times_ms`` are host times).
    """
    output = None
    for _ in range(2):
        output = call()
    _synchronize(device)
    times, host_times = [], []
    while len(times) < max_reps and (len(times) < min_reps or sum(times) < min_seconds * 1e3):
        begin = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            output = call()
            end.record()
            host_times.append((time.perf_counter() - begin) * 1e3)
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            output = call()
            times.append((time.perf_counter() - begin) * 1e3)
    return {"median_ms": statistics.median(times), "times_ms": times, "host_times_ms": host_times,
            "output": output}


def cuda_peak_bytes(call: Callable[[], Tensor], device: torch.device) -> int:
    """Peak CUDA memory allocated during ``call`` beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def estimated_bytes(workload: Workload, method: str, mode: str) -> int:
    """A conservative estimate of a baseline's peak extra memory, so that a machine without it
    skips the call rather than crashing. Baselines compute in float32 (4 bytes)."""
    size = 4
    batch = 1
    height, width = workload.image
    image = batch * workload.channels * height * width * size  # the image-size hypercolumn
    columns = workload.num_points * workload.channels * size  # the gathered hypercolumns
    layers = sum(math.prod(shape) for shape in workload.feature_shapes()) * size
    backward = mode == FORWARD_BACKWARD
    if method == "naive":
        return 2 * image + columns + (image + columns if backward else 0)
    if method == "roi_align_concat":
        return 2 * columns + (columns if backward else 0)
    if method == "grid_sample":
        return 2 * columns + (2 * columns if backward else 0)
    if method == "classify_then_sample":
        scores = workload.cells * workload.outputs
        maps = sum(b * h * w for b, _, h, w in workload.feature_shapes()) * scores * size
        sampled = len(workload.feature_shapes()) * workload.num_points * scores * size
        return (2 if backward else 1) * (maps + 2 * sampled) + (layers if backward else 0)
    # The package's operators: docs/semantics.md (Memory) bounds them by the score maps and the output.
    return 0


def available_bytes(device: torch.device) -> int:
    """Memory a call may still use: free device memory on CUDA, MemAvailable on Linux CPUs."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62
