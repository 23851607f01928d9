"""Drop-in parity with the stock operators (``docs/equivalences.md``): each row of that table, the
hypercolumn_ops call against the torchvision / PyTorch call it reproduces, on random cases in
float64 (forward and gradients), boxes and points inside, across and outside the image,
zero-size boxes, empty inputs; on every backend that runs on the CPU here (the compiled CUDA
kernels run the same checks under tests/test_cuda_emulated.py)."""

import itertools
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision

import hypercolumn_ops
from hypercolumn_ops.nn import HypercolumnHead

BACKENDS = hypercolumn_ops.available_backends("cpu")
# Both sides compute the same sums in float64; they differ in the order of a handful of roundings
# of values near 1 (torchvision scales the box corners, we scale the sample positions).
TOL = dict(rtol=1e-10, atol=1e-10)


def random_boxes(count, generator, batch=2, extent=60.0, reversed_boxes=True):
    """Boxes ``(R, 5)`` inside, across and outside a ~40 x 40 image, with zero-width, zero-height
    and (when ``reversed_boxes``) x2 < x1 boxes."""
    g = generator
    corners = torch.rand(count, 4, generator=g, dtype=torch.float64) * extent - extent / 4
    ordered = torch.cat([torch.minimum(corners[:, :2], corners[:, 2:]), torch.maximum(corners[:, :2], corners[:, 2:])],
                        dim=1)
    ordered[0, 2] = ordered[0, 0]  # zero width
    ordered[1, 3] = ordered[1, 1]  # zero height
    ordered[2, 2:] = ordered[2, :2]  # a point
    ordered[3] = torch.tensor([-30.0, -25.0, -12.0, -3.0])  # wholly outside
    if reversed_boxes:
        ordered[4] = ordered[4, [2, 3, 0, 1]]
    batch_index = torch.randint(0, batch, (count, 1), generator=g).double()
    return torch.cat([batch_index, ordered], dim=1)


def grads_of(out, inputs, probe):
    return torch.autograd.grad(out, inputs, probe)


SAMPLING = list(itertools.product([True, False], [1, 2, 3, 0, -1]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aligned, sampling_ratio", SAMPLING)
def test_box_hypercolumn_equals_roi_align(backend, aligned, sampling_ratio):
    """``box_hypercolumn([f], boxes, size, spatial_scale=s, padding="zeros", sampling_ratio=r,
    aligned=a)`` is ``roi_align(f, boxes, size, s, r, a)``, forward and gradient."""
    g = torch.Generator().manual_seed(17 + sampling_ratio)
    small = backend == "triton"  # Triton's interpreter runs numpy per program: keep it small
    feature = torch.randn(2, 3 if small else 5, 9, 11, generator=g, dtype=torch.float64, requires_grad=True)
    # torchvision's CPU roi_align cannot take a reversed box with adaptive sampling (it sizes a
    # buffer by the negative sample count); those are compared with our own rule below.
    boxes = random_boxes(9 if small else 23, g, reversed_boxes=sampling_ratio > 0)
    scale = 0.27
    expected = torchvision.ops.roi_align(feature, boxes, (4, 3), scale, sampling_ratio, aligned)
    with hypercolumn_ops.use_backend(backend):
        out = hypercolumn_ops.box_hypercolumn([feature], boxes, (4, 3), spatial_scale=scale, padding="zeros",
                                              sampling_ratio=sampling_ratio, aligned=aligned)
    torch.testing.assert_close(out, expected, **TOL)
    probe = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(grads_of(out, [feature], probe)[0], grads_of(expected, [feature], probe)[0], **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_sampling_of_reversed_or_empty_boxes_is_zero(backend):
    """With ``sampling_ratio <= 0`` a box of no extent (or reversed) takes no samples: its cells
    are 0, as roi_align's loops do (torchvision's CPU kernel cannot run the reversed ones)."""
    feature = torch.randn(1, 3, 6, 7, dtype=torch.float64)
    boxes = torch.tensor([[0, 9.0, 7.0, 2.0, 1.0], [0, 3.0, 3.0, 3.0, 8.0], [0, 4.0, 4.0, 4.0, 4.0]],
                         dtype=torch.float64)
    with hypercolumn_ops.use_backend(backend):
        out = hypercolumn_ops.box_hypercolumn([feature], boxes, (2, 3), spatial_scale=0.5, padding="zeros",
                                              sampling_ratio=0, aligned=True)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aligned, sampling_ratio", [(True, 2), (False, 2), (False, 0), (True, -1)])
@pytest.mark.slow
def test_fused_identity_classifier_equals_roi_align(backend, aligned, sampling_ratio):
    """``fused_hypercolumn`` with K = 1, one layer and identity weights is roi_align too: the
    sampling options reach the fused operator's both evaluation orders."""
    g = torch.Generator().manual_seed(5)
    feature = torch.randn(2, 4, 9, 11, generator=g, dtype=torch.float64, requires_grad=True)
    boxes = random_boxes(11, g, reversed_boxes=sampling_ratio > 0)
    identity = torch.eye(4, dtype=torch.float64).reshape(1, 4, 4)
    expected = torchvision.ops.roi_align(feature, boxes, (3, 5), 0.31, sampling_ratio, aligned)
    probe = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    expected_grad = grads_of(expected, [feature], probe)[0]
    for order in (0, 1):
        with hypercolumn_ops.use_backend(backend), force_order(order):
            out = hypercolumn_ops.fused_hypercolumn([feature], boxes, [identity], output_size=(3, 5),
                                                    spatial_scale=0.31, padding="zeros",
                                                    sampling_ratio=sampling_ratio, aligned=aligned)
        torch.testing.assert_close(out, expected, **TOL)
        torch.testing.assert_close(grads_of(out, [feature], probe)[0], expected_grad, **TOL)


class force_order:
    """Every layer of the fused calls inside takes evaluation order ``order``."""

    def __init__(self, order):
        self.order = order

    def __enter__(self):
        from hypercolumn_ops import _validation

        self.saved = _validation._orders
        _validation._orders = lambda features, *rest: [self.order] * len(features)

    def __exit__(self, *exc):
        from hypercolumn_ops import _validation

        _validation._orders = self.saved


def grid_sample_rows(feature, points, image_size, mode):
    """PointRend's ``point_sample``: ``grid_sample(align_corners=False)`` at image points."""
    height, width = image_size
    rows = []
    for b, x, y in points.tolist():
        grid = torch.tensor([[[[2 * x / width - 1, 2 * y / height - 1]]]], dtype=feature.dtype)
        rows.append(F.grid_sample(feature[int(b):int(b) + 1], grid, mode="bilinear", padding_mode=mode,
                                  align_corners=False)[0, :, 0, 0])
    return torch.stack(rows)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode, padding", [("zeros", "zeros_per_tap"), ("border", "border")])
def test_sparse_hypercolumn_equals_grid_sample(backend, mode, padding):
    """One layer of ``sparse_hypercolumn`` is ``grid_sample(align_corners=False)`` in each of its
    padding modes, at points everywhere: inside, on the border, within a pixel outside, far."""
    g = torch.Generator().manual_seed(3)
    feature = torch.randn(2, 4, 7, 9, generator=g, dtype=torch.float64, requires_grad=True)
    image_size = (28, 45)
    xy = torch.rand(40, 2, generator=g, dtype=torch.float64) * torch.tensor([65.0, 44.0]) - torch.tensor([10.0, 8.0])
    xy[:6] = torch.tensor([[0.0, 0.0], [45.0, 28.0], [-2.5, 3.0], [47.0, 27.9], [22.5, -3.2], [1e6, -1e7]],
                          dtype=torch.float64)
    points = torch.cat([torch.randint(0, 2, (40, 1), generator=g).double(), xy], dim=1)
    with hypercolumn_ops.use_backend(backend):
        out = hypercolumn_ops.sparse_hypercolumn([feature], points, image_size=image_size, padding=padding)
    expected = grid_sample_rows(feature, points, image_size, mode)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    probe = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(grads_of(out, [feature], probe)[0], grads_of(expected, [feature], probe)[0],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_box_hypercolumn_zeros_per_tap_equals_grid_sample_at_grid_points(backend):
    g = torch.Generator().manual_seed(8)
    feature = torch.randn(2, 3, 6, 8, generator=g, dtype=torch.float64)
    boxes = random_boxes(7, g, extent=40.0)
    with hypercolumn_ops.use_backend(backend):
        out = hypercolumn_ops.box_hypercolumn([feature], boxes, (3, 4), image_size=(24, 32), padding="zeros_per_tap")
    batch, x, y, _, _ = hypercolumn_ops.reference.box_grid_points(boxes, 3, 4)
    expected = grid_sample_rows(feature, torch.stack([batch, x, y], 1), (24, 32), "zeros")
    torch.testing.assert_close(out, expected.reshape(7, 3, 4, 3).permute(0, 3, 1, 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multiscale_roi_align_is_box_hypercolumn_per_level(backend):
    """torchvision's ``MultiScaleRoIAlign`` (the pooler of its detection models:
    ``sampling_ratio=2, aligned=False``, zero padding) is ``box_hypercolumn`` of each level on
    the boxes its level mapper assigns there, with that level's scale."""
    g = torch.Generator().manual_seed(11)
    image_sizes = [(120, 160), (100, 150)]
    levels = OrderedDict((name, torch.randn(2, 4, 120 // stride, 160 // stride, generator=g, dtype=torch.float64))
                         for name, stride in (("0", 4), ("1", 8), ("2", 16), ("3", 32)))
    per_image = []
    for height, width in image_sizes:
        corners = torch.rand(9, 4, generator=g, dtype=torch.float64) * torch.tensor([width, height, width, height])
        low, high = torch.minimum(corners[:, :2], corners[:, 2:]), torch.maximum(corners[:, :2], corners[:, 2:])
        per_image.append(torch.cat([low, high + 1], dim=1))
    pooler = torchvision.ops.MultiScaleRoIAlign(list(levels), output_size=7, sampling_ratio=2)
    expected = pooler(levels, per_image, image_sizes)
    rows = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=torch.float64), b], 1)
                      for i, b in enumerate(per_image)])
    assigned = pooler.map_levels(per_image)
    out = torch.zeros_like(expected)
    with hypercolumn_ops.use_backend(backend):
        for level, (feature, scale) in enumerate(zip(levels.values(), pooler.scales)):
            mine = (assigned == level).nonzero()[:, 0]
            out[mine] = hypercolumn_ops.box_hypercolumn([feature], rows[mine], (7, 7), spatial_scale=scale,
                                                        padding="zeros", sampling_ratio=2, aligned=False)
    torch.testing.assert_close(out, expected, **TOL)


def paper_head_by_stock_ops(features, kernels, weights, bias, box_bias, boxes, labels, image_size, output_size,
                            grid):
    """The paper's SDS head composed of stock operators: per layer its classifier as a
    convolution (``k x k``, padding ``k // 2``) to every class's cell scores, sampled on each box's
    grid with ``roi_align(aligned=True, sampling_ratio=1)``; summed over layers, the box's class
    picked, bias and the per-box term added, sigmoid per cell, then blended by the location
    weights of each grid place (the one-hot K x K map upsampled with ``F.interpolate``)."""
    classes, cells, outputs = bias.shape
    oh, ow = output_size
    scores = 0
    for feature, k, weight in zip(features, kernels, weights):
        kernel = weight.reshape(classes * cells * outputs, feature.shape[1], k, k)
        maps = F.conv2d(feature, kernel, padding=k // 2)
        scale = feature.shape[-1] / image_size[1]
        scores = scores + torchvision.ops.roi_align(maps, boxes, (oh, ow), scale, 1, True)
    rows = torch.arange(len(boxes))
    scores = scores.reshape(len(boxes), classes, cells, outputs, oh, ow)[rows, labels]
    scores = torch.sigmoid(scores + (bias[labels] + box_bias)[..., None, None])
    one_hot = torch.eye(cells, dtype=bias.dtype).reshape(cells, 1, grid, grid)
    alpha = F.interpolate(one_hot, size=(oh, ow), mode="bilinear", align_corners=False)[:, 0]  # (KK, oh, ow)
    return torch.einsum("kij,rkmij->rmij", alpha, scores)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_paper_sds_head_in_one_hypercolumn_head(backend):
    """The paper's SDS head (class-specific K x K classifiers, a per-box fc7 term, a 3 x 3
    classifier on one layer, sigmoid then blend) is one ``HypercolumnHead``."""
    g = torch.Generator().manual_seed(2)
    image_size, output_size, grid, classes = (48, 64), (10, 9), 3, 4
    head = HypercolumnHead([5, 7, 6], num_outputs=1, grid_size=grid, output_size=output_size, num_classes=classes,
                           activation="sigmoid", padding="zeros", kernel_sizes=[1, 3, 1]).double()
    features = [torch.randn(2, 5, 24, 32, generator=g, dtype=torch.float64, requires_grad=True),
                torch.randn(2, 7, 12, 16, generator=g, dtype=torch.float64, requires_grad=True),
                torch.randn(2, 6, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)]
    boxes = random_boxes(6, g, extent=70.0, reversed_boxes=False)
    labels = torch.randint(0, classes, (6,), generator=g)
    fc7 = torch.randn(6, grid * grid, 1, generator=g, dtype=torch.float64, requires_grad=True)
    with hypercolumn_ops.use_backend(backend):
        out = head(features, boxes, image_size=image_size, labels=labels, box_bias=fc7)
    expected = paper_head_by_stock_ops(features, head.kernel_sizes, list(head.weight), head.bias, fc7, boxes, labels,
                                       image_size, output_size, grid)
    torch.testing.assert_close(out, expected, **TOL)
    inputs = [*features, *head.parameters(), fc7]
    probe = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    for ours, theirs in zip(grads_of(out, inputs, probe), grads_of(expected, inputs, probe)):
        torch.testing.assert_close(ours, theirs, **TOL)


def test_k_by_k_head_equals_the_naive_head_at_pixel_centres():
    """A head with a 3 x 3 layer equals the naive head (every layer's scores upsampled to the
    image) where the grid points are pixel centres: a whole-image box with one cell a pixel."""
    from hypercolumn_ops.nn import NaiveHypercolumnHead

    g = torch.Generator().manual_seed(4)
    head = HypercolumnHead([3, 4], num_outputs=2, grid_size=2, output_size=(16, 20), num_classes=3,
                           activation="sigmoid", kernel_sizes=[3, 1]).double()
    naive = NaiveHypercolumnHead([3, 4], num_outputs=2, grid_size=2, output_size=(16, 20), num_classes=3,
                                 activation="sigmoid", kernel_sizes=[3, 1]).double()
    naive.load_state_dict(head.state_dict())
    features = [torch.randn(2, 3, 8, 10, generator=g, dtype=torch.float64),
                torch.randn(2, 4, 4, 5, generator=g, dtype=torch.float64)]
    boxes = torch.tensor([[0, 0.0, 0.0, 20.0, 16.0], [1, 0.0, 0.0, 20.0, 16.0]], dtype=torch.float64)
    labels = torch.tensor([2, 0])
    box_bias = torch.randn(2, 4, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(head(features, boxes, image_size=(16, 20), labels=labels, box_bias=box_bias),
                               naive(features, boxes, (16, 20), labels=labels, box_bias=box_bias), **TOL)


@pytest.mark.parametrize("op", ["fused_hypercolumn", "fused_hypercolumn_points"])
def test_box_bias_adds_to_every_bias_form(op):
    """``box_bias`` rows are added to the bias rows: the picked class's bias with labels, the
    shared one without; a call with both equals one with their sum as ``box_bias`` alone, and
    the gradient reaching ``box_bias`` is that of the summed rows."""
    g = torch.Generator().manual_seed(6)
    features = [torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)]
    if op == "fused_hypercolumn":
        rows, where = random_boxes(5, g, extent=20.0)[:4], {"output_size": (3, 2)}
    else:
        rows = torch.tensor([[0, 3.0, 4.0], [1, 9.5, 2.0], [1, 0.0, 11.0], [0, 7.0, 7.0]], dtype=torch.float64)
        where = {"locations": torch.rand(4, 2, generator=g, dtype=torch.float64)}
    call = getattr(hypercolumn_ops, op)
    common = dict(image_size=(10, 12), activation="sigmoid", **where)
    per_class = [torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64)]
    labels = torch.tensor([2, 0, 1, 2])
    class_bias = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    term = torch.randn(4, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    for weights, bias, extra, rows_of_bias in (
            (per_class, class_bias, {"labels": labels}, class_bias[labels]),
            (per_class, None, {"labels": labels}, 0),
            ([w[0] for w in per_class], class_bias[0], {}, class_bias[0])):
        out = call(features, rows, weights, bias, box_bias=term, **extra, **common)
        summed = (rows_of_bias + term.detach()).requires_grad_()
        expected = call(features, rows, weights, None, box_bias=summed, **extra, **common)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        probe = torch.randn(out.shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(grads_of(out, [term], probe)[0], grads_of(expected, [summed], probe)[0],
                                   rtol=1e-12, atol=1e-12)
    if op == "fused_hypercolumn":  # without labels, box_bias is the per-box bias form
        shared = [w[0] for w in per_class]
        torch.testing.assert_close(call(features, rows, shared, term, **common),
                                   call(features, rows, shared, box_bias=term, **common), rtol=0, atol=0)
