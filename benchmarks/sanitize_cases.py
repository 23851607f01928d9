"""Every CUDA kernel of the native backend once, on small inputs, for compute-sanitizer.

Run from the repository root: ``compute-sanitizer --tool memcheck python benchmarks/sanitize_cases.py``.
It calls every operator forward and backward with both evaluation orders, the atomic and the
deterministic backward (box grids gathered per pixel and sorted), float32 and float16 (wide
channels_last loads), both tiles of the fused kernel (M = 2 and M = 33), the projections of small
NCHW maps and their gradients (project_scores_in_kernels, project_grads_in_kernels), and rows
that must not be read: a batch index out of range, a non-integer one, a NaN coordinate, an
invalid label, points far outside the image, a batch of no images; and the value check
(`index_values_valid`) on batch-index columns read in place, labels, and an empty column. It
checks no values (the tests do); it exits 0 when every call returned.
"""

import torch

import hypercolumn_ops
from hypercolumn_ops import ops as public

IMAGE = (17, 21)


def inputs(dtype):
    g = torch.Generator().manual_seed(0)
    features = [
        # 70 channels: several channel blocks of the sampling kernels on NCHW maps (64 and 16).
        torch.randn(2, 70, 9, 11, generator=g).to(dtype).cuda(),
        torch.randn(2, 8, 5, 6, generator=g).to(dtype).cuda().contiguous(memory_format=torch.channels_last),
        torch.randn(2, 12, 3, 9, generator=g).to(dtype).cuda()[:, ::2, :, ::2],
    ]
    points = torch.tensor([[0, 3.0, 4.0], [1, 20.9, 16.9], [0, 0.0, 0.0], [1, -50.0, 80.0], [2, 1.0, 1.0],
                           [0.5, 1.0, 1.0], [0, float("nan"), 1.0], [1, 5.0, float("inf")]]).cuda()
    boxes = torch.tensor([[0, 1.0, 2.0, 15.0, 13.0], [1, -4.0, -3.0, 30.0, 25.0], [1, 9.0, 9.0, 2.0, 3.0],
                          [3, 1.0, 1.0, 5.0, 5.0]]).cuda()
    return [f.requires_grad_(True) for f in features], points, boxes


def backward(out, tensors):
    loss = torch.where(torch.isfinite(out), out, torch.zeros_like(out)).sum()
    torch.autograd.grad(loss, tensors, allow_unused=True)


def run_all(dtype):
    features, points, boxes = inputs(dtype)
    classes, grid, outputs = 3, 3, 2
    weights = [(0.1 * torch.randn(classes, grid * grid, outputs, f.shape[1])).to(dtype).cuda().requires_grad_(True)
               for f in features]
    bias = (0.1 * torch.randn(classes, grid * grid, outputs)).to(dtype).cuda().requires_grad_(True)
    point_labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 5]).cuda()
    box_labels = torch.tensor([2, 0, 7, 1]).cuda()
    locations = torch.rand(len(points), 2).cuda()
    tensors = features + weights + [bias]
    ops = torch.ops.hypercolumn_ops

    args = public.normalise_sparse_hypercolumn(features, points, image_size=IMAGE, padding="zeros")
    backward(ops.sparse_hypercolumn(*args), features)
    # A 4 x 5 grid and a 1 x 1 one: in deterministic mode, the first layer's backward gathers per
    # pixel for the first and sorts its taps for the second (more than 64 pixels per grid point).
    for output_size in ((4, 5), (1, 1)):
        args = public.normalise_box_hypercolumn(features, boxes, output_size, image_size=IMAGE)
        backward(ops.box_hypercolumn(*args), features)
    for order in (0, 1):
        args = list(public.normalise_fused_hypercolumn(features, boxes, weights, bias, output_size=(4, 5),
                                                       image_size=IMAGE, labels=box_labels, activation="sigmoid"))
        args[11] = [order] * len(features)  # the orders (csrc/ops.cpp)
        backward(ops.fused_hypercolumn(*args), tensors)
        args = list(public.normalise_fused_hypercolumn_points(features, points, weights, bias, locations=locations,
                                                              image_size=IMAGE, labels=point_labels,
                                                              padding="zeros"))
        args[10] = [order] * len(features)  # the orders (csrc/ops.cpp)
        backward(ops.fused_hypercolumn_points(*args), tensors)
        # 33 outputs: the wide tile of the fused kernel, with two output blocks.
        wide = [(0.1 * torch.randn(1, 33, f.shape[1])).to(dtype).cuda().requires_grad_(True) for f in features]
        args = list(public.normalise_fused_hypercolumn_points(features, points, wide, image_size=IMAGE))
        args[-1] = [order] * len(features)
        backward(ops.fused_hypercolumn_points(*args), features + wide)
    # 18 score channels of NCHW maps: the projections and their gradients in the package's kernels
    # (130 channels: two chunks; 2 x 99 pixels: two weight-gradient tiles).
    g = torch.Generator().manual_seed(1)
    maps = [torch.randn(2, 130, 9, 11, generator=g).to(dtype).cuda().requires_grad_(True), features[0]]
    small = [(0.1 * torch.randn(grid * grid, outputs, f.shape[1])).to(dtype).cuda().requires_grad_(True) for f in maps]
    args = list(public.normalise_fused_hypercolumn(maps, boxes, small, output_size=(4, 5), image_size=IMAGE))
    args[-1] = [1] * len(maps)
    backward(ops.fused_hypercolumn(*args), maps + small)
    # A batch of no images (B = 0): every row's batch index is invalid and the maps hold nothing.
    empty = [f.detach()[:0].requires_grad_(True) for f in features]
    plain = [(0.1 * torch.randn(grid * grid, outputs, f.shape[1])).to(dtype).cuda().requires_grad_(True)
             for f in features]
    args = public.normalise_sparse_hypercolumn(empty, points, image_size=IMAGE)
    backward(ops.sparse_hypercolumn(*args), empty)
    args = public.normalise_box_hypercolumn(empty, boxes, (4, 5), image_size=IMAGE)
    backward(ops.box_hypercolumn(*args), empty)
    for order in (0, 1):
        args = list(public.normalise_fused_hypercolumn(empty, boxes, plain, output_size=(4, 5), image_size=IMAGE))
        args[-1] = [order] * len(empty)
        backward(ops.fused_hypercolumn(*args), empty + plain)
        args = list(public.normalise_fused_hypercolumn_points(empty, points, plain, locations=locations,
                                                              image_size=IMAGE))
        args[-1] = [order] * len(empty)
        backward(ops.fused_hypercolumn_points(*args), empty + plain)


def run_index_checks():
    _, points, boxes = inputs(torch.float32)
    labels = torch.tensor([0, 2, 1, 7]).cuda()
    for values, size in ((points[:, 0], 2), (points[:, 0].double(), 2), (boxes[:, 0], 2), (labels, 3),
                         (points[:0, 0], 2)):
        torch.ops.hypercolumn_ops.index_values_valid(values, size)


def main():
    run_index_checks()
    hypercolumn_ops.set_value_checks(False)  # let the invalid rows reach the kernels
    for dtype in (torch.float32, torch.float16):
        run_all(dtype)
    torch.use_deterministic_algorithms(True)
    run_all(torch.float32)
    torch.use_deterministic_algorithms(False)
    torch.cuda.synchronize()
    print("sanitize_cases: every operator ran forward and backward")


if __name__ == "__main__":
    main()
