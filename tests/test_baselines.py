"""The baselines of ``hypercolumn_ops.baselines`` against the reference, in float64.

Each baseline must compute the public operator, forward and gradients, on the padding it
implements; the naive (upsample-to-image) baselines only where that is exact: at pixel centres.
"""

import itertools

import pytest
import torch

import hypercolumn_ops
from hypercolumn_ops import baselines

from cases import IMAGE, LAYER_SHAPES, BATCH, boxes, classifier, features, points

# float64 sums of a few dozen O(1) products, taken in another order, differ by ~1e-14; a wrong
# coordinate, weight or padding moves results by >= 1e-3. 1e-10 separates the two with margin.
TOLERANCE = dict(rtol=1e-10, atol=1e-10)

DEVICE = "cpu"
SCALES = {"image_size": {"image_size": IMAGE},
          "spatial_scale": {"spatial_scale": [h / IMAGE[0] for _, h, _ in LAYER_SHAPES]}}


def outputs_and_grads(function, args, kwargs, inputs):
    """Output of ``function(*args, **kwargs)`` and the gradients of a fixed random projection of it
    with respect to ``inputs``."""
    for t in inputs:
        t.grad = None
    out = function(*args, **kwargs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * probe).sum(), inputs, allow_unused=True) if inputs else []
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    return out.detach(), grads


def assert_matches_reference(baseline, op_name, args, kwargs, inputs):
    out, grads = outputs_and_grads(baseline, args, kwargs, inputs)
    with hypercolumn_ops.use_backend("reference"):
        ref, ref_grads = outputs_and_grads(getattr(hypercolumn_ops, op_name), args, kwargs, inputs)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOLERANCE)
    for index, (grad, ref_grad) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(grad, ref_grad, **TOLERANCE, msg=lambda m: f"grad of input {index}: {m}")


def classifier_inputs(grid, outputs, classes, bias_form, count, generator):
    """Weights, bias and labels for ``count`` boxes or points, all float64 leaves with gradients."""
    weights = classifier(grid, outputs, classes, torch.float64, DEVICE, generator, requires_grad=True)
    labels = None if classes is None else torch.randint(0, classes, (count,), generator=generator)
    bias_shape = {None: None, "cells": (grid * grid, outputs), "box": (count, grid * grid, outputs),
                  "class": (classes, grid * grid, outputs)}[bias_form]
    bias = None
    if bias_shape is not None:
        bias = torch.randn(*bias_shape, generator=generator, dtype=torch.float64).requires_grad_()
    inputs = weights + ([] if bias is None else [bias])
    return weights, bias, labels, inputs


# (K, M, NC, bias form, activation)
CLASSIFIERS = [(1, 1, None, None, None), (3, 4, None, "cells", "sigmoid"), (5, 2, None, "box", None),
               (3, 2, 3, "class", "sigmoid"), (2, 1, 4, None, None)]


@pytest.mark.parametrize("baseline", [baselines.roi_align_concat, baselines.classify_then_sample],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("scale", sorted(SCALES))
@pytest.mark.parametrize("grid,outputs,classes,bias_form,activation", CLASSIFIERS)
def test_roi_align_baselines_match_zeros_padding(baseline, scale, grid, outputs, classes, bias_form, activation):
    g = torch.Generator().manual_seed(grid * 100 + outputs)
    f = features(torch.float64, DEVICE, "contiguous", g, requires_grad=True)
    b = boxes(7, torch.float32, DEVICE, g)  # partly outside, backwards and degenerate boxes included
    weights, bias, labels, inputs = classifier_inputs(grid, outputs, classes, bias_form, b.shape[0], g)
    kwargs = dict(output_size=(6, 5), labels=labels, activation=activation, padding="zeros", **SCALES[scale])
    assert_matches_reference(baseline, "fused_hypercolumn", (f, b, weights, bias), kwargs, f + inputs)


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_roi_align_boxes_matches_zeros_padding(scale):
    g = torch.Generator().manual_seed(11)
    f = features(torch.float64, DEVICE, "channels_last", g, requires_grad=True)
    b = boxes(7, torch.float32, DEVICE, g)
    kwargs = dict(padding="zeros", **SCALES[scale])
    assert_matches_reference(baselines.roi_align_boxes, "box_hypercolumn", (f, b, (4, 7)), kwargs, f)


@pytest.mark.parametrize("batch", [1, BATCH])  # one image samples directly, several regroup the points
@pytest.mark.parametrize("scale", sorted(SCALES))
def test_grid_sample_points_matches_border_padding(scale, batch):
    g = torch.Generator().manual_seed(3)
    f = features(torch.float64, DEVICE, "channels_last", g, requires_grad=True, batch=batch)
    p = points(31, torch.float32, DEVICE, g, batch=batch)  # borders, corners and points outside included
    p[:, 0] = p[:, 0].remainder(batch)  # the fixed border points alternate between images 0 and 1
    kwargs = dict(padding="border", **SCALES[scale])
    assert_matches_reference(baselines.grid_sample_points, "sparse_hypercolumn", (f, p), kwargs, f)


@pytest.mark.parametrize("grid,outputs,classes,bias_form,activation",
                         [c for c in CLASSIFIERS if c[3] != "box"])
def test_grid_sample_fused_points_matches_border_padding(grid, outputs, classes, bias_form, activation):
    g = torch.Generator().manual_seed(grid * 10 + outputs)
    f = features(torch.float64, DEVICE, "contiguous", g, requires_grad=True)
    p = points(19, torch.float32, DEVICE, g)
    weights, bias, labels, inputs = classifier_inputs(grid, outputs, classes, bias_form, p.shape[0], g)
    locations = torch.rand(p.shape[0], 2, generator=g, dtype=torch.float64) if grid > 1 else None
    kwargs = dict(locations=locations, labels=labels, activation=activation, padding="border", **SCALES["image_size"])
    assert_matches_reference(baselines.grid_sample_fused_points, "fused_hypercolumn_points", (f, p, weights, bias),
                             kwargs, f + inputs)


def pixel_centre_points(count, generator):
    """``(N, 3)`` points on pixel centres ``(j + 0.5, i + 0.5)`` of IMAGE, corners included."""
    height, width = IMAGE
    corners = torch.tensor([[0, 0.5, 0.5], [1, width - 0.5, height - 0.5], [0, width - 0.5, 0.5]])
    rand = torch.stack([torch.randint(0, BATCH, (count,), generator=generator),
                        torch.randint(0, width, (count,), generator=generator),
                        torch.randint(0, height, (count,), generator=generator)], dim=1).float()
    rand[:, 1:] += 0.5
    return torch.cat([corners, rand])


def pixel_centre_boxes(output_size, generator):
    """``(R, 5)`` boxes inside IMAGE whose grid points are pixel centres: integer corners and
    sides that are odd multiples of the output size, so ``x1 + (j + 0.5) * side / ow`` is
    ``x1 + odd * (j + 0.5)``; one box covers the whole image at one point per pixel."""
    height, width = IMAGE
    oh, ow = output_size
    rows = []
    for batch, step_y, step_x in itertools.product(range(BATCH), (1, 3), (1, 3)):
        box_h, box_w = step_y * oh, step_x * ow
        y1 = int(torch.randint(0, height - box_h + 1, (1,), generator=generator))
        x1 = int(torch.randint(0, width - box_w + 1, (1,), generator=generator))
        rows.append([batch, x1, y1, x1 + box_w, y1 + box_h])
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_naive_sparse_matches_border_padding_at_pixel_centres(scale):
    g = torch.Generator().manual_seed(5)
    f = features(torch.float64, DEVICE, "contiguous", g, requires_grad=True)
    kwargs = dict(padding="border", **SCALES[scale])
    assert_matches_reference(baselines.naive_sparse_hypercolumn, "sparse_hypercolumn",
                             (f, pixel_centre_points(23, g)), kwargs, f)


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_naive_box_matches_border_padding_at_pixel_centres(scale):
    g = torch.Generator().manual_seed(6)
    f = features(torch.float64, DEVICE, "strided", g, requires_grad=True)
    b = pixel_centre_boxes((3, 4), g)
    kwargs = dict(padding="border", **SCALES[scale])
    assert_matches_reference(baselines.naive_box_hypercolumn, "box_hypercolumn", (f, b, (3, 4)), kwargs, f)


@pytest.mark.parametrize("grid,outputs,classes,bias_form,activation", CLASSIFIERS)
def test_naive_fused_matches_border_padding_at_pixel_centres(grid, outputs, classes, bias_form, activation):
    g = torch.Generator().manual_seed(grid + 7 * outputs)
    f = features(torch.float64, DEVICE, "contiguous", g, requires_grad=True)
    b = pixel_centre_boxes((3, 2), g)
    weights, bias, labels, inputs = classifier_inputs(grid, outputs, classes, bias_form, b.shape[0], g)
    kwargs = dict(output_size=(3, 2), labels=labels, activation=activation, padding="border", **SCALES["image_size"])
    assert_matches_reference(baselines.naive_fused_hypercolumn, "fused_hypercolumn", (f, b, weights, bias), kwargs,
                             f + inputs)


def test_naive_fused_whole_image_box_at_image_resolution():
    """The part-labelling shape: one box = the image, one grid point per pixel."""
    g = torch.Generator().manual_seed(8)
    f = features(torch.float64, DEVICE, "contiguous", g, requires_grad=True, batch=1)
    height, width = IMAGE
    b = torch.tensor([[0, 0, 0, width, height]], dtype=torch.float32)
    weights, bias, _, inputs = classifier_inputs(1, 3, None, "cells", 1, g)
    kwargs = dict(output_size=IMAGE, padding="border", **SCALES["image_size"])
    assert_matches_reference(baselines.naive_fused_hypercolumn, "fused_hypercolumn", (f, b, weights, bias), kwargs,
                             f + inputs)


@pytest.mark.parametrize("grid,outputs,classes,bias_form,activation",
                         [c for c in CLASSIFIERS if c[3] != "box"])
def test_naive_fused_points_matches_border_padding_at_pixel_centres(grid, outputs, classes, bias_form, activation):
    g = torch.Generator().manual_seed(grid * 3 + outputs)
    f = features(torch.float64, DEVICE, "contiguous", g, requires_grad=True)
    p = pixel_centre_points(17, g)
    weights, bias, labels, inputs = classifier_inputs(grid, outputs, classes, bias_form, p.shape[0], g)
    locations = torch.rand(p.shape[0], 2, generator=g, dtype=torch.float64) if grid > 1 else None
    kwargs = dict(locations=locations, labels=labels, activation=activation, padding="border",
                  **SCALES["spatial_scale"])
    assert_matches_reference(baselines.naive_fused_hypercolumn_points, "fused_hypercolumn_points",
                             (f, p, weights, bias), kwargs, f + inputs)


def test_half_precision_runs_in_float32_and_returns_input_dtype():
    g = torch.Generator().manual_seed(9)
    f = features(torch.bfloat16, DEVICE, "contiguous", g)
    b = boxes(4, torch.float32, DEVICE, g)
    weights = classifier(3, 2, None, torch.bfloat16, DEVICE, g)
    kwargs = dict(output_size=(5, 4), image_size=IMAGE)
    with hypercolumn_ops.use_backend("reference"):
        ref = hypercolumn_ops.fused_hypercolumn(f, b, weights, padding="zeros", **kwargs)
    for baseline in (baselines.roi_align_concat, baselines.classify_then_sample):
        out = baseline(f, b, weights, padding="zeros", **kwargs)
        assert out.dtype == torch.bfloat16
        # Both compute in float32 from the same bfloat16 inputs, then round once to bfloat16: they
        # may land on neighbouring values, one ulp apart, which is at most 2^-7 relative.
        torch.testing.assert_close(out, ref, rtol=2 ** -7, atol=2 ** -7)


@pytest.mark.parametrize("baseline,padding", [(baselines.roi_align_concat, "border"),
                                              (baselines.classify_then_sample, "border"),
                                              (baselines.naive_fused_hypercolumn, "zeros")],
                         ids=lambda v: getattr(v, "__name__", v))
def test_unimplemented_padding_is_refused(baseline, padding):
    g = torch.Generator().manual_seed(10)
    f = features(torch.float64, DEVICE, "contiguous", g)
    weights = classifier(1, 1, None, torch.float64, DEVICE, g)
    with pytest.raises(ValueError, match="padding"):
        baseline(f, boxes(2, torch.float32, DEVICE, g), weights, image_size=IMAGE, padding=padding)


def test_arguments_are_checked_like_the_operators():
    g = torch.Generator().manual_seed(11)
    f = features(torch.float64, DEVICE, "contiguous", g)
    with pytest.raises(ValueError, match="boxes"):
        baselines.roi_align_concat(f, torch.zeros(3, 4), classifier(1, 1, None, torch.float64, DEVICE, g),
                                   image_size=IMAGE)
    with pytest.raises(ValueError, match="image_size, spatial_scale"):
        baselines.grid_sample_points(f, points(3, torch.float32, DEVICE, g))
