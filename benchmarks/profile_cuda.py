"""Where the time of one call goes on a CUDA device: the benchmark's cases under torch.profiler.

    python benchmarks/profile_cuda.py --workloads sds parts --methods fused/native fused/triton \\
        --modes forward forward+backward --dtype float32 --out DIR

For every (workload, method, mode) it prints one line: the median time of a call (CUDA events,
as benchmarks/run.py measures it), the host time a call takes to return before the device
finishes (launch and Python overhead), the device time of its kernels, the kernels launched and
the host synchronisations (cudaStreamSynchronize, cudaDeviceSynchronize, device-to-host copies)
per call. ``--out`` also gets, per case, the profiler's tables: kernels by device time and
operators by host time.
"""

import argparse
import os
import statistics
import sys
import time
from typing import Dict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from methods import ALL_MODES, grad_output, method_function, run_once  # noqa: E402
from run import DTYPES  # noqa: E402
from workloads import WORKLOADS, build  # noqa: E402

SYNCHRONISING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def _device_time(event) -> float:
    """Self device time (us) of a profiler event, under the name this torch gives it."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return getattr(event, name)
    return 0.0


def profile_case(call, device: torch.device, calls: int) -> Dict:
    for _ in range(3):  # warm-up: Triton compiles, cuBLAS handles, the caching allocator
        call()
    torch.cuda.synchronize(device)
    walls, hosts = [], []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin = time.perf_counter()
        start.record()
        call()
        end.record()
        hosts.append((time.perf_counter() - begin) * 1e3)
        torch.cuda.synchronize(device)
        walls.append(start.elapsed_time(end))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            call()
        torch.cuda.synchronize(device)
    averages = profiler.key_averages()
    kernels = [event for event in averages if _device_time(event) > 0 and event.device_type.name == "CUDA"]
    syncs = {event.key: event.count // calls for event in averages if event.key in SYNCHRONISING}
    return {
        "wall_ms": statistics.median(walls),
        "host_ms": statistics.median(hosts),
        "kernel_ms": sum(_device_time(event) for event in kernels) / calls / 1e3,
        "launches": sum(event.count for event in kernels) // calls,
        "syncs": syncs,
        "profiler": profiler,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["sds", "keypoints"], choices=list(WORKLOADS))
    parser.add_argument("--methods", nargs="+", default=["fused/native", "fused/triton"])
    parser.add_argument("--modes", nargs="+", default=list(ALL_MODES), choices=list(ALL_MODES))
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--calls", type=int, default=5, help="calls under the profiler per case")
    parser.add_argument("--rows", type=int, default=15, help="rows of each profiler table")
    parser.add_argument("--out", help="folder for the profiler tables (default: none written)")
    args = parser.parse_args()
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {args.dtype}")
    print(f"{'case':58s} {'call ms':>8s} {'host ms':>8s} {'kernel ms':>9s} {'kernels':>7s}  syncs")
    for name in args.workloads:
        inputs = build(name, device, dtype, requires_grad=True)
        gradient = grad_output(inputs.workload, dtype, device)
        for method in args.methods:
            function = method_function(inputs.workload.op, method)
            for mode in args.modes:
                result = profile_case(lambda: run_once(function, inputs, mode, gradient), device, args.calls)
                case = f"{name} {method} {mode}"
                syncs = ", ".join(f"{key} {count}" for key, count in result["syncs"].items()) or "none"
                print(f"{case:58s} {result['wall_ms']:8.3f} {result['host_ms']:8.3f} {result['kernel_ms']:9.3f} "
                      f"{result['launches']:7d}  {syncs}")
                if args.out:
                    averages = result["profiler"].key_averages()
                    path = os.path.join(args.out, f"{name}_{method.replace('/', '-')}_{mode.replace(' ', '')}.txt")
                    with open(path, "w") as file:
                        for sort_by in ("self_cuda_time_total", "self_cpu_time_total"):
                            file.write(averages.table(sort_by=sort_by, row_limit=args.rows) + "\n")
        del inputs


if __name__ == "__main__":
    main()
