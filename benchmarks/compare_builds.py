"""Times the native fused operators of two builds of the package against each other on the CPU.

    python benchmarks/compare_builds.py CHECKOUT_A CHECKOUT_B [--workloads sds boxes ...] [--rounds 2]

Each checkout holds an in-place build (``python setup.py build_ext --inplace``), for instance with
other compiler flags. The two run alternately in fresh processes, ``--rounds`` times each, so that
a noisy machine slows both alike; each process reports the median of 9 calls per workload and mode
(after 3 warm-up calls), and the table gives the median over rounds and B's time over A's.
``--clock process`` times the process's CPU time instead of wall time (with ``--threads 1``, the
work of one call whatever else the machine runs: a shared machine's wall times vary by tens of
percent between rounds).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_WORKLOADS = ("sds", "keypoints", "parts", "points", "points-sparse", "boxes")


def time_checkout(workloads, threads=None, clock="wall"):
    """In a child process: median ms per 'workload mode' of the package found first on sys.path."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    now = time.perf_counter if clock == "wall" else time.process_time

    import hypercolumn_ops
    from methods import FORWARD, FORWARD_BACKWARD, grad_output, run_once
    from workloads import build

    times = {}
    for name in workloads:
        inputs = build(name, "cpu", torch.float32, requires_grad=True)
        gradient = grad_output(inputs.workload, torch.float32, "cpu")
        function = getattr(hypercolumn_ops, inputs.workload.op)
        for mode in (FORWARD, FORWARD_BACKWARD):
            with hypercolumn_ops.use_backend("native"):
                for _ in range(3):
                    run_once(function, inputs, mode, gradient)
                samples = []
                for _ in range(9):
                    start = now()
                    run_once(function, inputs, mode, gradient)
                    samples.append(now() - start)
            times[f"{name} {mode}"] = statistics.median(samples) * 1e3
    return {"package": hypercolumn_ops.__file__, "times": times}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--workloads", nargs="+", default=list(DEFAULT_WORKLOADS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads in each process (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(time_checkout(args.workloads, args.threads, args.clock)))
        return
    runs = {args.a: [], args.b: []}
    for _ in range(args.rounds):
        for root in (args.a, args.b):
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(root), HERE]))
            options = ["--clock", args.clock] + (["--threads", str(args.threads)] if args.threads else [])
            child = subprocess.run([sys.executable, __file__, root, root, "--child", *options,
                                    "--workloads", *args.workloads],
                                   env=env, check=True, capture_output=True, text=True)
            result = json.loads(child.stdout.strip().splitlines()[-1])
            if not result["package"].startswith(os.path.abspath(root)):
                sys.exit(f"compare_builds: {root} imported {result['package']}")
            runs[root].append(result["times"])
    print("| workload, mode | A ms | B ms | B / A |\n|---|---:|---:|---:|")
    for key in runs[args.a][0]:
        a = statistics.median(r[key] for r in runs[args.a])
        b = statistics.median(r[key] for r in runs[args.b])
        print(f"| {key} | {a:.1f} | {b:.1f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
