"""Where the time of one call goes on a CUDA device: the benchmark's cases under torch.profiler.

    python benchmarks/profile_cuda.py --workloads sds parts --methods fused/native fused/triton \\
        --modes forward forward+backward --dtype float32 --out DIR

For every (workload, method, mode) it prints one line: the median time of a call (CUDA events,
as benchmarks/run.py measures it), the host time a call takes to return before the device
finishes (launch and Python overhead), the same with ``hypercolumn_ops.set_value_checks(False)``,
the median time of a replay of the call captured in a CUDA graph (its kernels without the host's
time between launches; "-" where the capture fails, the reason printed below the table), the
device time of its kernels, the kernels launched and the host synchronisations
(cudaStreamSynchronize, cudaDeviceSynchronize, device-to-host copies) per call. ``--out`` also
gets, per case, the profiler's tables: kernels by device time and operators by host time.
"""

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

import hypercolumn_ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from methods import ALL_MODES, grad_output, method_function, run_once  # noqa: E402
from run import DTYPES, selected_modes  # noqa: E402
from workloads import WORKLOADS, build  # noqa: E402

SYNCHRONISING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def _device_time(event) -> float:
    """Self device time (us) of a profiler event, under the name this torch gives it."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return getattr(event, name)
    return 0.0


def _event_times(call, device: torch.device, repetitions: int = 10) -> Tuple[List[float], List[float]]:
    """Device time (CUDA events) and host time until return of each of ``repetitions`` calls."""
    walls, hosts = [], []
    for _ in range(repetitions):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin = time.perf_counter()
        start.record()
        call()
        end.record()
        hosts.append((time.perf_counter() - begin) * 1e3)
        torch.cuda.synchronize(device)
        walls.append(start.elapsed_time(end))
    return walls, hosts


def graph_replay_ms(call, device: torch.device) -> Tuple[Optional[float], str]:
    """Median time of a replay of ``call`` captured in a CUDA graph, or None and why the capture
    failed. Warmed up first on the capture's stream (cuBLAS makes its workspaces per stream)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            call()
    except Exception as error:  # whatever stops the capture is reported, and the profile goes on
        return None, f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0][:160]
    graph.replay()
    torch.cuda.synchronize(device)
    walls, _ = _event_times(graph.replay, device)
    return statistics.median(walls), ""


def profile_case(call, device: torch.device, calls: int) -> Dict:
    for _ in range(3):  # warm-up: Triton compiles, cuBLAS handles, the caching allocator
        call()
    torch.cuda.synchronize(device)
    walls, hosts = _event_times(call, device)
    with hypercolumn_ops.set_value_checks(False):
        _, unchecked_hosts = _event_times(call, device)
    graph_ms, graph_failure = graph_replay_ms(call, device)
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
        "unchecked_host_ms": statistics.median(unchecked_hosts),
        "graph_ms": graph_ms,
        "graph_failure": graph_failure,
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
    print(f"{'case':58s} {'call ms':>8s} {'host ms':>8s} {'unchecked':>9s} {'graph ms':>8s} {'kernel ms':>9s} "
          f"{'kernels':>7s}  syncs")
    failures = []
    for name in args.workloads:
        inputs = build(name, device, dtype, requires_grad=True)
        gradient = grad_output(inputs.workload, dtype, device)
        for method in args.methods:
            function = method_function(inputs.workload.op, method)
            run_modes = selected_modes(name, method, device, full=False)  # as benchmarks/run.py does
            for mode in (mode for mode in args.modes if mode in run_modes):
                result = profile_case(lambda: run_once(function, inputs, mode, gradient), device, args.calls)
                case = f"{name} {method} {mode}"
                syncs = ", ".join(f"{key} {count}" for key, count in result["syncs"].items()) or "none"
                graph = "-" if result["graph_ms"] is None else f"{result['graph_ms']:.3f}"
                if result["graph_failure"]:
                    failures.append(f"{case}: {result['graph_failure']}")
                print(f"{case:58s} {result['wall_ms']:8.3f} {result['host_ms']:8.3f} "
                      f"{result['unchecked_host_ms']:9.3f} {graph:>8s} {result['kernel_ms']:9.3f} "
                      f"{result['launches']:7d}  {syncs}")
                if args.out:
                    averages = result["profiler"].key_averages()
                    path = os.path.join(args.out, f"{name}_{method.replace('/', '-')}_{mode.replace(' ', '')}.txt")
                    with open(path, "w") as file:
                        for sort_by in ("self_cuda_time_total", "self_cpu_time_total"):
                            file.write(averages.table(sort_by=sort_by, row_limit=args.rows) + "\n")
        del inputs
    for failure in failures:
        print("no CUDA graph:", failure)


if __name__ == "__main__":
    main()
