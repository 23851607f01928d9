"""Fixed per-call cost of the compiled CPU operators on tiny inputs, against torchvision's roi_align.

    python benchmarks/per_call_cpu.py [--repeats 15] [--calls 300] [--json OUT.json]

One thread (torch.set_num_threads(1)), float32: one 8-channel 8 x 8 layer of one image (an image
of 32 x 32 pixels, scale 0.25), one box with a 2 x 2 grid (box_hypercolumn; fused_hypercolumn with
K = 1 and 8 x 8 identity weights, which gives the same values; torchvision.ops.roi_align with
sampling_ratio=1, aligned=True, the same values again), and the 4 grid points as points
(sparse_hypercolumn). Each operator is called through torch.ops directly (no Python checks or
normalisation), forward under no_grad and forward+backward (autograd's backward of a sum). The
operators take turns within each repeat, so that a noisy machine slows them alike; each repeat
times `--calls` calls in the CPU time of the calling thread (time.thread_time: with one thread,
all of a call's work, and none of the time the scheduler gives other processes on a shared
machine), and the table gives the median over repeats in microseconds a call.

Runs against whichever hypercolumn_ops is found first on sys.path (PYTHONPATH=CHECKOUT to time
another build); the schema (scale_y/scale_x, or image_size/spatial_scale with sampling_ratio and
aligned) is read from the operator.
"""

import argparse
import json
import platform
import statistics
import time

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision)

import hypercolumn_ops

OPS = torch.ops.hypercolumn_ops
SCALE = 0.25
IMAGE = 32


def _new_schema() -> bool:
    names = [a.name for a in OPS.box_hypercolumn.default._schema.arguments]
    return "image_size" in names


def calls(requires_grad: bool):
    """name -> a function of no arguments that returns the output of one call."""
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(1, 8, 8, 8, generator=g).requires_grad_(requires_grad)
    boxes = torch.tensor([[0.0, 4.0, 6.0, 20.0, 18.0]])
    points = torch.tensor([[0.0, 8.0, 9.0], [0.0, 16.0, 9.0], [0.0, 8.0, 15.0], [0.0, 16.0, 15.0]])
    weights = [torch.eye(8).reshape(1, 1, 8, 8).requires_grad_(requires_grad)]
    features = [feature]
    if _new_schema():
        scales = ([], [SCALE])  # image_size, spatial_scale
        box_tail = (1, True)  # sampling_ratio, aligned
    else:
        scales = ([SCALE], [SCALE])  # scale_y, scale_x
        box_tail = ()
    return {
        "box_hypercolumn": lambda: OPS.box_hypercolumn(features, boxes, 2, 2, *scales, 0, *box_tail),
        "fused_hypercolumn": lambda: OPS.fused_hypercolumn(features, boxes, weights, None, None, 2, 2, *scales, 0, 0,
                                                           [0], *box_tail),
        "sparse_hypercolumn": lambda: OPS.sparse_hypercolumn(features, points, *scales, 0),
        "torchvision roi_align": lambda: torch.ops.torchvision.roi_align(feature, boxes, SCALE, 2, 2, 1, True),
    }


def check_same_values():
    """The operators compute the same samples (else the comparison would not be fair)."""
    with torch.no_grad():
        out = {name: run() for name, run in calls(False).items()}
    expected = out["torchvision roi_align"]
    torch.testing.assert_close(out["box_hypercolumn"], expected)
    torch.testing.assert_close(out["fused_hypercolumn"], expected)
    torch.testing.assert_close(out["sparse_hypercolumn"], expected.permute(0, 2, 3, 1).reshape(4, 8))


def time_all(repeats: int, count: int):
    """{mode: {name: [us per call, one per repeat]}}."""
    modes = {"forward": calls(False), "forward+backward": calls(True)}
    samples = {mode: {name: [] for name in fns} for mode, fns in modes.items()}
    for _ in range(repeats + 1):  # the first round warms up
        for mode, fns in modes.items():
            for name, run in fns.items():
                if mode == "forward":
                    with torch.no_grad():
                        start = time.thread_time()
                        for _ in range(count):
                            run()
                        elapsed = time.thread_time() - start
                else:
                    start = time.thread_time()
                    for _ in range(count):
                        run().sum().backward()
                    elapsed = time.thread_time() - start
                samples[mode][name].append(elapsed / count * 1e6)
    return {mode: {name: values[1:] for name, values in by_name.items()} for mode, by_name in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--json", help="also write the medians here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    check_same_values()
    samples = time_all(args.repeats, args.calls)
    medians = {mode: {name: statistics.median(values) for name, values in by_name.items()}
               for mode, by_name in samples.items()}
    print(f"hypercolumn_ops {hypercolumn_ops.__file__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"1 thread, median of {args.repeats} x {args.calls} calls, thread CPU us a call")
    print("| operator | forward us | forward / roi_align | forward+backward us | fwd+bwd / roi_align |")
    print("|---|---:|---:|---:|---:|")
    base = {mode: medians[mode]["torchvision roi_align"] for mode in medians}
    for name in medians["forward"]:
        f, fb = medians["forward"][name], medians["forward+backward"][name]
        print(f"| {name} | {f:.1f} | {f / base['forward']:.2f} | {fb:.1f} | {fb / base['forward+backward']:.2f} |")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"package": hypercolumn_ops.__file__, "medians": medians}, file, indent=1)


if __name__ == "__main__":
    main()
