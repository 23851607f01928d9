"""The public face: one test per bad-input case of docs/semantics.md (exception type, and a
message that names the argument), backend selection, the value-check switch."""

import pytest
import torch

import hypercolumn_ops
from hypercolumn_ops import _validation, ops

IMAGE = (16, 20)


def maps(batch=2, dtype=torch.float32):
    return [torch.randn(batch, 3, 8, 10, dtype=dtype), torch.randn(batch, 5, 4, 5, dtype=dtype)]


def cls(grid=2, outputs=2, classes=None, channels=(3, 5)):
    lead = (grid * grid, outputs) if classes is None else (classes, grid * grid, outputs)
    return [torch.randn(*lead, c) for c in channels]


POINTS = torch.tensor([[0, 3.0, 4.0], [1, 10.0, 2.0]])
BOXES = torch.tensor([[0, 1.0, 1.0, 9.0, 7.0], [1, 2.0, 3.0, 12.0, 14.0]])
LOCATIONS = torch.tensor([[0.2, 0.4], [0.9, 0.1]])


def call(op, **changes):
    """Call ``op`` on valid arguments with some of them replaced."""
    if op == "sparse_hypercolumn":
        kw = dict(features=maps(), points=POINTS, image_size=IMAGE)
    elif op == "box_hypercolumn":
        kw = dict(features=maps(), boxes=BOXES, output_size=(3, 4), image_size=IMAGE)
    elif op == "fused_hypercolumn":
        kw = dict(features=maps(), boxes=BOXES, weights=cls(), output_size=(3, 4), image_size=IMAGE)
    else:
        kw = dict(features=maps(), points=POINTS, weights=cls(), locations=LOCATIONS, image_size=IMAGE)
    kw.update(changes)
    kw = {k: v for k, v in kw.items() if v is not REMOVE}
    return getattr(hypercolumn_ops, op)(**kw)


REMOVE = object()
ALL = ["sparse_hypercolumn", "box_hypercolumn", "fused_hypercolumn", "fused_hypercolumn_points"]
FUSED = ["fused_hypercolumn", "fused_hypercolumn_points"]
WITH_POINTS = ["sparse_hypercolumn", "fused_hypercolumn_points"]
WITH_BOXES = ["box_hypercolumn", "fused_hypercolumn"]


@pytest.fixture(params=["compiled", "torch-ops"])
def value_check(request, monkeypatch):
    """The value checks through the compiled ``index_values_valid``, and through the torch ops
    that stand in for it where the extension is not built (or built without CUDA)."""
    if request.param == "torch-ops":
        monkeypatch.setattr(_validation, "native_available", lambda device_type: False)
    return request.param


def expect(error, name, op, **changes):
    with pytest.raises(error) as info:
        call(op, **changes)
    assert name in str(info.value), f"message does not name {name!r}: {info.value}"


@pytest.mark.parametrize("op", ALL)
class TestFeatures:
    def test_empty(self, op):
        expect(ValueError, "features", op, features=[])

    def test_not_a_sequence(self, op):
        expect(TypeError, "features", op, features=torch.randn(2, 3, 8, 10))

    def test_not_4d(self, op):
        expect(ValueError, "features[1]", op, features=[maps()[0], torch.randn(2, 5, 4)])

    def test_batch_differs(self, op):
        expect(ValueError, "features[1]", op, features=[maps()[0], maps(batch=3)[1]])

    def test_dtype_differs(self, op):
        expect(ValueError, "features[1]", op, features=[maps()[0], maps(dtype=torch.float64)[1]])

    def test_device_differs(self, op):
        expect(ValueError, "features[1]", op, features=[maps()[0], maps()[1].to("meta")])

    @pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.complex64])
    def test_integer_or_complex(self, op, dtype):
        expect(TypeError, "features[0]", op, features=[torch.zeros(2, 3, 8, 10, dtype=dtype), maps()[1]])


@pytest.mark.parametrize("op", ALL)
class TestScales:
    def test_both(self, op):
        expect(ValueError, "spatial_scale", op, spatial_scale=0.5)

    def test_neither(self, op):
        expect(ValueError, "image_size", op, image_size=None)

    @pytest.mark.parametrize("size", [(0, 20), (16, -1)])
    def test_non_positive_size(self, op, size):
        expect(ValueError, "image_size", op, image_size=size)

    @pytest.mark.parametrize("scale", [0.0, -0.5, [0.5, 0.0]])
    def test_non_positive_scale(self, op, scale):
        expect(ValueError, "spatial_scale", op, image_size=None, spatial_scale=scale)

    def test_scale_count(self, op):
        expect(ValueError, "spatial_scale", op, image_size=None, spatial_scale=[0.5, 0.25, 0.1])

    def test_unknown_padding(self, op):
        expect(ValueError, "padding", op, padding="reflect")


@pytest.mark.parametrize("op", WITH_POINTS)
class TestPoints:
    @pytest.mark.parametrize("shape", [(2, 2), (2, 4), (6,)])
    def test_shape(self, op, shape):
        expect(ValueError, "points", op, points=torch.zeros(shape))

    def test_integer_dtype(self, op):
        expect(TypeError, "points", op, points=POINTS.long())

    @pytest.mark.parametrize("index", [2.0, -1.0, 0.5, float("nan"), float("inf")])
    def test_batch_index(self, op, index, value_check):
        points = POINTS.clone()
        points[1, 0] = index
        expect(ValueError, "points", op, points=points)


@pytest.mark.parametrize("op", WITH_BOXES)
class TestBoxes:
    @pytest.mark.parametrize("shape", [(2, 4), (2, 6), (5,)])
    def test_shape(self, op, shape):
        expect(ValueError, "boxes", op, boxes=torch.zeros(shape))

    def test_list_of_wrong_shape(self, op):
        expect(ValueError, "boxes[1]", op, boxes=[BOXES[:, 1:], BOXES])

    def test_list_longer_than_batch(self, op):
        expect(ValueError, "boxes", op, boxes=[BOXES[:, 1:]] * 3)

    @pytest.mark.parametrize("index", [2.0, -1.0, 0.5, float("nan")])
    def test_batch_index(self, op, index, value_check):
        boxes = BOXES.clone()
        boxes[0, 0] = index
        expect(ValueError, "boxes", op, boxes=boxes)

    @pytest.mark.parametrize("size", [0, (3, 0), (2, 3, 4), 2.5])
    def test_output_size(self, op, size):
        expect(ValueError, "output_size", op, output_size=size)

    def test_backwards_box_is_allowed(self, op):
        assert call(op, boxes=torch.tensor([[0, 9.0, 7.0, 1.0, 1.0]])).isfinite().all()


@pytest.mark.parametrize("op", FUSED)
class TestClassifier:
    def test_weight_count(self, op):
        expect(ValueError, "weights", op, weights=cls()[:1])

    def test_weight_rank(self, op):
        expect(ValueError, "weights[0]", op, weights=[torch.randn(4, 3), cls()[1]])

    def test_weight_ranks_differ(self, op):
        expect(ValueError, "weights[1]", op, weights=[cls()[0], cls(classes=2)[1]])

    def test_kk_differs(self, op):
        expect(ValueError, "weights[1]", op, weights=[cls()[0], cls(grid=3)[1]])

    def test_m_differs(self, op):
        expect(ValueError, "weights[1]", op, weights=[cls()[0], cls(outputs=3)[1]])

    def test_channels(self, op):
        expect(ValueError, "weights[1]", op, weights=cls(channels=(3, 4)))

    def test_kk_not_square(self, op):
        expect(ValueError, "weights", op, weights=[torch.randn(3, 2, 3), torch.randn(3, 2, 5)])

    def test_weight_dtype(self, op):
        expect(TypeError, "weights[0]", op, weights=[w.double() for w in cls()])

    @pytest.mark.parametrize("shape", [(4,), (4, 3), (3, 4, 2), (2, 2, 4, 2)])
    def test_bias_shape(self, op, shape):
        expect(ValueError, "bias", op, bias=torch.randn(shape))

    def test_bias_dtype(self, op):
        expect(TypeError, "bias", op, bias=torch.randn(4, 2, dtype=torch.float64))

    def test_labels_missing(self, op):
        expect(ValueError, "labels", op, weights=cls(classes=3))

    def test_labels_unexpected(self, op):
        expect(ValueError, "labels", op, labels=torch.tensor([0, 1]))

    def test_labels_dtype(self, op):
        expect(TypeError, "labels", op, weights=cls(classes=3), labels=torch.tensor([0.0, 1.0]))

    def test_labels_shape(self, op):
        expect(ValueError, "labels", op, weights=cls(classes=3), labels=torch.tensor([0, 1, 2]))

    @pytest.mark.parametrize("label", [3, -1])
    def test_labels_range(self, op, label, value_check):
        expect(ValueError, "labels", op, weights=cls(classes=3), labels=torch.tensor([0, label]))

    def test_class_bias(self, op, value_check):
        out = call(op, weights=cls(classes=3), labels=torch.tensor([2, 0]), bias=torch.randn(3, 4, 2))
        assert out.isfinite().all()

    def test_unknown_activation(self, op):
        expect(ValueError, "activation", op, activation="relu")


def test_locations_missing_when_k_above_one():
    expect(ValueError, "locations", "fused_hypercolumn_points", locations=REMOVE)


def test_locations_optional_when_k_is_one():
    assert call("fused_hypercolumn_points", weights=cls(grid=1), locations=REMOVE).shape == (2, 2)


def test_locations_shape():
    expect(ValueError, "locations", "fused_hypercolumn_points", locations=torch.rand(3, 2))


def test_per_box_bias_only_for_boxes():
    call("fused_hypercolumn", bias=torch.randn(2, 4, 2))
    expect(ValueError, "bias", "fused_hypercolumn_points", bias=torch.randn(2, 4, 2))


@pytest.mark.parametrize("op", ALL)
def test_valid_batch_indices_pass(op, value_check):
    rows = (POINTS if op in WITH_POINTS else BOXES).clone()
    rows[0, 0] = -0.0  # the index 0
    out = call(op, **{"points" if op in WITH_POINTS else "boxes": rows})
    assert out.isfinite().all()


@pytest.mark.parametrize("backend", hypercolumn_ops.available_backends("cpu"))
def test_value_checks_off_gives_nan_not_a_crash(backend):
    points = POINTS.clone()
    points[1, 0] = 7.0
    with hypercolumn_ops.set_value_checks(False), hypercolumn_ops.use_backend(backend):
        out = call("sparse_hypercolumn", points=points)
        fused = call("fused_hypercolumn", weights=cls(classes=3), labels=torch.tensor([0, 5]))
    assert out[0].isfinite().all() and out[1].isnan().all()
    assert fused[0].isfinite().all() and fused[1].isnan().all()


def test_backends():
    names = hypercolumn_ops.available_backends("cpu")
    assert names[-1] == "reference"
    assert "native" in names, "the compiled extension is not built: pip install --no-build-isolation -e ."
    assert names[0] == "native"
    with pytest.raises(ValueError, match="unknown backend"):
        with hypercolumn_ops.use_backend("cudnn"):
            pass


def test_use_backend_nests_and_restores():
    with hypercolumn_ops.use_backend("reference"):
        with hypercolumn_ops.use_backend("native"):
            assert hypercolumn_ops.backends.current_backend() == "native"
        assert hypercolumn_ops.backends.current_backend() == "reference"
    assert hypercolumn_ops.backends.current_backend() is None


def test_unavailable_backend_for_the_device(monkeypatch):
    monkeypatch.setattr(hypercolumn_ops.backends, "_TRITON_INTERPRET", False)  # Triton: CUDA tensors only
    if torch.cuda.is_available():
        pytest.skip("triton is available on this machine's GPU")
    with pytest.raises(ValueError, match="triton"):
        with hypercolumn_ops.use_backend("triton"):
            call("sparse_hypercolumn")


def test_coordinates_of_another_dtype_are_accepted():
    feats = maps(dtype=torch.bfloat16)
    out = hypercolumn_ops.sparse_hypercolumn(feats, POINTS.double(), image_size=IMAGE)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8)


def test_normalised_arguments():
    (features, boxes, weights, bias, labels, oh, ow, size, scales, padding, activation, orders, sampling_ratio,
     aligned) = ops.normalise_fused_hypercolumn(maps(), [BOXES[:1, 1:], BOXES[1:, 1:]], cls(classes=3),
                                                torch.randn(3, 4, 2), output_size=5, image_size=IMAGE,
                                                labels=torch.tensor([1, 2]), activation="sigmoid", padding="zeros",
                                                sampling_ratio=-2, aligned=False)
    assert boxes.tolist() == BOXES.tolist()
    assert [tuple(w.shape) for w in weights] == [(3, 4, 2, 3), (3, 4, 2, 5)]
    assert bias.shape == (2, 4, 2)
    assert (oh, ow, padding, activation, sampling_ratio, aligned) == (5, 5, 1, 1, -2, False)
    assert size == list(IMAGE) and scales == []
    assert len(orders) == 2
    _, _, size, scales, padding = ops.normalise_sparse_hypercolumn(maps(), POINTS, spatial_scale=[0.5, 0.25],
                                                                   padding="zeros_per_tap")
    assert size == [] and scales == [0.5, 0.25] and padding == 2


def test_extension_built_for_another_torch_is_refused():
    """A stale build must fail at import with the rebuild command, not crash in a kernel."""
    from hypercolumn_ops import _native
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        _native.check_build({"torch_version": "2.3.1", "with_cuda": False}, running="2.14.1+cu130")
    _native.check_build({"torch_version": "2.14.1", "with_cuda": False}, running="2.14.1+cu130")


# ----------------------------------------------------------------------------- edge inputs


@pytest.mark.parametrize("op", WITH_POINTS + WITH_BOXES)
def test_float64_batch_index_is_checked_before_rounding(op):
    """A float64 batch index of 1 - 1e-12 is not an integer, though it rounds to 1.0 in float32 (the
    coordinates of float32 features): refused where values are checked, an invalid (NaN) row
    where they are not, never image 1."""
    key = "points" if op in WITH_POINTS else "boxes"
    rows = (POINTS if op in WITH_POINTS else BOXES).double()
    rows[1, 0] = 1 - 1e-12
    expect(ValueError, key, op, **{key: rows})
    with hypercolumn_ops.set_value_checks(False):
        out = call(op, **{key: rows})
    assert out[0].isfinite().all() and out[1].isnan().all()


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("scale", ["842", b"5", [0.5, "0.25"], torch.tensor(0.5), True])
def test_spatial_scale_of_another_type(op, scale):
    expect(TypeError, "spatial_scale", op, image_size=None, spatial_scale=scale)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("scale", [1e-50, 1e39, float("inf"), float("nan")])
def test_spatial_scale_outside_float32(op, scale):
    """Scales that float32 kernels would turn into 0 or inf are refused for float32 features."""
    expect(ValueError, "spatial_scale", op, image_size=None, spatial_scale=scale)


def test_tiny_spatial_scale_runs_in_float64():
    f64 = [m.double() for m in maps()]
    out = hypercolumn_ops.sparse_hypercolumn(f64, POINTS.double(), spatial_scale=1e-50)
    # Every point maps to feature coordinate -0.5: clamped to the first pixel of each map.
    expected = torch.cat([f[POINTS[:, 0].long(), :, 0, 0] for f in f64], dim=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("size", ["16x20", (16,), (16, 20, 3), (16.5, 20), (16, None), 16, torch.tensor([16, 20])])
def test_image_size_malformed(op, size):
    expect(ValueError, "image_size", op, image_size=size)


def test_image_size_of_integral_floats_and_torch_size():
    features = maps()
    expected = call("sparse_hypercolumn", features=features)
    for size in ((16.0, 20.0), torch.Size(IMAGE)):
        torch.testing.assert_close(call("sparse_hypercolumn", features=features, image_size=size), expected,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("padding", [None, ["border"], "Border", 1])
def test_padding_malformed(op, padding):
    expect(ValueError, "padding", op, padding=padding)


@pytest.mark.parametrize("op", FUSED)
@pytest.mark.parametrize("activation", [1, ["sigmoid"], "Sigmoid"])
def test_activation_malformed(op, activation):
    expect(ValueError, "activation", op, activation=activation)


@pytest.mark.parametrize("op", WITH_BOXES)
@pytest.mark.parametrize("name, value", [("sampling_ratio", 1.5), ("sampling_ratio", True), ("sampling_ratio", "2"),
                                         ("aligned", 1), ("aligned", "yes"), ("aligned", None)])
def test_sampling_arguments_malformed(op, name, value):
    expect(TypeError, name, op, **{name: value})


@pytest.mark.parametrize("op", WITH_BOXES)
def test_sampling_arguments_only_for_boxes(op):
    other = "sparse_hypercolumn" if op == "box_hypercolumn" else "fused_hypercolumn_points"
    with pytest.raises(TypeError, match="sampling_ratio"):
        call(other, sampling_ratio=2)


@pytest.mark.parametrize("op", ["sparse_hypercolumn", "box_hypercolumn"])
def test_mixed_float64_features_promote_under_autocast(op):
    """Under autocast the sampling operators promote mixed features to the widest, as torch.cat:
    float64 with float32 gives float64 (autocast never casts float64)."""
    mixed = [maps()[0].double(), maps()[1]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(op, features=mixed)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, call(op, features=[f.double() for f in mixed]), rtol=0, atol=0)


@pytest.mark.parametrize("op", FUSED)
def test_float64_feature_runs_fused_in_float64_under_autocast(op):
    """A fused call with a float64 map under autocast runs in float64 (autocast casts float32 down
    but never float64; mixing the two would not run)."""
    mixed, weights = [maps()[0].double(), maps()[1]], cls()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(op, features=mixed, weights=weights)
    assert out.dtype == torch.float64
    expected = call(op, features=[f.double() for f in mixed], weights=[w.double() for w in weights])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_use_backend_is_per_thread():
    """A use_backend block holds for its own thread only."""
    import threading

    entered, leave, seen = threading.Event(), threading.Event(), []

    def other():
        with hypercolumn_ops.use_backend("reference"):
            entered.set()
            leave.wait(10)
            seen.append(hypercolumn_ops.backends.current_backend())

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert entered.wait(10)
        assert hypercolumn_ops.backends.current_backend() is None
        with hypercolumn_ops.use_backend("native"):
            assert hypercolumn_ops.backends.current_backend() == "native"
    finally:
        leave.set()
        thread.join(10)
    assert seen == ["reference"]


def test_value_checks_setting_is_per_thread_and_restores():
    import threading

    seen = []
    with hypercolumn_ops.set_value_checks(False):
        thread = threading.Thread(target=lambda: seen.append(_validation._value_checks_mode()))
        thread.start()
        thread.join(10)
        assert _validation._value_checks_mode() is False
    assert seen == [None] and _validation._value_checks_mode() is None
    with pytest.raises(TypeError, match="set_value_checks"):
        hypercolumn_ops.set_value_checks("off")


def _fake_cuda_call(op, monkeypatch, checked):
    """Run ``op`` on fake CUDA tensors (FakeTensorMode: shapes, no data; reading a value back to
    the host, which on a GPU is a synchronisation, raises) through the native operators' fake
    kernels, recording the value checks asked for."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hypercolumn_ops import _native, backends

    monkeypatch.setattr(_native, "available", lambda device_type: True)
    monkeypatch.setitem(backends._DEFAULTS, "cuda", backends._namespace("native"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(_validation, "_index_values_valid", lambda values, size: checked.append(size) or True)
    with FakeTensorMode() as mode:
        cuda = {name: mode.from_tensor(value).to("cuda") for name, value in (("points", POINTS), ("boxes", BOXES),
                                                                              ("locations", LOCATIONS))}
        features, weights = [f.to("cuda") for f in maps()], [w.to("cuda") for w in cls(classes=3)]
        changes = {"features": features}
        if op in FUSED:
            changes.update(weights=weights, labels=torch.tensor([2, 0], device="cuda"))
        if op == "fused_hypercolumn_points":
            changes["locations"] = cuda["locations"]
        key = "points" if op in WITH_POINTS else "boxes"
        return call(op, **{key: cuda[key]}, **changes)


@pytest.mark.parametrize("op", ALL)
def test_default_cuda_call_reads_no_value_back(op, monkeypatch):
    """A default call on CUDA tensors neither checks values nor reads any back: under
    FakeTensorMode any read of a value would raise."""
    checked = []
    out = _fake_cuda_call(op, monkeypatch, checked)
    assert out.device.type == "cuda" and checked == []


@pytest.mark.parametrize("op", ALL)
def test_strict_value_checks_on_cuda(op, monkeypatch):
    checked = []
    with hypercolumn_ops.set_value_checks(True):
        _fake_cuda_call(op, monkeypatch, checked)
    assert checked == ([2, 3] if op in FUSED else [2])  # batch indices in [0, 2), labels in [0, 3)


def test_naive_head_checks_batch_indices_and_labels():
    from hypercolumn_ops.nn import NaiveHypercolumnHead

    head = NaiveHypercolumnHead([3, 5], num_outputs=2, grid_size=2, num_classes=3)
    points = POINTS.clone()
    points[1, 0] = 5.0
    with pytest.raises(ValueError, match="points"):
        head.forward_points(maps(), points, IMAGE, locations=LOCATIONS, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        head.forward_points(maps(), POINTS, IMAGE, locations=LOCATIONS, labels=torch.tensor([0, 3]))
    boxes = BOXES.clone()
    boxes[0, 0] = -1.0
    with pytest.raises(ValueError, match="boxes"):
        head(maps(), boxes, IMAGE, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        head(maps(), BOXES, IMAGE, labels=torch.tensor([4, 1]))


@pytest.mark.parametrize("op", WITH_BOXES)
def test_sampling_ratio_bound(op):
    expect(ValueError, "sampling_ratio", op, sampling_ratio=1025)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("op", ALL)
def test_default_cuda_call_does_not_synchronise(op, backward):
    """On a GPU, with CUDA's synchronisation debug mode set to raise: a default call (and its
    backward) never waits for the device."""
    features = [f.cuda().requires_grad_(backward) for f in maps()]
    changes = {"features": features, "points": POINTS.cuda(), "boxes": BOXES.cuda(),
               "locations": LOCATIONS.cuda()}
    if op in FUSED:
        changes["weights"] = [w.cuda().requires_grad_(backward) for w in cls(classes=3)]
        changes["labels"] = torch.tensor([2, 0], device="cuda")
    changes = {k: v for k, v in changes.items() if k in ("features", "weights", "labels")
               or k == ("points" if op in WITH_POINTS else "boxes") or (k == "locations" and op in WITH_POINTS
                                                                          and op in FUSED)}
    call(op, **changes)  # warm-up: first calls load kernels and set up libraries
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = call(op, **changes)
        if backward:
            out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
