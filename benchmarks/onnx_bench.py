"""ONNX Runtime (CPU provider) time of an exported fused forward against eager ``fused_hypercolumn``
and against ``classify_then_sample`` (``hypercolumn_ops.baselines``) exported the same way, in one
run on this machine.

    python benchmarks/onnx_bench.py                       # sds, 2 threads
    python benchmarks/onnx_bench.py --workload keypoints --threads 1 --out /tmp/onnx

Each model holds the workload's weights and bias and takes its maps and boxes as inputs (the box
count dynamic); it is exported with ``torch.onnx.export(dynamo=True)``, the fused operator through
``hypercolumn_ops.onnx``, ``classify_then_sample`` through the exporter's own translations of
``conv2d`` and ``torchvision::roi_align`` (ONNX ``RoiAlign``). Every method runs forward only, the
median of its calls after two warm-ups (``methods.time_calls``), with the same number of threads
for torch and ONNX Runtime. The outputs are checked against the float64 reference. Writes
``onnx.json`` and ``onnx.md`` into ``--out`` and prints the table.
"""

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import hypercolumn_ops  # noqa: E402
from hypercolumn_ops import baselines  # noqa: E402
from methods import time_calls  # noqa: E402
from run import machine_info  # noqa: E402
from workloads import WORKLOADS, build  # noqa: E402

CPU = torch.device("cpu")


class WorkloadModel(nn.Module):
    """``function(features, boxes, weights, bias, **kwargs)`` with the workload's weights and bias
    as parameters: ``forward(features, boxes) -> (R, M, oh, ow)``."""

    def __init__(self, function: Callable, inputs, kwargs: dict):
        super().__init__()
        self.function, self.kwargs = function, kwargs
        self.weight = nn.ParameterList([nn.Parameter(w.detach()) for w in inputs.weights])
        self.bias = nn.Parameter(inputs.bias.detach())

    def forward(self, features, boxes):
        return self.function(features, boxes, list(self.weight), self.bias, **self.kwargs)


def exported_session(model: nn.Module, inputs, threads: int, use_package_translations: bool):
    """(ONNX Runtime session, seconds to export) of ``model`` with a dynamic box count."""
    import onnxruntime

    import hypercolumn_ops.onnx as hc_onnx

    arguments = (list(inputs.features), inputs.rows)
    shapes = {"features": [None] * len(inputs.features), "boxes": {0: torch.export.Dim("boxes")}}
    begin = time.perf_counter()
    export = hc_onnx.export if use_package_translations else torch.onnx.export
    program = export(model, arguments, dynamic_shapes=shapes)
    seconds = time.perf_counter() - begin
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    return session, seconds


def ort_call(session, inputs) -> Callable[[], torch.Tensor]:
    names = [i.name for i in session.get_inputs()]
    feed = dict(zip(names, [t.detach().numpy() for t in (*inputs.features, inputs.rows)]))
    return lambda: torch.from_numpy(session.run(None, feed)[0])


def relative_error(output: torch.Tensor, truth: torch.Tensor) -> float:
    return float((output.double() - truth).abs().max() / truth.abs().max())


def measure(workload_name: str, threads: int, min_reps: int, min_seconds: float) -> Dict:
    torch.set_num_threads(threads)
    inputs = build(workload_name, CPU, torch.float32)
    workload = inputs.workload
    if workload.op != "fused_hypercolumn":
        raise SystemExit(f"--workload: {workload_name} calls {workload.op}; this benchmark times fused_hypercolumn")
    args, kwargs = inputs.call_args()
    with torch.no_grad(), hypercolumn_ops.use_backend("reference"):
        truth = hypercolumn_ops.fused_hypercolumn(
            [f.double() for f in inputs.features], inputs.rows.double(), [w.double() for w in inputs.weights],
            inputs.bias.double(), **kwargs)
    fused = WorkloadModel(hypercolumn_ops.fused_hypercolumn, inputs, kwargs).eval()
    # classify_then_sample implements padding "zeros" only; the workload's boxes lie inside the
    # image, where both paddings give the same values (baselines' docstring).
    baseline = WorkloadModel(baselines.classify_then_sample, inputs, kwargs).eval()
    methods, export_seconds = {}, {}
    with torch.no_grad():
        methods["eager fused_hypercolumn (native)"] = lambda: fused(inputs.features, inputs.rows)
        session, export_seconds["ONNX Runtime, exported fused_hypercolumn"] = exported_session(
            fused, inputs, threads, True)
        methods["ONNX Runtime, exported fused_hypercolumn"] = ort_call(session, inputs)
        session, export_seconds["ONNX Runtime, exported classify_then_sample"] = exported_session(
            baseline, inputs, threads, False)
        methods["ONNX Runtime, exported classify_then_sample"] = ort_call(session, inputs)
        methods["eager classify_then_sample"] = lambda: baseline(inputs.features, inputs.rows)
        rows = []
        for name, call in methods.items():
            timing = time_calls(call, CPU, min_reps, min_seconds, max_reps=100)
            rows.append({"method": name, "median_ms": timing["median_ms"], "times_ms": timing["times_ms"],
                         "relative_error": relative_error(timing["output"], truth),
                         "export_s": export_seconds.get(name)})
    reference_ms = rows[0]["median_ms"]
    for row in rows:
        row["vs_eager_fused"] = row["median_ms"] / reference_ms
    return {"workload": workload_name, "threads": threads, "rows": rows}


def versions() -> Dict:
    import onnx
    import onnxruntime
    import onnxscript

    return {"onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


def markdown(report: Dict) -> str:
    machine = report["machine"]
    workload = WORKLOADS[report["workload"]]
    lines = [
        f"# ONNX Runtime against eager: `{report['workload']}` forward\n",
        f"{workload.count} boxes, {workload.output_size[0]} x {workload.output_size[1]} grid, K = {workload.grid}, "
        f"M = {workload.outputs}, image {workload.image[0]} x {workload.image[1]}, three layers (128 ch at stride 4, "
        f"512 at 8, 4096 at 32), float32, batch 1. Median of at least {report['settings']['min_reps']} forward calls "
        f"after two warm-ups, {report['threads']} threads for torch and ONNX Runtime (CPU provider); error is the "
        "largest difference from the float64 reference over its largest magnitude.\n",
        "| method | forward ms | time / eager fused | relative error | export s |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        export = "" if row["export_s"] is None else f"{row['export_s']:.1f}"
        lines.append(f"| {row['method']} | {row['median_ms']:.3g} | {row['vs_eager_fused']:.2f}x | "
                     f"{row['relative_error']:.1e} | {export} |")
    lines.append("")
    lines.append("The methods run one after another in one process, while other processes load the machine "
                 f"(1-minute load average {report['load_average'][0]:.1f} before the run, "
                 f"{report['load_average'][1]:.1f} after): compare times within one run.")
    lines.append("")
    lines.append(f"{machine['date']}; {machine['cpu']} ({machine['cpu_count']} cores); torch {machine['torch']}, "
                 f"torchvision {machine['torchvision']}, onnx {report['versions']['onnx']}, onnxscript "
                 f"{report['versions']['onnxscript']}, onnxruntime {report['versions']['onnxruntime']}; "
                 f"hypercolumn_ops {machine['hypercolumn_ops_commit']}. "
                 f"`{' '.join(['python benchmarks/onnx_bench.py'] + report['argv'])}`.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="sds", choices=[n for n, w in WORKLOADS.items()
                                                              if w.op == "fused_hypercolumn"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-reps", type=int, default=10)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    report = measure(args.workload, args.threads, args.min_reps, args.min_seconds)
    report.update(machine=machine_info(CPU), versions=versions(), argv=list(argv if argv is not None else sys.argv[1:]),
                  settings={"min_reps": args.min_reps, "min_seconds": args.min_seconds},
                  load_average=[load_before, os.getloadavg()[0]])
    text = markdown(report)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "onnx.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    with open(os.path.join(args.out, "onnx.md"), "w") as handle:
        handle.write(text)
    return report


if __name__ == "__main__":
    main()
