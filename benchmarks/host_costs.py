"""Host time of the pieces of a fused call on CUDA, one piece at a time.

The fused calls on the H200 are bound by host time (``results/gpu/README.md``), and
the profiler puts most of it in ``aten::mm``, the cuBLAS products that project the order-1 layers.
The profiler's own overhead inflates what it shows, so this times each piece without it: how long
the host takes to return from one call (``time.perf_counter``; the device is idle at each start)
and what CUDA events measure on the device, medians of many calls.

Pieces, on the ``sds`` workload's layers (float32 by default):
- one tiny aten op (``add_`` on one element): the floor of any dispatched launch;
- each layer's projection as the native backend makes it (``at::mm`` of the map's pixel matrix,
  a transposed view of the NCHW map, with the weights transposed), under each cuBLAS library that
  ``torch.backends.cuda.preferred_blas_library`` offers, and with a contiguous pixel matrix;
- the Python argument checks and normalisation of the public function (``ops.normalise_*``);
- the whole ``fused_hypercolumn`` forward (native), with and without the value checks.

Usage: python benchmarks/host_costs.py [--dtype float32] [--calls 200]
"""

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hypercolumn_ops  # noqa: E402
from hypercolumn_ops import ops  # noqa: E402
from methods import method_function  # noqa: E402
from run import DTYPES  # noqa: E402
from workloads import build  # noqa: E402


def host_and_device_ms(call: Callable[[], object], calls: int) -> Dict[str, float]:
    """Median host time until ``call`` returns and median event time, over ``calls`` calls, each
    started on an idle device (after a few warm-up calls)."""
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    hosts: List[float] = []
    events: List[float] = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        begin = time.perf_counter()
        call()
        hosts.append((time.perf_counter() - begin) * 1e3)
        end.record()
        torch.cuda.synchronize()
        events.append(start.elapsed_time(end))
    return {"host_ms": statistics.median(hosts), "event_ms": statistics.median(events)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("host_costs.py: needs a CUDA device")
    dtype = DTYPES[args.dtype]
    inputs = build("sds", "cuda", dtype)
    rows = []
    one = torch.zeros(1, device="cuda")
    rows.append(("add_ on one element", host_and_device_ms(lambda: one.add_(1), args.calls)))
    libraries = ["default"]
    if hasattr(torch.backends.cuda, "preferred_blas_library"):
        libraries += ["cublas", "cublaslt"]
    original = torch.backends.cuda.preferred_blas_library() if len(libraries) > 1 else None
    try:
        for feature, weight in zip(inputs.features, inputs.weights):
            channels = feature.shape[1]
            pixels = feature.flatten(2).transpose(1, 2)[0]  # (H*W, C) view of the NCHW map
            transposed = weight.reshape(-1, channels).t()
            label = f"mm {tuple(pixels.shape)} x {tuple(transposed.shape)}"
            for library in libraries:
                if original is not None:
                    torch.backends.cuda.preferred_blas_library(original if library == "default" else library)
                rows.append((f"{label}, {library}", host_and_device_ms(lambda: torch.mm(pixels, transposed),
                                                                       args.calls)))
                if library == "default":
                    dense = pixels.contiguous()
                    rows.append((f"{label}, contiguous pixels",
                                 host_and_device_ms(lambda: torch.mm(dense, transposed), args.calls)))
    finally:
        if original is not None:
            torch.backends.cuda.preferred_blas_library(original)
    function = method_function("fused_hypercolumn", "fused/native")
    call_args, kwargs = inputs.call_args()
    rows.append(("argument checks and normalisation (Python, with the value check)",
                 host_and_device_ms(lambda: ops.normalise_fused_hypercolumn(*call_args, **kwargs), args.calls)))
    with torch.no_grad():
        rows.append(("fused_hypercolumn forward, native", host_and_device_ms(lambda: function(*call_args, **kwargs),
                                                                             args.calls)))
        with hypercolumn_ops.set_value_checks(True):
            rows.append(("fused_hypercolumn forward, native, strict value checks (a synchronisation)",
                         host_and_device_ms(lambda: function(*call_args, **kwargs), args.calls)))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, sds layers, "
          f"medians of {args.calls} calls")
    print(f"{'piece':75s} {'host ms':>8s} {'event ms':>8s}")
    for name, result in rows:
        print(f"{name:75s} {result['host_ms']:8.4f} {result['event_ms']:8.4f}")


if __name__ == "__main__":
    main()
