"""Per-call host time of each operator on tiny inputs, against stock PyTorch operators.

    python benchmarks/overhead.py [--device cpu|cuda] [--rounds 15] [--calls 400] [--out DIR]
                                  [--baseline CHECKOUT]

What a call costs the host when the work itself is negligible: argument checks, normalisation,
backend choice, dispatch, output allocation, autograd bookkeeping. One image, one 8-channel 8 x 8
layer (float32, one thread on the CPU), one box with a 2 x 2 grid, one point, K = 1, M = 1;
``spatial_scale=1``. Stock operators on the same input: ``torchvision.ops.roi_align`` (the
yardstick), ``F.grid_sample`` and a 1 x 1 ``F.conv2d``.

Forward runs under ``torch.no_grad()``; forward+backward calls ``torch.autograd.backward`` on the
output with a fixed gradient (the features require grad; the fused operators' weights too). The
methods take turns within each round, so that a noisy machine slows them alike; each round times
``--calls`` calls of each, and the table gives the median per call over rounds and the median
over rounds of the ratio to ``roi_align`` in the same round. ``--baseline CHECKOUT`` also measures another build of the package (a checkout with
an in-place build, e.g. an earlier commit) in a child process right before, and reports its
ratios beside this one's: each build's own roi_align is its yardstick. On the CPU the time is the
calling
thread's CPU time (``time.thread_time``; one intra-op thread, so all the work is on it): on a
shared machine, time spent descheduled would otherwise count. On CUDA it is wall time up to a
synchronisation after the last call. Writes ``overhead.json`` and ``overhead.md`` to ``--out`` (default
``benchmarks/results/<device>/``).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

import hypercolumn_ops

HERE = os.path.dirname(os.path.abspath(__file__))
FORWARD, FORWARD_BACKWARD = "forward", "forward+backward"


def methods(device: torch.device):
    """name -> (function of (feature, weight) returning the output, whether it is stock PyTorch)."""
    boxes = torch.tensor([[0, 1.0, 1.0, 6.0, 7.0]], device=device)
    points = torch.tensor([[0, 3.0, 4.0]], device=device)
    grid = torch.tensor([[[[-0.2, 0.1]]]], device=device)
    return {
        "roi_align": (lambda f, w: torchvision.ops.roi_align(f, boxes, (2, 2), 1.0, 1, True), True),
        "grid_sample": (lambda f, w: F.grid_sample(f, grid, align_corners=False), True),
        "conv2d (1x1)": (lambda f, w: F.conv2d(f, w.reshape(1, 8, 1, 1)), True),
        "sparse_hypercolumn": (lambda f, w: hypercolumn_ops.sparse_hypercolumn([f], points, spatial_scale=1.0),
                               False),
        "box_hypercolumn": (lambda f, w: hypercolumn_ops.box_hypercolumn([f], boxes, (2, 2), spatial_scale=1.0),
                            False),
        "fused_hypercolumn": (lambda f, w: hypercolumn_ops.fused_hypercolumn(
            [f], boxes, [w], output_size=(2, 2), spatial_scale=1.0), False),
        "fused_hypercolumn_points": (lambda f, w: hypercolumn_ops.fused_hypercolumn_points(
            [f], points, [w], spatial_scale=1.0), False),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round(function, feature, weight, mode, calls, device) -> float:
    """Microseconds per call over ``calls`` calls."""
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    if mode == FORWARD:
        with torch.no_grad():
            _synchronize(device)
            start = clock()
            for _ in range(calls):
                function(feature, weight)
            _synchronize(device)
            return (clock() - start) / calls * 1e6
    gradient = torch.ones_like(function(feature, weight))
    _synchronize(device)
    start = clock()
    for _ in range(calls):
        torch.autograd.backward(function(feature, weight), gradient)
    _synchronize(device)
    return (clock() - start) / calls * 1e6


def measure(device: torch.device, rounds: int, calls: int) -> dict:
    torch.manual_seed(0)
    feature = torch.randn(1, 8, 8, 8, device=device, requires_grad=True)
    weight = torch.randn(1, 1, 8, device=device, requires_grad=True)
    table = methods(device)
    results = {}
    for mode in (FORWARD, FORWARD_BACKWARD):
        for function, _ in table.values():  # warm-up: first-call costs (lazy imports, kernels' setup)
            time_round(function, feature, weight, mode, max(calls // 10, 10), device)
        samples = {name: [] for name in table}
        for _ in range(rounds):
            for name, (function, _) in table.items():
                samples[name].append(time_round(function, feature, weight, mode, calls, device))
        yardstick = samples["roi_align"]
        results[mode] = {name: {"us": statistics.median(times),
                                "ratio_to_roi_align": statistics.median(t / y for t, y in zip(times, yardstick))}
                         for name, times in samples.items()}
    return results


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _table(results: dict) -> list:
    lines = ["| operator | forward us | / roi_align | forward+backward us | / roi_align |",
             "|---|---:|---:|---:|---:|"]
    forward, both = results[FORWARD], results[FORWARD_BACKWARD]
    for name in forward:
        lines.append(f"| `{name}` | {forward[name]['us']:.1f} | {forward[name]['ratio_to_roi_align']:.2f} | "
                     f"{both[name]['us']:.1f} | {both[name]['ratio_to_roi_align']:.2f} |")
    return lines


def markdown(report: dict) -> str:
    lines = [f"# Per-call host time on tiny inputs ({report['device']})", "",
             f"{report['machine']}; torch {report['torch']}, torchvision {report['torchvision']}, "
             f"hypercolumn_ops {report['hypercolumn_ops']}; {report['date']}; "
             f"median of {report['rounds']} rounds of {report['calls']} calls "
             f"(`python benchmarks/overhead.py --device {report['device']}`).", "", *_table(report["results"])]
    if "baseline" in report:
        lines += ["", f"The same measured for the build in `{report['baseline']['checkout']}` (run just before, "
                      "its own roi_align the yardstick):", "", *_table(report["baseline"]["results"])]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--out", default=None, help="folder for overhead.json and overhead.md")
    parser.add_argument("--baseline", default=None, help="another checkout with an in-place build, measured too")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    if args.child:
        print(json.dumps(measure(device, args.rounds, args.calls)))
        return
    baseline = None
    if args.baseline:
        command = [sys.executable, os.path.abspath(__file__), "--child", "--device", args.device,
                   "--rounds", str(args.rounds), "--calls", str(args.calls)]
        # The child imports the baseline's package: its checkout first on the path, not this one.
        environment = dict(os.environ, PYTHONPATH=os.path.abspath(args.baseline))
        output = subprocess.run(command, env=environment, cwd=os.path.abspath(args.baseline), check=True,
                                capture_output=True, text=True).stdout
        baseline = {"checkout": args.baseline, "results": json.loads(output.strip().splitlines()[-1])}
    results = measure(device, args.rounds, args.calls)
    report = {"device": device.type, "machine": machine(device), "torch": torch.__version__,
              "torchvision": torchvision.__version__, "hypercolumn_ops": hypercolumn_ops.__version__,
              "date": datetime.date.today().isoformat(), "rounds": args.rounds, "calls": args.calls,
              "results": results}
    if baseline is not None:
        report["baseline"] = baseline
    out = args.out or os.path.join(HERE, "results", device.type)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "overhead.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    text = markdown(report)
    with open(os.path.join(out, "overhead.md"), "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
