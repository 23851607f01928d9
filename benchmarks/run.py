"""Benchmark hypercolumn_ops against its baselines on the workloads of ``workloads.py``.

    python benchmarks/run.py                      # CPU, the quick set (a few minutes on 2 cores)
    python benchmarks/run.py --full               # every workload, method and mode
    python benchmarks/run.py --device cuda --dtype bfloat16 --workloads sds keypoints
    python benchmarks/run.py --full --out benchmarks/results/cpu

For every workload, method (baselines, then ``fused/<backend>`` for each backend available on the
device) and mode (forward under ``torch.no_grad()``, forward+backward into features, weights and
bias) it records: the median time after warm-up; the peak memory of the call (CUDA:
``torch.cuda.max_memory_allocated`` over the call; CPU: the peak resident-set growth of a fresh
process running only that call); the relative error against the float64 reference; the speed-up
of the best fused backend over each baseline; and the evaluation order ``planning.plan_layers``
chose for each layer. A baseline that would need more memory than is free is skipped, not run.
Writes ``results.json``, ``results.md`` and ``results.png`` into ``--out`` and prints the table.

This script benchmarks the ``hypercolumn_ops`` of the checkout it lives in.
"""

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import hypercolumn_ops  # noqa: E402
from hypercolumn_ops import planning, reference  # noqa: E402
from methods import (ALL_MODES, DETERMINISTIC, FORWARD, FORWARD_BACKWARD, FUSED_PREFIX, MODES,  # noqa: E402
                     available_bytes, cuda_peak_bytes, estimated_bytes, fused_backends, grad_output,
                     method_function, method_names, run_once, time_calls)
from summary import significant  # noqa: E402
from workloads import SAMPLING_OPS, WORKLOADS, Inputs, Workload, build  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}

QUICK_WORKLOADS = ("sds-small", "sds", "keypoints", "parts", "points", "points-sparse", "boxes")
# The baselines the CPU quick set runs (the fused backends always run). On 2 shared cores the
# others take from half a minute to minutes per call (naive forward on sds-small ~7-10 s,
# roi_align_concat forward+backward on sds-small ~25 s, forward on sds ~25 s) and each is called
# at least eight times (warm-up, repetitions, memory). --full runs them all; so does CUDA.
QUICK_CPU_BASELINES: Dict[str, Dict[str, tuple]] = {
    "sds-small": {"naive": (FORWARD,), "roi_align_concat": (FORWARD,), "classify_then_sample": MODES},
    "sds": {"classify_then_sample": MODES},
    "keypoints": {"classify_then_sample": MODES},
    "parts": {"classify_then_sample": MODES},
    "points": {"grid_sample": MODES},
    "points-sparse": {"grid_sample": MODES},
    "boxes": {"naive": (FORWARD,), "roi_align_concat": MODES},
}
# A GPU call takes milliseconds: 10+ repetitions in 0.2 s are stable, and keep the whole CUDA
# quick set within the minute that benchmarks/gpu_check.sh gives it. On the CPU a call that maps
# hundreds of MB (points-sparse: 371 MB of output and as much gradient) can stay slow for a call
# or two after the warm-up (550 and 360 ms, then 150): five repetitions keep two such outliers
# out of the median.
REPETITIONS = {"quick": dict(min_reps=5, min_seconds=1.0, max_reps=20),
               "quick-cuda": dict(min_reps=10, min_seconds=0.2, max_reps=50),
               "full": dict(min_reps=5, min_seconds=3.0, max_reps=50)}
# A baseline runs only if its estimated peak fits in this share of the free memory.
MEMORY_HEADROOM = 0.8
# Grid points (or points) on which each output is compared with the float64 reference; the
# reference gathers whole hypercolumns, so it is run on a sample rather than all of them.
ERROR_SAMPLE = 4096
GIB = float(1 << 30)
MIB = float(1 << 20)


# ----------------------------------------------------------------------------- machine


def machine_info(device: torch.device) -> Dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import torchvision
        torchvision_version = torchvision.__version__
    except ImportError:
        torchvision_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
        if hasattr(os, "sysconf") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision_version,
        "triton": triton_version,
        "hypercolumn_ops_commit": commit,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ----------------------------------------------------------------------------- measurements


def peak_rss_growth(call) -> int:
    """Peak resident-set growth (bytes) of this process during ``call``.

    Linux: reset the high-water mark (``/proc/self/clear_refs``), then VmHWM - VmRSS. Elsewhere:
    the growth of ``ru_maxrss``, which only sees a call that exceeds the process's earlier peak.
    """
    def status_kib(field: str) -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        before = status_kib("VmRSS")
        call()
        return (status_kib("VmHWM") - before) * 1024
    except OSError:
        import resource
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        call()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * scale


def measure_memory_here(workload_name: str, method: str, mode: str, dtype: torch.dtype) -> Dict:
    """The ``--measure-memory`` entry point: this fresh process runs only the one call."""
    inputs = build(workload_name, "cpu", dtype, requires_grad=True)
    gradient = grad_output(inputs.workload, dtype, "cpu")
    function = method_function(inputs.workload.op, method)
    return {"peak_bytes": peak_rss_growth(lambda: run_once(function, inputs, mode, gradient))}


def measure_memory_in_subprocess(workload_name: str, method: str, mode: str, dtype_name: str) -> Dict:
    return memory_in_fresh_process([os.path.abspath(__file__), "--measure-memory", workload_name, method, mode,
                                    "--dtype", dtype_name])


def memory_in_fresh_process(arguments: List[str]) -> Dict:
    """Runs ``python ARGUMENTS`` (a script's ``--measure-memory`` entry point, which prints
    ``{"peak_bytes": ...}`` as its last line) and returns that dict, or ``{"error": ...}``."""
    # A fixed malloc mmap threshold makes freed large blocks go back to the system at once, so
    # that memory freed while the inputs were built is not silently reused by the call.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    result = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout or "").strip().splitlines()
        return {"error": f"memory process exited with {result.returncode}: {lines[-1] if lines else ''}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def reference_sample(inputs: Inputs, count: int = ERROR_SAMPLE):
    """The float64 reference at a seeded sample of ``count`` grid points (or points): the sample's
    indices into the flattened output rows and the reference rows ``(count, M or sum C_l)``.

    Box grids go through ``fused_hypercolumn_points`` with each grid point's place ``(u, v)`` in
    its box, which ``docs/semantics.md`` makes equal to ``fused_hypercolumn`` at that point.
    """
    workload = inputs.workload
    features = [f.detach().double() for f in inputs.features]
    rows = inputs.rows.double()
    locations = None
    if workload.output_size is None:
        points = rows
    else:
        batch, x, y, u, v = reference.box_grid_points(rows, *workload.output_size)
        points = torch.stack([batch, x, y], dim=1)
        locations = torch.stack([u, v], dim=1)
    generator = torch.Generator().manual_seed(99)
    index = torch.randperm(points.shape[0], generator=generator)[:count].sort().values.to(points.device)
    with torch.no_grad(), hypercolumn_ops.use_backend("reference"):
        if workload.op in SAMPLING_OPS:
            ref = hypercolumn_ops.sparse_hypercolumn(features, points[index], image_size=workload.image)
        else:
            ref = hypercolumn_ops.fused_hypercolumn_points(
                features, points[index], [w.detach().double() for w in inputs.weights], inputs.bias.detach().double(),
                locations=None if workload.grid == 1 else locations[index], image_size=workload.image)
    return index, ref


def relative_error(workload: Workload, output: torch.Tensor, sample) -> float:
    """``||out - ref|| / ||ref||`` (2-norms) over the sampled rows."""
    index, ref = sample
    rows = output.detach()
    if workload.output_size is not None:
        rows = rows.permute(0, 2, 3, 1).reshape(-1, rows.shape[1])
    difference = rows[index].double() - ref
    return float(difference.norm() / ref.norm())


def layer_plans(workload: Workload, device: torch.device) -> List[Dict]:
    """The evaluation order ``planning.plan_layers`` picks for each layer, with its two costs."""
    if workload.op in SAMPLING_OPS:
        return []
    shapes = workload.feature_shapes()
    plans = planning.plan_layers(shapes, workload.num_points, 1, workload.cells, workload.outputs, device.type)
    described = []
    for (_, channels, height, width), plan in zip(shapes, plans):
        cheaper, dearer = sorted((plan.sample_cost, plan.project_cost))
        described.append({
            "layer": f"{channels} ch, {height}x{width}",
            "order": plan.name,
            "sample_cost": plan.sample_cost,
            "project_cost": plan.project_cost,
            "why": f"{plan.name} is {dearer / cheaper:.1f}x cheaper" if cheaper > 0 else "equal costs",
        })
    return described


# ----------------------------------------------------------------------------- the run


def selected_modes(workload: str, method: str, device: torch.device, full: bool) -> tuple:
    if method.startswith(FUSED_PREFIX):
        return ALL_MODES if device.type == "cuda" else MODES
    if full or device.type == "cuda":
        return MODES
    return QUICK_CPU_BASELINES.get(workload, {}).get(method, ())


def _not_run_status(method: str, mode: str, device: torch.device) -> str:
    if mode == DETERMINISTIC:
        return "-" if device.type == "cuda" else "CUDA only"
    return "not in the quick set"


def _first_sentence(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].split(". ")[0][:200]


def run_case(inputs: Inputs, method: str, mode: str, device: torch.device, dtype_name: str,
             repetitions: Dict, gradient: torch.Tensor) -> Dict:
    """Time and memory of one (workload, method, mode); a ``status`` other than "ok" says why not."""
    workload = inputs.workload
    needed = estimated_bytes(workload, method, mode)
    if needed > MEMORY_HEADROOM * available_bytes(device):
        return {"status": f"skipped: needs {needed / GIB:.1f} GB"}
    function = method_function(workload.op, method)
    try:
        timing = time_calls(lambda: run_once(function, inputs, mode, gradient), device, **repetitions)
    except NotImplementedError as error:
        return {"status": "unavailable", "detail": _first_sentence(error)}
    except (RuntimeError, MemoryError) as error:
        return {"status": "failed", "detail": _first_sentence(error)}
    result = {"status": "ok", "median_ms": timing["median_ms"], "times_ms": timing["times_ms"],
              "output": timing["output"]}
    if device.type == "cuda":
        result["host_times_ms"] = timing["host_times_ms"]
        result["peak_bytes"] = cuda_peak_bytes(lambda: run_once(function, inputs, mode, gradient), device)
    else:
        memory = measure_memory_in_subprocess(workload.name, method, mode, dtype_name)
        if "error" in memory:
            result["memory_detail"] = memory["error"]
        else:
            result["peak_bytes"] = memory["peak_bytes"]
    return result


def feature_copy(inputs: Inputs, device: torch.device, repetitions: Dict) -> Dict:
    """Median time of one device-to-device copy of the workload's feature maps into buffers made
    beforehand: the bytes every method must read once, read and written (the stretch floor)."""
    sources = [feature.detach() for feature in inputs.features]
    copies = [torch.empty_like(feature) for feature in sources]

    def copy_all():
        for copy, source in zip(copies, sources):
            copy.copy_(source)
        return copies[-1]

    timing = time_calls(copy_all, device, **repetitions)
    moved = 2 * sum(source.numel() * source.element_size() for source in sources)
    return {"median_ms": timing["median_ms"], "bytes": moved,
            "bandwidth_gbs": moved / (timing["median_ms"] * 1e-3) / 1e9}


def add_speedups(rows: List[Dict]) -> None:
    """Speed-up of the fastest fused backend over each method, per workload and mode."""
    for mode in MODES:
        best: Dict[str, float] = {}
        for row in rows:
            case = row["modes"][mode]
            if row["method"].startswith(FUSED_PREFIX) and case.get("status") == "ok":
                best[row["workload"]] = min(best.get(row["workload"], math.inf), case["median_ms"])
        for row in rows:
            case = row["modes"][mode]
            if row["workload"] in best and case.get("status") == "ok":
                case["best_fused_speedup"] = case["median_ms"] / best[row["workload"]]


def run(args, checkpoint: Optional[Callable[[Dict], None]] = None) -> Dict:
    """Every selected case; ``checkpoint`` (if given) receives the report so far after each
    workload, so that a run cut short still leaves its finished workloads behind."""
    from tqdm import tqdm

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    backends = args.backends if args.backends is not None else fused_backends(args.device)
    names = args.workloads or (list(WORKLOADS) if args.full else list(QUICK_WORKLOADS))
    repetitions = REPETITIONS["full" if args.full else "quick-cuda" if device.type == "cuda" else "quick"]
    plan = [(name, method) for name in names for method in method_names(WORKLOADS[name].op, backends)]
    rows, plans, copies = [], {}, {}
    settings = {"device": args.device, "dtype": args.dtype, "set": "full" if args.full else "quick",
                "workloads": names, "backends": backends, "repetitions": repetitions, "error_sample": ERROR_SAMPLE,
                "memory": "torch.cuda.max_memory_allocated over the call" if device.type == "cuda"
                else "peak resident-set growth of a fresh process running only the call"}
    progress = tqdm(total=len(plan) * len(ALL_MODES), unit="case", file=sys.stderr)
    for name in names:
        inputs = build(name, device, dtype, requires_grad=True)
        workload = inputs.workload
        gradient = grad_output(workload, dtype, device)
        sample = reference_sample(inputs)
        plans[name] = layer_plans(workload, device)
        if device.type == "cuda":
            copies[name] = feature_copy(inputs, device, repetitions)
        for method in method_names(workload.op, backends):
            row = {"workload": name, "op": workload.op, "method": method, "modes": {}}
            for mode in ALL_MODES:
                progress.set_description(f"{name} {method} {mode}")
                if mode not in selected_modes(name, method, device, args.full):
                    row["modes"][mode] = {"status": _not_run_status(method, mode, device)}
                else:
                    row["modes"][mode] = run_case(inputs, method, mode, device, args.dtype, repetitions, gradient)
                output = row["modes"][mode].pop("output", None)
                if output is not None and "relative_error" not in row:
                    row["relative_error"] = relative_error(workload, output, sample)
                progress.update()
            rows.append(row)
        del inputs
        add_speedups(rows)
        if checkpoint is not None:
            checkpoint(_report(device, settings, list(plans), rows, plans, copies))
    progress.close()
    return _report(device, settings, names, rows, plans, copies)


def _report(device: torch.device, settings: Dict, names: List[str], rows: List[Dict], plans: Dict,
            copies: Dict) -> Dict:
    return {
        "machine": machine_info(device),
        "settings": dict(settings, workloads=names),
        "workloads": {name: {"op": WORKLOADS[name].op, "image": WORKLOADS[name].image,
                             "count": WORKLOADS[name].count, "K": WORKLOADS[name].grid,
                             "M": WORKLOADS[name].outputs, "output_size": WORKLOADS[name].output_size,
                             "layers": WORKLOADS[name].feature_shapes()} for name in names},
        "results": rows,
        "plans": plans,
        "feature_copy": copies,
    }


# ----------------------------------------------------------------------------- reports


def _cell(case: Dict, key: str, scale: float = 1.0, digits: Optional[int] = None) -> str:
    """``case[key] / scale`` with ``digits`` decimals (default: three significant digits)."""
    if case.get("status") != "ok":
        return case.get("status", "")
    value = case.get(key)
    if value is None:
        return "n/a"
    return significant(value / scale) if digits is None else f"{value / scale:.{digits}f}"


def _backward_ratio(forward: Dict, both: Dict, deterministic: Dict) -> str:
    """Deterministic over default backward time, each taken as forward+backward minus forward."""
    if not all(case.get("status") == "ok" for case in (forward, both, deterministic)):
        return ""
    default = both["median_ms"] - forward["median_ms"]
    if default <= 0:
        return "n/a"
    return f"{(deterministic['median_ms'] - forward['median_ms']) / default:.2f}"


def markdown(report: Dict) -> str:
    machine, settings = report["machine"], report["settings"]
    lines = [
        f"# hypercolumn_ops benchmarks: {settings['device']}, {settings['dtype']}, {settings['set']} set",
        "",
        f"- Machine: {machine['cpu']}, {machine['cpu_count']} logical cores, {machine['torch_threads']} torch "
        f"threads, {machine['memory_gib']} GiB" + (f"; GPU {machine['gpu']}" if "gpu" in machine else ""),
        f"- Date: {machine['date']}; Python {machine['python']}, torch {machine['torch']}, torchvision "
        f"{machine['torchvision']}, triton {machine['triton']}; "
        f"hypercolumn_ops commit {machine['hypercolumn_ops_commit']}",
        f"- Fused backends timed: {', '.join(settings['backends']) or 'none available'}",
        f"- Time: median ms after warm-up ({settings['repetitions']['min_reps']}+ repetitions). Memory: "
        f"{settings['memory']}, MB. Error: ||out - ref|| / ||ref|| against the float64 reference on "
        f"{settings['error_sample']} sampled grid points (or points). Speed-up: the method's time over the "
        f"fastest fused backend's.",
    ]
    deterministic = settings["device"].startswith("cuda")
    if deterministic:
        lines.append("- Deterministic: forward+backward under torch.use_deterministic_algorithms(True) (the "
                     "package's backends only); det./default bwd = (det. fwd+bwd - fwd) / (fwd+bwd - fwd).")
    lines.append("")
    header = ("| workload | method | fwd ms | fwd+bwd ms | fwd MB | fwd+bwd MB | rel. error | fused speed-up fwd "
              "| fused speed-up fwd+bwd |")
    rule = "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    if deterministic:
        header += " det. fwd+bwd ms | det./default bwd |"
        rule += "---:|---:|"
    lines += [header, rule]
    for row in report["results"]:
        forward, both = row["modes"][FORWARD], row["modes"][FORWARD_BACKWARD]
        error = row.get("relative_error")
        cells = [
            f"| {row['workload']}", row["method"], _cell(forward, "median_ms"), _cell(both, "median_ms"),
            _cell(forward, "peak_bytes", MIB, 0), _cell(both, "peak_bytes", MIB, 0),
            "" if error is None else f"{error:.1e}",
            _cell(forward, "best_fused_speedup", digits=2) if "best_fused_speedup" in forward else "",
            _cell(both, "best_fused_speedup", digits=2) if "best_fused_speedup" in both else ""]
        if deterministic:
            det = row["modes"].get(DETERMINISTIC, {})
            cells += [_cell(det, "median_ms"), _backward_ratio(forward, both, det)]
        lines.append(" | ".join(cells) + " |")
    details = [f"- {row['workload']} {row['method']} {mode}: {case['detail']}"
               for row in report["results"] for mode, case in row["modes"].items() if "detail" in case]
    details += [f"- {row['workload']} {row['method']} {mode}: {case['memory_detail']}"
                for row in report["results"] for mode, case in row["modes"].items() if "memory_detail" in case]
    if details:
        lines += ["", "Details:", ""] + details
    if report.get("feature_copy"):
        lines += ["", "## Forward against one copy of the feature maps", "",
                  "One device-to-device copy of the workload's feature maps (read once, written once): the bytes "
                  "every method must read. Ratio: the fastest fused backend's forward time over the copy's.", "",
                  "| workload | copy ms | copy GB/s | fastest fused fwd ms | fused fwd / copy |",
                  "|---|---:|---:|---:|---:|"]
        for name, copy in report["feature_copy"].items():
            fused = [row["modes"][FORWARD]["median_ms"] for row in report["results"]
                     if row["workload"] == name and row["method"].startswith(FUSED_PREFIX)
                     and row["modes"][FORWARD].get("status") == "ok"]
            best = f"{significant(min(fused))} | {min(fused) / copy['median_ms']:.1f}" if fused else "| "
            lines.append(f"| {name} | {significant(copy['median_ms'])} | {copy['bandwidth_gbs']:.0f} | {best} |")
    lines += ["", "## Evaluation order per layer (hypercolumn_ops.planning.plan_layers)", "",
              "Costs in gather-equivalent multiply-adds (see planning.py).", "",
              "| workload | layer | order | sample-features cost | project-scores cost | why |",
              "|---|---|---|---:|---:|---|"]
    for name, layer_list in report["plans"].items():
        for layer in layer_list:
            lines.append(f"| {name} | {layer['layer']} | {layer['order']} | {layer['sample_cost']:.3g} | "
                         f"{layer['project_cost']:.3g} | {layer['why']} |")
    return "\n".join(lines) + "\n"


def chart(report: Dict, path: str) -> None:
    """Grouped bars, log scale: time and memory per method per workload, both modes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    workloads = list(dict.fromkeys(row["workload"] for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    panels = [("median_ms", FORWARD, "forward time (ms)"),
              ("median_ms", FORWARD_BACKWARD, "forward+backward time (ms)"),
              ("peak_bytes", FORWARD, "forward peak memory (MB)"),
              ("peak_bytes", FORWARD_BACKWARD, "forward+backward peak memory (MB)")]
    figure, axes = plt.subplots(2, 2, figsize=(14, 9))
    width = 0.8 / max(len(methods), 1)
    for axis, (key, mode, title) in zip(axes.flat, panels):
        scale = MIB if key == "peak_bytes" else 1.0
        for position, method in enumerate(methods):
            values = []
            for name in workloads:
                case = next((r["modes"][mode] for r in rows if r["workload"] == name and r["method"] == method), {})
                value = case.get(key) if case.get("status") == "ok" else None
                values.append(math.nan if value is None else max(value / scale, 1e-3))
            axis.bar([i + (position - (len(methods) - 1) / 2) * width for i in range(len(workloads))], values,
                     width, label=method)
        axis.set_yscale("log")
        axis.set_title(title)
        axis.set_xticks(range(len(workloads)))
        axis.set_xticklabels(workloads)
    axes.flat[0].legend(fontsize="small")
    settings = report["settings"]
    figure.suptitle(f"hypercolumn_ops, {settings['device']} {settings['dtype']} ({report['machine']['cpu']}); "
                    "missing bar = skipped, unavailable or not run")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS),
                        help=f"default: {' '.join(QUICK_WORKLOADS)} (with --full: all)")
    parser.add_argument("--full", action="store_true",
                        help="every workload, every baseline in both modes, more repetitions")
    parser.add_argument("--backends", nargs="*",
                        help="fused backends to time (default: all available on the device but reference)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out"), help="output folder")
    parser.add_argument("--measure-memory", nargs=3, metavar=("WORKLOAD", "METHOD", "MODE"),
                        help="internal: print the peak memory of one CPU call, in this fresh process")
    args = parser.parse_args(argv)
    if args.measure_memory:
        workload_name, method, mode = args.measure_memory
        print(json.dumps(measure_memory_here(workload_name, method, mode, DTYPES[args.dtype])))
        return
    os.makedirs(args.out, exist_ok=True)

    def write(report: Dict) -> str:
        # Written beside, then renamed: a step stopped by its time limit mid-write leaves the
        # previous complete file, never a truncated one.
        path = os.path.join(args.out, "results.json")
        with open(path + ".partial", "w") as file:
            json.dump(report, file, indent=1)
        os.replace(path + ".partial", path)
        text = markdown(report)
        with open(os.path.join(args.out, "results.md"), "w") as file:
            file.write(text)
        return text

    report = run(args, checkpoint=write)
    text = write(report)
    chart(report, os.path.join(args.out, "results.png"))
    print(text)
    print(f"Wrote results.json, results.md and results.png to {args.out}")


if __name__ == "__main__":
    main()
