"""The hypercolumn modules: the fused head against the naive upsampling head with one
state_dict (same function, far less memory), the descriptor module, parameters and repr."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import hypercolumn_ops
from hypercolumn_ops.nn import Hypercolumn, HypercolumnHead, NaiveHypercolumnHead

IMAGE = (19, 23)  # (H, W)
CHANNELS = (3, 5, 7)
SHAPES = ((10, 12), (5, 6), (3, 3))  # layers at strides about 2, 4, 8, not exact
BACKENDS = hypercolumn_ops.available_backends("cpu")

# Sums of ~50 float64 products of magnitude <= ~10: rounding stays below 1e-13; any coordinate
# or weight mistake shows up at the size of the features' differences (~1).
EXACT = dict(rtol=0, atol=1e-12)


def make_features(generator, dtype=torch.float64, batch=2, requires_grad=False):
    return [torch.randn(batch, c, h, w, generator=generator, dtype=dtype).requires_grad_(requires_grad)
            for c, (h, w) in zip(CHANNELS, SHAPES)]


def make_heads(num_outputs=2, grid_size=3, output_size=IMAGE, num_classes=None, activation=None,
               padding="border", dtype=torch.float64, seed=0):
    """A fused and a naive head holding the same parameters (naive loaded from fused)."""
    torch.manual_seed(seed)
    kwargs = dict(grid_size=grid_size, output_size=output_size, num_classes=num_classes, activation=activation,
                  padding=padding)
    fused = HypercolumnHead(CHANNELS, num_outputs, **kwargs).to(dtype)
    naive = NaiveHypercolumnHead(CHANNELS, num_outputs, **kwargs).to(dtype)
    naive.load_state_dict(fused.state_dict())
    return fused, naive


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_classes", [None, 3])
@pytest.mark.parametrize("activation", [None, "sigmoid"])
@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.slow
def test_whole_image_grid_is_exact(backend, num_classes, activation, padding):
    """Box = whole image, output_size = image size: the grid lies on pixel centres, where
    sampling a layer equals F.interpolate to image size, so both heads agree exactly, in the
    output and in every gradient."""
    g = torch.Generator().manual_seed(1)
    fused, naive = make_heads(num_classes=num_classes, activation=activation, padding=padding)
    height, width = IMAGE
    boxes = torch.tensor([[0, 0, 0, width, height], [1, 0, 0, width, height], [0, 0, 0, width, height]],
                         dtype=torch.float64)
    labels = None if num_classes is None else torch.tensor([2, 0, 1])
    features = make_features(g, requires_grad=True)
    with hypercolumn_ops.use_backend(backend):
        out = fused(features, boxes, IMAGE, labels)
    expected = naive(features, boxes, IMAGE, labels)
    assert out.shape == (3, 2, height, width)
    torch.testing.assert_close(out, expected, **EXACT)

    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    inputs = [*features, *fused.parameters()]
    grads = torch.autograd.grad(out, inputs, upstream)
    expected_grads = torch.autograd.grad(expected, [*features, *naive.parameters()], upstream)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **EXACT)


def interpolation_bound(features, weights, x, y):
    """Per point, a bound on |naive - exact| from sampling the upsampled image rather than the
    layer: the naive value is a bilinear blend of the exact function at the four surrounding
    pixel centres, at distances |dx| (weight 1 - |dx|) and |dy|; so its error is at most
    ``Lx * 2 lx (1 - lx) + Ly * 2 ly (1 - ly)`` per channel, with ``lx`` the point's fraction
    past a pixel centre and ``Lx`` the layer's largest slope along x in image pixels (the
    largest neighbour difference times the layer's cells per pixel). The classifier blends
    cells with weights summing to 1, so each channel counts with its largest |weight|; a
    sigmoid only shrinks differences."""
    height, width = IMAGE
    lx = (x - 0.5) - (x - 0.5).floor()
    ly = (y - 0.5) - (y - 0.5).floor()
    bound = torch.zeros_like(x)
    for feature, weight in zip(features, weights):
        slope_x = feature.diff(dim=3).abs().amax(dim=(0, 2, 3)) * feature.shape[3] / width
        slope_y = feature.diff(dim=2).abs().amax(dim=(0, 2, 3)) * feature.shape[2] / height
        largest = weight.detach().abs().flatten(0, -2).amax(dim=0)
        bound = bound + (largest * slope_x).sum() * 2 * lx * (1 - lx) + (largest * slope_y).sum() * 2 * ly * (1 - ly)
    return bound


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_classes", [None, 3])
@pytest.mark.parametrize("activation", [None, "sigmoid"])
def test_other_boxes_within_interpolation_error(backend, num_classes, activation):
    g = torch.Generator().manual_seed(2)
    output_size = (7, 9)
    fused, naive = make_heads(num_outputs=1, output_size=output_size, num_classes=num_classes,
                              activation=activation)
    features = make_features(g)
    boxes = torch.tensor([[0, 2.3, 1.1, 17.2, 15.9], [1, 5.0, 3.0, 20.0, 18.5], [1, 0.7, 0.2, 9.6, 6.3]],
                         dtype=torch.float64)
    labels = None if num_classes is None else torch.tensor([1, 2, 0])
    with hypercolumn_ops.use_backend(backend):
        out = fused(features, boxes, IMAGE, labels)
    expected = naive(features, boxes, IMAGE, labels)
    oh, ow = output_size
    j = torch.arange(ow, dtype=torch.float64) + 0.5
    i = torch.arange(oh, dtype=torch.float64) + 0.5
    x = (boxes[:, 1, None, None] + j * (boxes[:, 3] - boxes[:, 1])[:, None, None] / ow).expand(-1, oh, ow)
    y = (boxes[:, 2, None, None] + i[:, None] * (boxes[:, 4] - boxes[:, 2])[:, None, None] / oh).expand(-1, oh, ow)
    bound = interpolation_bound(features, list(fused.weight), x, y)
    error = (out[:, 0] - expected[:, 0]).abs()
    assert (error <= bound + 1e-12).all(), (error - bound).max()  # 1e-12: float64 rounding, as EXACT
    assert error.max() > 1e-6  # the boxes are off pixel centres, so the two ways do differ


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_classes", [None, 3])
def test_points_match_naive(backend, num_classes):
    """forward_points: exact at pixel centres, within the interpolation bound elsewhere."""
    g = torch.Generator().manual_seed(3)
    fused, naive = make_heads(num_outputs=1, num_classes=num_classes)
    features = make_features(g)
    count = 40
    centres = torch.stack([torch.randint(0, 2, (count,), generator=g),
                           torch.randint(0, IMAGE[1], (count,), generator=g) + 0.5,
                           torch.randint(0, IMAGE[0], (count,), generator=g) + 0.5], dim=1).double()
    anywhere = torch.rand(count, 3, generator=g, dtype=torch.float64) * torch.tensor([2, IMAGE[1], IMAGE[0]])
    anywhere[:, 0] = anywhere[:, 0].floor()
    locations = torch.rand(count, 2, generator=g, dtype=torch.float64)
    labels = None if num_classes is None else torch.randint(0, num_classes, (count,), generator=g)
    for points, exact in ((centres, True), (anywhere, False)):
        with hypercolumn_ops.use_backend(backend):
            out = fused.forward_points(features, points, IMAGE, locations, labels)
        expected = naive.forward_points(features, points, IMAGE, locations, labels)
        assert out.shape == (count, 1)
        if exact:
            torch.testing.assert_close(out, expected, **EXACT)
        else:
            bound = interpolation_bound(features, list(fused.weight), points[:, 1], points[:, 2])
            assert ((out[:, 0] - expected[:, 0]).abs() <= bound + 1e-12).all()  # 1e-12: as EXACT


def test_head_takes_spatial_scale_instead_of_image_size():
    """Maps of 8 x 10 and 4 x 5 of a 32 x 40 image are 1/4 and 1/8 of it: the same head call
    either way, boxes and points."""
    torch.manual_seed(0)
    head = HypercolumnHead([3, 2], 2, grid_size=2, output_size=(3, 4)).double()
    features = [torch.randn(1, 3, 8, 10, dtype=torch.float64), torch.randn(1, 2, 4, 5, dtype=torch.float64)]
    boxes = torch.tensor([[0, 1.0, 2.0, 30.0, 25.0]], dtype=torch.float64)
    points = torch.tensor([[0, 3.5, 7.0], [0, 39.0, 0.5]], dtype=torch.float64)
    locations = torch.tensor([[0.1, 0.2], [0.9, 0.5]], dtype=torch.float64)
    # The two give the same scales, so the same kernels run on the same values.
    torch.testing.assert_close(head(features, boxes, spatial_scale=[1 / 4, 1 / 8]),
                               head(features, boxes, image_size=(32, 40)), rtol=0, atol=0)
    torch.testing.assert_close(head.forward_points(features, points, locations=locations, spatial_scale=[1 / 4, 1 / 8]),
                               head.forward_points(features, points, (32, 40), locations), rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one"):
        head(features, boxes)


def test_state_dict_is_shared_both_ways():
    fused = HypercolumnHead(CHANNELS, 4, num_classes=2)
    naive = NaiveHypercolumnHead(CHANNELS, 4, num_classes=2)
    assert list(fused.state_dict()) == list(naive.state_dict()) == ["bias", "weight.0", "weight.1", "weight.2"]
    fused.load_state_dict(naive.state_dict())
    for a, b in zip(fused.parameters(), naive.parameters()):
        assert torch.equal(a, b)
    assert [tuple(w.shape) for w in fused.weight] == [(2, 25, 4, c) for c in CHANNELS]
    assert tuple(fused.bias.shape) == (2, 25, 4)
    plain = HypercolumnHead(CHANNELS, 4, grid_size=1)
    assert [tuple(w.shape) for w in plain.weight] == [(1, 4, c) for c in CHANNELS]
    assert tuple(plain.bias.shape) == (1, 4)


def test_initialisation_is_linear_over_the_hypercolumn():
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = sum C_l, like nn.Linear(sum C_l, M)."""
    torch.manual_seed(0)
    channels = (64, 128, 256)
    head = HypercolumnHead(channels, 8, grid_size=5)
    bound = 1 / math.sqrt(sum(channels))
    values = torch.cat([p.detach().flatten() for p in head.parameters()])
    assert values.abs().max() <= bound
    # 25 * 8 * 448 + 200 samples of U(-b, b): the std is b / sqrt(3) within 1% (its standard error is ~0.2%).
    assert abs(values.std().item() / (bound / math.sqrt(3)) - 1) < 0.01


def test_repr_and_bad_arguments():
    head = HypercolumnHead([4, 8], 3, grid_size=2, output_size=7, num_classes=5, activation="sigmoid")
    text = repr(head)
    for part in ("HypercolumnHead(", "in_channels=[4, 8]", "num_outputs=3", "grid_size=2", "output_size=(7, 7)",
                 "num_classes=5", "activation='sigmoid'", "padding='border'"):
        assert part in text
    assert "NaiveHypercolumnHead(" in repr(NaiveHypercolumnHead([4], 1))
    with pytest.raises(ValueError, match="activation"):
        HypercolumnHead([4], 1, activation="relu")
    with pytest.raises(ValueError, match="padding"):
        HypercolumnHead([4], 1, padding="reflect")
    with pytest.raises(ValueError, match="in_channels"):
        HypercolumnHead([], 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hypercolumn_module(backend):
    """At pixel centres of the whole image, the descriptor is the concatenation of the layers
    upsampled with F.interpolate, laid out (R, sum C_l, oh, ow) for boxes and (N, sum C_l) for
    points."""
    g = torch.Generator().manual_seed(4)
    features = make_features(g)
    upsampled = torch.cat([F.interpolate(f, size=IMAGE, mode="bilinear", align_corners=False) for f in features], 1)
    height, width = IMAGE
    with hypercolumn_ops.use_backend(backend):
        whole = torch.tensor([[0.0, 0.0, width, height]])
        boxes = Hypercolumn(output_size=IMAGE, image_size=IMAGE)(features, [whole, whole])
        points = Hypercolumn(image_size=IMAGE)(features, torch.tensor([[1, 4.5, 7.5], [0, 22.5, 0.5]]))
        scaled = Hypercolumn(output_size=IMAGE, spatial_scale=[h / height for h, _ in SHAPES])(
            features, torch.tensor([[0.0, 0, 0, width, height]]))
    torch.testing.assert_close(boxes.double(), upsampled, **EXACT)
    torch.testing.assert_close(points.double(), torch.stack([upsampled[1, :, 7, 4], upsampled[0, :, 0, 22]]), **EXACT)
    assert scaled.shape == (1, sum(CHANNELS), height, width)
    assert "output_size=(19, 23), image_size=(19, 23), padding='border'" in repr(Hypercolumn(IMAGE, IMAGE))


def peak_allocated_bytes(step) -> int:
    """Peak of the bytes held by tensors the CPU allocator handed out while ``step`` ran,
    over and above what was live before (every allocation and free, kernels' own buffers
    included, as recorded by torch.profiler's memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns() if hasattr(e, "start_ns") else e.start_us())  # start_us: older torch
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_fused_head_uses_far_less_memory(backend):
    """Forward and backward of a few small boxes on a 2 x 96 x 128 image: the naive head holds
    the upsampled hypercolumn image (B x sum C_l x H x W floats) and its gradient; the fused
    head needs a fraction of one such image, even on the reference backend (which gathers the
    box hypercolumns, R x sum C_l x oh x ow, but never the image)."""
    torch.manual_seed(5)
    height, width = 96, 128
    channels = (16, 32, 64)
    features = [torch.randn(2, c, height // s, width // s, requires_grad=True) for c, s in zip(channels, (2, 4, 8))]
    boxes = torch.tensor([[0, 10.0, 12.0, 40.0, 50.0], [1, 60.0, 20.0, 110.0, 70.0], [1, 5.0, 5.0, 30.0, 25.0]])
    labels = torch.tensor([0, 1, 1])
    fused = HypercolumnHead(channels, 1, output_size=(16, 16), num_classes=2, activation="sigmoid")
    naive = NaiveHypercolumnHead(channels, 1, output_size=(16, 16), num_classes=2, activation="sigmoid")
    naive.load_state_dict(fused.state_dict())

    def run(head):
        def step():
            head(features, boxes, (height, width), labels).sum().backward()
        return step

    with hypercolumn_ops.use_backend(backend):
        run(fused)()  # first calls allocate one-off state (dispatch caches) outside the measurement
        fused_peak = peak_allocated_bytes(run(fused))
    run(naive)()
    naive_peak = peak_allocated_bytes(run(naive))
    hypercolumn_image = 2 * sum(channels) * height * width * 4
    assert naive_peak >= hypercolumn_image
    assert fused_peak < hypercolumn_image / 4
    assert fused_peak * 8 < naive_peak
