"""Every backend against the operators' peers: F.interpolate at pixel centres and torchvision's
roi_align; the reference against the formulas of docs/semantics.md written out by hand for single
points."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

import hypercolumn_ops
from hypercolumn_ops import reference

# float64 on tiny maps: the only differences are rounding in a handful of operations.
RTOL, ATOL = 1e-12, 1e-12


def _maps(generator, shapes=((3, 5, 7), (4, 3, 4), (2, 1, 1)), batch=2):
    return [torch.randn(batch, c, h, w, generator=generator, dtype=torch.float64) for c, h, w in shapes]


def _pixel_centres(height, width, batch_index):
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    column = torch.full((height * width,), float(batch_index))
    return torch.stack([column, xs.flatten(), ys.flatten()], 1).double()


BACKENDS = hypercolumn_ops.available_backends("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("image", [(11, 13), (4, 9), (17, 5)])
def test_sparse_equals_interpolate_at_pixel_centres(image, backend):
    g = torch.Generator().manual_seed(image[0])
    maps = _maps(g)
    with hypercolumn_ops.use_backend(backend):
        out = hypercolumn_ops.sparse_hypercolumn(maps, _pixel_centres(*image, 1), image_size=image)
    upsampled = torch.cat([F.interpolate(f, size=image, mode="bilinear", align_corners=False) for f in maps], 1)
    expected = upsampled[1].flatten(1).T
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output_size", [(1, 1), (4, 6), (7, 3)])
def test_box_equals_roi_align_aligned(output_size, backend):
    g = torch.Generator().manual_seed(sum(output_size))
    feature = _maps(g, shapes=((5, 9, 11),))[0]
    boxes = torch.tensor([[0, -3.0, -2.0, 8.0, 9.0], [1, 2.0, 3.0, 30.5, 20.0], [1, 5.0, 5.0, 2.0, 1.0],
                          [0, -30.0, -30.0, -10.0, -12.0], [1, 0.0, 0.0, 22.0, 18.0]], dtype=torch.float64)
    expected = roi_align(feature, boxes, output_size, 0.5, sampling_ratio=1, aligned=True)
    identity = torch.eye(5, dtype=torch.float64)[None]  # K = 1, M = C: the classifier copies channels
    with hypercolumn_ops.use_backend(backend):
        sampled = hypercolumn_ops.box_hypercolumn([feature], boxes, output_size, spatial_scale=0.5, padding="zeros")
        fused = hypercolumn_ops.fused_hypercolumn([feature], boxes, [identity], output_size=output_size,
                                                  spatial_scale=0.5, padding="zeros")
    torch.testing.assert_close(sampled, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(fused, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("grid", [1, 2, 3, 5])
def test_location_weights_upsample_one_hot_maps(grid):
    size = 13
    u = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    uu, vv = torch.meshgrid(u, u, indexing="xy")
    alpha = reference.location_weights(uu.flatten(), vv.flatten(), grid)
    one_hot = torch.eye(grid * grid, dtype=torch.float64).reshape(grid * grid, 1, grid, grid)
    expected = F.interpolate(one_hot, size=(size, size), mode="bilinear", align_corners=False)
    torch.testing.assert_close(alpha.T.reshape(grid * grid, 1, size, size), expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(alpha.sum(1), torch.ones(size * size, dtype=torch.float64))


def test_fused_point_by_hand():
    """One point, two layers, K = 2, M = 1, sigmoid: the sums of docs/semantics.md written out."""
    g = torch.Generator().manual_seed(3)
    maps = _maps(g, shapes=((3, 4, 5), (2, 2, 3)), batch=1)
    weights = [torch.randn(4, 1, 3, generator=g, dtype=torch.float64),
               torch.randn(4, 1, 2, generator=g, dtype=torch.float64)]
    bias = torch.randn(4, 1, generator=g, dtype=torch.float64)
    x, y, u, v = 3.3, 5.9, 0.3, 0.8
    image = (8, 10)

    def bilinear(f, fx, fy):
        _, _, h, w = f.shape
        fx, fy = min(max(fx, 0), w - 1), min(max(fy, 0), h - 1)
        x0, y0 = int(fx), int(fy)
        x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
        lx, ly = fx - x0, fy - y0
        return ((1 - ly) * (1 - lx) * f[0, :, y0, x0] + (1 - ly) * lx * f[0, :, y0, x1]
                + ly * (1 - lx) * f[0, :, y1, x0] + ly * lx * f[0, :, y1, x1])

    columns = [bilinear(f, x * f.shape[3] / image[1] - 0.5, y * f.shape[2] / image[0] - 0.5) for f in maps]
    scores = sum(w[:, 0] @ c for w, c in zip(weights, columns)) + bias[:, 0]
    gu, gv = min(max(u * 2 - 0.5, 0), 1), min(max(v * 2 - 0.5, 0), 1)
    alpha = torch.tensor([(1 - gv) * (1 - gu), (1 - gv) * gu, gv * (1 - gu), gv * gu], dtype=torch.float64)
    expected = (alpha * torch.sigmoid(scores)).sum()
    with hypercolumn_ops.use_backend("reference"):
        out = hypercolumn_ops.fused_hypercolumn_points(
            maps, torch.tensor([[0, x, y]], dtype=torch.float64), weights, bias,
            locations=torch.tensor([[u, v]], dtype=torch.float64), image_size=image, activation="sigmoid")
    torch.testing.assert_close(out, expected.reshape(1, 1), rtol=RTOL, atol=ATOL)


def test_non_finite_points_give_nan():
    maps = _maps(torch.Generator().manual_seed(4))
    pts = torch.tensor([[0, float("nan"), 1.0], [1, 2.0, float("inf")], [0, -float("inf"), 2.0], [1, 2.0, 2.0]],
                       dtype=torch.float64)
    for padding in ("border", "zeros"):
        with hypercolumn_ops.use_backend("reference"):
            out = hypercolumn_ops.sparse_hypercolumn(maps, pts, image_size=(8, 8), padding=padding)
        assert out[:3].isnan().all()
        assert out[3].isfinite().all()


def test_non_finite_points_pass_no_gradient():
    g = torch.Generator().manual_seed(5)
    maps = [m.requires_grad_() for m in _maps(g)]
    weights = [torch.randn(4, 2, m.shape[1], generator=g, dtype=torch.float64, requires_grad=True) for m in maps]
    pts = torch.tensor([[0, float("nan"), 1.0], [1, 2.0, 2.0]], dtype=torch.float64)
    locations = torch.tensor([[0.5, 0.5], [float("inf"), 0.1]], dtype=torch.float64)
    with hypercolumn_ops.use_backend("reference"):
        sparse = hypercolumn_ops.sparse_hypercolumn(maps, pts, image_size=(8, 8))
        fused = hypercolumn_ops.fused_hypercolumn_points(maps, pts, weights, locations=locations,
                                                         image_size=(8, 8))
    assert sparse[0].isnan().all() and fused.isnan().all()
    for out in (sparse, fused):
        grads = torch.autograd.grad(torch.nan_to_num(out).sum(), maps + weights, allow_unused=True)
        assert all(gr is None or gr.isfinite().all() for gr in grads)
