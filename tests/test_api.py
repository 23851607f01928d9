"""The public face: one test per bad-input case of the contract (exception type, and a message
that names the argument), backend selection, the value-check switch."""

import pytest
import torch

import hypercolumn_ops
from hypercolumn_ops import ops

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
        monkeypatch.setattr(ops, "native_available", lambda device_type: False)
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
    hypercolumn_ops.set_value_checks(False)
    try:
        with hypercolumn_ops.use_backend(backend):
            out = call("sparse_hypercolumn", points=points)
            fused = call("fused_hypercolumn", weights=cls(classes=3), labels=torch.tensor([0, 5]))
    finally:
        hypercolumn_ops.set_value_checks(True)
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
    features, boxes, weights, bias, labels, oh, ow, sy, sx, padding, activation, orders = \
        ops.normalise_fused_hypercolumn(maps(), [BOXES[:1, 1:], BOXES[1:, 1:]], cls(classes=3),
                                        torch.randn(3, 4, 2), output_size=5, image_size=IMAGE,
                                        labels=torch.tensor([1, 2]), activation="sigmoid", padding="zeros")
    assert boxes.tolist() == BOXES.tolist()
    assert [tuple(w.shape) for w in weights] == [(3, 4, 2, 3), (3, 4, 2, 5)]
    assert bias.shape == (2, 4, 2)
    assert (oh, ow, padding, activation) == (5, 5, 1, 1)
    assert sy == [8 / 16, 4 / 16] and sx == [10 / 20, 5 / 20]
    assert len(orders) == 2


def test_extension_built_for_another_torch_is_refused():
    """A stale build must fail at import with the rebuild command, not crash in a kernel."""
    from hypercolumn_ops import _native
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        _native.check_build({"torch_version": "2.3.1", "with_cuda": False}, running="2.14.1+cu130")
    _native.check_build({"torch_version": "2.14.1", "with_cuda": False}, running="2.14.1+cu130")
