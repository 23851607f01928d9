"""roi_align's sampling options on the CPU: ``fused_hypercolumn`` against ``classify_then_sample``.

    python benchmarks/sampling.py                          # writes benchmarks/results/cpu/sampling.md
    python benchmarks/sampling.py --before /path/to/build  # also times the default sampling there

The sds workload (``workloads.py``: 100 boxes, 50 x 50 grids, K = 5, 4,736 channels, a 512 x 512
image), float32, with ``sampling_ratio=2, aligned=False, padding="zeros"`` (torchvision's detection
pooler's sampling): each output cell averages 2 x 2 bilinear samples. The baseline projects every
layer with ``F.conv2d`` and samples the score maps with ``torchvision.ops.roi_align`` with the same
options (``baselines.classify_then_sample``), the same function. For each method and mode (forward
under ``no_grad``; forward then backward into features, weights and bias) it records the median
wall time (``methods.time_calls``), the peak resident-set growth of a fresh process running only
that call (``run.peak_rss_growth``), and the largest difference between the two methods' outputs.
The default sampling (``sampling_ratio=1, aligned=True``) is timed beside it, and with
``--before`` also in another build of the package (a directory holding ``hypercolumn_ops`` with
its compiled extension, imported in a subprocess), for the cost of the sampling options to the
default path. Calls alternate between the methods, so that the load of a shared machine falls on
all of them alike.
"""

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SAMPLED = {"sampling_ratio": 2, "aligned": False, "padding": "zeros"}
DEFAULT = {"sampling_ratio": 1, "aligned": True, "padding": "zeros"}
MB = float(1 << 20)


def _call(method: str, options: Dict):
    """The callable of ``method`` ("fused" or "classify_then_sample") with ``options`` bound."""
    import hypercolumn_ops
    from hypercolumn_ops import baselines

    function = hypercolumn_ops.fused_hypercolumn if method == "fused" else baselines.classify_then_sample

    def call(*args, **kwargs):
        return function(*args, **kwargs, **options)

    return call


def _measure(method: str, options: Dict, mode: str, repeats: int) -> Dict:
    """Times one (method, options, mode) in this process: the median of ``repeats`` rounds of
    ``methods.time_calls``, each the median of its own repetitions."""
    import torch

    from methods import grad_output, run_once, time_calls
    from workloads import build

    inputs = build("sds", "cpu", torch.float32, requires_grad=True)
    gradient = grad_output(inputs.workload, torch.float32, "cpu")
    function = _call(method, options)
    medians, output = [], None
    for _ in range(repeats):
        timed = time_calls(lambda: run_once(function, inputs, mode, gradient), torch.device("cpu"), min_reps=5,
                           min_seconds=1.0, max_reps=20)
        medians.append(timed["median_ms"])
        output = timed["output"]
    medians.sort()
    return {"median_ms": medians[len(medians) // 2], "output": output}


def _subprocess(arguments: List[str], pythonpath: str = None) -> Dict:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    # The memory entry point frees what it built before the call: large blocks go back at once.
    env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    result = subprocess.run([sys.executable, os.path.abspath(__file__), *arguments], capture_output=True, text=True,
                            env=env, cwd="/" if pythonpath is not None else None)
    if result.returncode != 0:
        raise RuntimeError(f"{arguments}: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _entry(args) -> None:
    """``--memory`` and ``--time`` entry points: one measurement, printed as JSON."""
    sys.path.insert(0, HERE)
    options = json.loads(args.options)
    if args.memory:
        import torch

        from methods import grad_output, run_once
        from run import peak_rss_growth
        from workloads import build

        inputs = build("sds", "cpu", torch.float32, requires_grad=True)
        gradient = grad_output(inputs.workload, torch.float32, "cpu")
        function = _call(args.method, options)
        print(json.dumps({"peak_bytes": peak_rss_growth(lambda: run_once(function, inputs, args.mode, gradient))}))
        return
    import hypercolumn_ops

    timed = _measure(args.method, options, args.mode, args.repeats)
    print(json.dumps({"median_ms": timed["median_ms"], "module": hypercolumn_ops.__file__}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu", "sampling.md"))
    parser.add_argument("--before", help="a directory whose hypercolumn_ops is the build to compare with")
    parser.add_argument("--before-name", default="before", help="what the --before build is, for the table")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--time", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory or args.time:
        _entry(args)
        return

    sys.path.insert(0, HERE)
    import torch

    from methods import MODES
    from run import machine_info

    runs = [("classify_then_sample", SAMPLED), ("fused", SAMPLED), ("fused", DEFAULT)]
    rows = []
    for mode in MODES:
        timed = {}
        for round_index in range(args.repeats):  # alternate the methods, one round at a time
            for method, options in runs:
                key = (method, json.dumps(options))
                timed.setdefault(key, []).append(_measure(method, options, mode, 1))
        outputs = {key: values[-1]["output"] for key, values in timed.items()}
        difference = (outputs[("fused", json.dumps(SAMPLED))].double()
                      - outputs[("classify_then_sample", json.dumps(SAMPLED))].double()).abs().max().item()
        for method, options in runs:
            key = (method, json.dumps(options))
            times = sorted(value["median_ms"] for value in timed[key])
            memory = _subprocess(["--memory", "--method", method, "--mode", mode, "--options", json.dumps(options)])
            rows.append({"method": method, "options": options, "mode": mode, "median_ms": times[len(times) // 2],
                         "peak_bytes": memory["peak_bytes"], "max_difference": difference})
        if args.before:
            # The default sampling without naming it: a build from before the options takes only padding.
            options = {"padding": DEFAULT["padding"]}
            before = _subprocess(["--time", "--method", "fused", "--mode", mode, "--options", json.dumps(options),
                                  "--repeats", str(args.repeats)], pythonpath=args.before)
            assert before["module"].startswith(os.path.abspath(args.before)), before["module"]
            rows.append({"method": f"fused, {args.before_name}", "options": DEFAULT, "mode": mode,
                         "median_ms": before["median_ms"], "peak_bytes": None, "max_difference": None})
    info = machine_info(torch.device("cpu"))
    with open("/proc/loadavg") as loadavg:
        info["load_average"] = loadavg.read().split()[:3]
    text = markdown(rows, info, args)
    with open(args.out, "w") as file:
        file.write(text)
    print(text)


def markdown(rows: List[Dict], info: Dict, args) -> str:
    def options_text(options: Dict) -> str:
        return f"sampling_ratio={options['sampling_ratio']}, aligned={options['aligned']}"

    lines = ["# roi_align's sampling options on the CPU (sds)", "",
             "`benchmarks/sampling.py`: `fused_hypercolumn(..., sampling_ratio=2, aligned=False, "
             "padding=\"zeros\")` on the sds workload (100 boxes, 50 x 50 grids, K = 5, layers of 128, 512 "
             "and 4,096 channels at strides 4, 8 and 32 of a 512 x 512 image; float32) against "
             "`baselines.classify_then_sample` with the same options (1x1 convolutions, then "
             "`torchvision.ops.roi_align` of the score maps). Median wall time of "
             f"{args.repeats} rounds (each the median of 5-20 calls after two warm-up calls), the methods "
             "alternating; peak memory is the resident-set growth of a fresh process running only that "
             "call (the output included). The default sampling is timed beside them.", "",
             f"- Machine: {info['cpu']}, {info['cpu_count']} cores ({info['torch_threads']} torch threads), "
             f"shared; load average {', '.join(info['load_average'])} when written.",
             f"- Date: {info['date']}; torch {info['torch']}, torchvision {info['torchvision']}, "
             f"Python {info['python']}; package commit {info['hypercolumn_ops_commit']} plus the working tree.",
             ""]
    for mode in ("forward", "forward+backward"):
        mine = [row for row in rows if row["mode"] == mode]
        baseline = next(row for row in mine if row["method"] == "classify_then_sample")
        lines += [f"## {mode}", "", "| method | sampling | time ms | speed-up over the baseline | peak memory MB |",
                  "|---|---|---:|---:|---:|"]
        for row in mine:
            speedup = baseline["median_ms"] / row["median_ms"]
            memory = "" if row["peak_bytes"] is None else f"{row['peak_bytes'] / MB:.1f}"
            lines.append(f"| {row['method']} | {options_text(row['options'])} | {row['median_ms']:.1f} | "
                         f"{speedup:.1f}x | {memory} |")
        lines += ["", f"Largest |fused - baseline| of the outputs: {baseline['max_difference']:.2e} "
                      "(float32; outputs are O(1)).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
