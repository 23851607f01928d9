"""Times the native CPU kernels on the issue's workloads (float32, B = 1, image 512 x 512; layers
128 ch at stride 4, 512 at stride 8, 4096 at stride 32, NCHW contiguous).

    python benchmarks/profile_cpu.py [--threads 2] [--repeat 5] [--only sds,keypoints,points]

Prints the median forward and forward+backward time of each workload, with the per-layer order
the planner chose.
"""

import argparse
import statistics
import time

import torch

import hypercolumn_ops
from hypercolumn_ops import ops

IMAGE = (512, 512)
LAYERS = ((128, 4), (512, 8), (4096, 32))  # (channels, stride)


def feature_maps(generator, requires_grad):
    return [torch.randn(1, c, IMAGE[0] // s, IMAGE[1] // s, generator=generator).requires_grad_(requires_grad)
            for c, s in LAYERS]


def weights(generator, grid, outputs, requires_grad):
    return [(torch.randn(grid * grid, outputs, c, generator=generator) / c ** 0.5).requires_grad_(requires_grad)
            for c, _ in LAYERS]


def random_boxes(generator, count):
    side = torch.empty(count, 2).uniform_(32, 0.6 * IMAGE[0], generator=generator)
    corner = torch.rand(count, 2, generator=generator) * (torch.tensor(IMAGE[::-1], dtype=torch.float32) - side)
    return torch.cat([torch.zeros(count, 1), corner, corner + side], 1)


def workloads(generator, requires_grad):
    f = feature_maps(generator, requires_grad)
    sds_w = weights(generator, 5, 1, requires_grad)
    kp_w = weights(generator, 5, 17, requires_grad)
    pt_w = weights(generator, 1, 21, requires_grad)
    sds_boxes, kp_boxes = random_boxes(generator, 100), random_boxes(generator, 20)
    points = torch.cat([torch.zeros(19600, 1), torch.rand(19600, 2, generator=generator) * 512], 1)
    return {
        "sds": (lambda: hypercolumn_ops.fused_hypercolumn(f, sds_boxes, sds_w, output_size=(50, 50), image_size=IMAGE,
                                                          activation="sigmoid"),
                lambda: ops.normalise_fused_hypercolumn(f, sds_boxes, sds_w, output_size=(50, 50), image_size=IMAGE)),
        "keypoints": (lambda: hypercolumn_ops.fused_hypercolumn(f, kp_boxes, kp_w, output_size=(56, 56),
                                                                image_size=IMAGE),
                      lambda: ops.normalise_fused_hypercolumn(f, kp_boxes, kp_w, output_size=(56, 56),
                                                              image_size=IMAGE)),
        "points_sparse": (lambda: hypercolumn_ops.sparse_hypercolumn(f, points, image_size=IMAGE), None),
        "points_fused": (lambda: hypercolumn_ops.fused_hypercolumn_points(f, points, pt_w, image_size=IMAGE),
                         lambda: ops.normalise_fused_hypercolumn_points(f, points, pt_w, image_size=IMAGE)),
    }


def median_ms(function, repeat):
    """Median wall and CPU (all threads) milliseconds per call: on a shared machine the CPU time
    is the steadier figure of the two."""
    function()  # warm-up: first-touch of buffers, MKL initialisation
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return 1e3 * statistics.median(walls), 1e3 * statistics.median(cpus)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    only = set(filter(None, args.only.split(",")))
    forward = workloads(torch.Generator().manual_seed(0), False)
    training = workloads(torch.Generator().manual_seed(0), True)
    print(f"torch {torch.__version__}, {args.threads} threads")
    with hypercolumn_ops.use_backend("native"):
        for name, (call, normalise) in forward.items():
            if only and name not in only:
                continue
            orders = normalise()[-1] if normalise else "-"
            with torch.no_grad():
                fwd = median_ms(call, args.repeat)

            def step(call=training[name][0]):
                out = call()
                out.backward(torch.ones_like(out))

            both = median_ms(step, args.repeat)
            print(f"{name:14s} orders {orders}: forward {fwd[0]:7.1f} ms (cpu {fwd[1]:7.1f})   "
                  f"forward+backward {both[0]:7.1f} ms (cpu {both[1]:7.1f})")


if __name__ == "__main__":
    main()
