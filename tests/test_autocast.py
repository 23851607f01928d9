"""The operators inside ``torch.autocast``: the fused operators run in the autocast dtype (as
conv2d and linear), the sampling operators promote mixed features to the widest dtype (as cat),
float64 is never cast, gradients reach float32 parameters in float32, no product inside an
operator is autocast behind the kernels' back (``csrc/autocast.cpp``), and the modules and task
losses work inside a mixed-precision model.

Each check compares a call inside the region with the same call outside it on inputs cast by
hand: the same kernels on the same values, so the results are equal bit for bit (deterministic
mode on CUDA, where backward passes otherwise add with atomics).
"""

import copy

import pytest
import torch

import hypercolumn_ops
from hypercolumn_ops import ops
from hypercolumn_ops.nn import HypercolumnHead, NaiveHypercolumnHead
from hypercolumn_ops.tasks import FigureGroundTask, KeypointTask, PartTask
import cases
from kernel_checks import deterministic_algorithms

IMAGE = (17, 21)
CHANNELS = (3, 6, 5)
SHAPES = ((9, 10), (5, 6), (3, 3))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]
FUSED = ["fused_hypercolumn", "fused_hypercolumn_points"]
SAMPLING = ["sparse_hypercolumn", "box_hypercolumn"]


def backends(device):
    return hypercolumn_ops.available_backends(device) if device == "cpu" or torch.cuda.is_available() else []


def device_backends():
    """(device, backend) pairs that can run here (CUDA ones marked, and skipped without a GPU)."""
    pairs = [pytest.param("cpu", b, id=f"cpu-{b}") for b in hypercolumn_ops.available_backends("cpu")]
    for b in ("native", "triton", "reference"):
        pairs.append(pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.needs_cuda))
    return pairs


def leaves(dtypes, device, seed=0, grid=2, outputs=2, classes=None):
    """Features of the given dtypes and float32 classifier weights and bias, all leaves."""
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(2, c, h, w, generator=g).to(device=device, dtype=d).requires_grad_()
                for c, (h, w), d in zip(CHANNELS, SHAPES, dtypes)]
    lead = (grid * grid, outputs) if classes is None else (classes, grid * grid, outputs)
    weights = [(torch.randn(*lead, c, generator=g) / c ** 0.5).to(device).requires_grad_() for c in CHANNELS]
    bias = torch.randn(*lead, generator=g).to(device).requires_grad_()
    return features, weights, bias


def call(op, features, weights, bias, device, labels=None):
    boxes = torch.tensor([[0, 1.0, 2.0, 15.5, 13.0], [1, -2.0, 0.5, 20.0, 17.0], [1, 4.0, 4.0, 6.0, 9.0]],
                         device=device)
    points = torch.tensor([[0, 0.0, 0.0], [1, 20.5, 16.0], [0, 7.25, 3.5], [1, 21.0, 17.0], [1, 10.0, 8.0]],
                          device=device)
    if op == "sparse_hypercolumn":
        return hypercolumn_ops.sparse_hypercolumn(features, points, image_size=IMAGE)
    if op == "box_hypercolumn":
        return hypercolumn_ops.box_hypercolumn(features, boxes, (4, 5), image_size=IMAGE, padding="zeros")
    if op == "fused_hypercolumn":
        return hypercolumn_ops.fused_hypercolumn(features, boxes, weights, bias, output_size=(5, 4),
                                                 image_size=IMAGE, labels=labels, activation="sigmoid")
    locations = torch.rand(points.shape[0], 2, generator=torch.Generator().manual_seed(3)).to(device)
    return hypercolumn_ops.fused_hypercolumn_points(features, points, weights, bias, locations=locations,
                                                    image_size=IMAGE, labels=None if labels is None else labels[:1]
                                                    .expand(points.shape[0]).contiguous())


def output_and_grads(run, tensors):
    """``run()``'s output and the gradients of a fixed projection of it with respect to ``tensors``."""
    out = run()
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    grads = torch.autograd.grad((out.float() * probe).sum(), tensors)
    return out, grads


def assert_equal(actual, expected):
    out, grads = actual
    out_e, grads_e = expected
    assert out.dtype == out_e.dtype
    torch.testing.assert_close(out, out_e, rtol=0, atol=0, equal_nan=True)
    for grad, grad_e in zip(grads, grads_e):
        assert grad.dtype == grad_e.dtype
        torch.testing.assert_close(grad, grad_e, rtol=0, atol=0)


@pytest.mark.parametrize("device, backend", device_backends())
@pytest.mark.parametrize("op", FUSED)
@pytest.mark.parametrize("feature_dtype", ["float32", "low"])
@pytest.mark.parametrize("classes", [None, 3])
@pytest.mark.slow
def test_fused_operators_run_in_the_autocast_dtype(device, backend, op, feature_dtype, classes):
    low = torch.get_autocast_dtype(device)
    dtype = low if feature_dtype == "low" else torch.float32
    features, weights, bias = leaves([dtype] * 3, device, classes=classes)
    labels = None if classes is None else torch.tensor([2, 0, 1], device=device)
    tensors = [*features, *weights, bias]

    def inside():
        with torch.autocast(device, dtype=low):
            return call(op, features, weights, bias, device, labels)

    def by_hand():
        return call(op, [f.to(low) for f in features], [w.to(low) for w in weights], bias.to(low), device, labels)

    with hypercolumn_ops.use_backend(backend), deterministic_algorithms(device == "cuda"):
        actual = output_and_grads(inside, tensors)
        expected = output_and_grads(by_hand, tensors)
    assert actual[0].dtype == low
    assert [g.dtype for g in actual[1]] == [t.dtype for t in tensors]  # float32 parameters, float32 gradients
    assert_equal(actual, expected)


@pytest.mark.parametrize("device, backend", device_backends())
@pytest.mark.parametrize("op", SAMPLING)
@pytest.mark.parametrize("mixed", [True, False], ids=["mixed-promoted", "one-dtype-kept"])
@pytest.mark.slow
def test_sampling_operators_promote_mixed_features(device, backend, op, mixed):
    low = torch.get_autocast_dtype(device)
    features, _, _ = leaves([low, torch.float32, low] if mixed else [low] * 3, device)
    widest = torch.float32 if mixed else low

    def inside():
        with torch.autocast(device, dtype=low):
            return call(op, features, None, None, device)

    def by_hand():
        return call(op, [f.to(widest) for f in features], None, None, device)

    with hypercolumn_ops.use_backend(backend), deterministic_algorithms(device == "cuda"):
        actual = output_and_grads(inside, features)
        expected = output_and_grads(by_hand, features)
    assert actual[0].dtype == widest
    assert_equal(actual, expected)


@pytest.mark.parametrize("device, backend", device_backends())
@pytest.mark.parametrize("op", FUSED + SAMPLING)
@pytest.mark.slow
def test_float64_is_never_cast(device, backend, op):
    features, weights, bias = leaves([torch.float64] * 3, device)
    weights = [w.detach().double().requires_grad_() for w in weights]
    bias = bias.detach().double().requires_grad_()
    tensors = features + (weights + [bias] if op in FUSED else [])

    def inside():
        with torch.autocast(device, dtype=torch.get_autocast_dtype(device)):
            return call(op, features, weights, bias, device)

    with hypercolumn_ops.use_backend(backend), deterministic_algorithms(device == "cuda"):
        actual = output_and_grads(inside, tensors)
        expected = output_and_grads(lambda: call(op, features, weights, bias, device), tensors)
    assert actual[0].dtype == torch.float64
    assert_equal(actual, expected)


# The reference backend is left out: its backward is plain autograd, which autocasts a backward
# run inside the region by itself (PyTorch advises running backward outside autocast).
@pytest.mark.parametrize("device, backend", [p for p in device_backends() if p.values[1] != "reference"])
@pytest.mark.parametrize("op", FUSED + SAMPLING)
@pytest.mark.slow
def test_backward_inside_the_region(device, backend, op):
    low = torch.get_autocast_dtype(device)
    features, weights, bias = leaves([torch.float32] * 3, device)
    tensors = features + (weights + [bias] if op in FUSED else [])

    def backward(inside):
        with hypercolumn_ops.use_backend(backend), torch.autocast(device, dtype=low):
            out = call(op, features, weights, bias, device)
            probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
            if inside:
                return out, torch.autograd.grad((out.float() * probe).sum(), tensors)
        return out, torch.autograd.grad((out.float() * probe).sum(), tensors)

    with deterministic_algorithms(device == "cuda"):
        assert_equal(backward(inside=True), backward(inside=False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", FUSED)
def test_compiled_operators_are_not_autocast_inside(device, op):
    """Called directly with float32 arguments inside the region, the compiled operators run in
    float32: their score-map products (forced on every layer here) are not autocast."""
    if "native" not in backends(device):
        pytest.skip("the extension is not built for this device")
    features, weights, bias = (leaves([torch.float32] * 3, device))
    normalise = getattr(ops, "normalise_" + op)
    if op == "fused_hypercolumn":
        boxes = torch.tensor([[0, 1.0, 2.0, 15.5, 13.0]], device=device)
        args = list(normalise(features, boxes, weights, bias, output_size=(5, 4), image_size=IMAGE,
                              activation="sigmoid"))
    else:
        points = torch.tensor([[0, 3.0, 2.0], [1, 20.5, 16.0]], device=device)
        args = list(normalise(features, points, weights, bias, locations=torch.rand(2, 2, device=device),
                              image_size=IMAGE, activation="sigmoid"))
    args = cases.with_orders(op, args, [1] * len(features))  # every layer projected by a matrix product
    forward = getattr(torch.ops.hypercolumn_ops, op)
    backward = getattr(torch.ops.hypercolumn_ops, op + "_backward")
    detached = [[t.detach() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
                else a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    with deterministic_algorithms(device == "cuda"):
        expected = forward(*detached)
        grad = torch.randn_like(expected)
        expected_grads = backward(grad, *detached)
        with torch.autocast(device, dtype=torch.get_autocast_dtype(device)):
            out = forward(*detached)
            grads = backward(grad, *detached)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for group, expected_group in zip(grads, expected_grads):
        for g, e in zip(group if isinstance(group, (list, tuple)) else [group],
                        expected_group if isinstance(expected_group, (list, tuple)) else [expected_group]):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend", [b for b in hypercolumn_ops.available_backends("cpu") if b != "triton"])
@pytest.mark.slow
def test_compile_fullgraph_under_autocast(backend):
    torch._dynamo.reset()
    features, weights, bias = leaves([torch.float32] * 3, "cpu")

    def model(features, weights, bias):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = call("fused_hypercolumn", features, weights, bias, "cpu")
            b = call("sparse_hypercolumn", [features[0].bfloat16(), *features[1:]], None, None, "cpu")
        return a.float().sum() + b.square().sum()

    tensors = [*features, *weights, bias]
    with hypercolumn_ops.use_backend(backend):
        eager = model(features, weights, bias)
        eager_grads = torch.autograd.grad(eager, tensors)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(features, weights, bias)
        grads = torch.autograd.grad(out, tensors)
    # The same kernels on the same values; only the graph around them differs.
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_head_is_a_drop_in_under_autocast(device):
    """Inside a mixed-precision model the fused head takes the backbone's low-precision features
    and float32 parameters, as the naive head's convolutions do, and stays the closer of the two
    to the exact value of the function they share."""
    low = torch.get_autocast_dtype(device)
    torch.manual_seed(0)
    fused = HypercolumnHead(CHANNELS, 2, grid_size=3, output_size=(6, 5), activation="sigmoid").to(device)
    naive = NaiveHypercolumnHead(CHANNELS, 2, grid_size=3, output_size=(6, 5), activation="sigmoid").to(device)
    naive.load_state_dict(fused.state_dict())
    exact = copy.deepcopy(fused).double()
    backbone = torch.nn.ModuleList([torch.nn.Conv2d(3, c, 1) for c in CHANNELS]).to(device)
    g = torch.Generator().manual_seed(2)
    images = [torch.randn(2, 3, h, w, generator=g).to(device) for h, w in SHAPES]
    boxes = torch.tensor([[0, 1.0, 2.0, 15.5, 13.0], [1, 3.0, 0.5, 20.0, 17.0]], device=device)
    with torch.autocast(device, dtype=low):
        features = [conv(x) for conv, x in zip(backbone, images)]
        assert all(f.dtype == low for f in features)
        out = fused(features, boxes, image_size=IMAGE)
        naive_out = naive(features, boxes, image_size=IMAGE)
    assert out.dtype == naive_out.dtype == low
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fused.parameters())
    # The same features and parameters in float64: the function both heads evaluate, exactly.
    truth = exact([f.double() for f in features], boxes, image_size=IMAGE)
    eps = torch.finfo(low).eps
    # The fused head rounds the weights and its output to `low` and sums in float32: within half a
    # unit of `low` per rounding on outputs in (0, 1), after a sigmoid of slope <= 1/4 (0.28 eps at
    # most over 20 seeds on the CPU, both dtypes).
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=eps)
    # The naive head rounds every upsampled value and product to `low` as well (up to 4 eps in
    # bfloat16 and 32 in float16 on the CPU over 20 seeds): a bound on the baseline, not on us.
    torch.testing.assert_close(naive_out.double(), truth, rtol=0, atol=64 * eps)


@pytest.mark.parametrize("device", DEVICES)
def test_task_losses_inside_the_region(device):
    """The tasks' losses run in float32 inside the region as outside (on CUDA, autocast refuses
    the binary_cross_entropy of the figure-ground loss unless it turns autocast off)."""
    g = torch.Generator().manual_seed(4)
    low = torch.get_autocast_dtype(device)
    probabilities = torch.rand(3, 6, 5, generator=g).to(device=device, dtype=low)
    soft = torch.rand(3, 6, 5, generator=g).to(device)
    logits = torch.randn(3, 4, 6, 5, generator=g).to(device=device, dtype=low)
    heat_maps = torch.rand(3, 4, 6, 5, generator=g).to(device) > 0.7
    visible = torch.tensor([[True, False, True, True]] * 3, device=device)
    labels = torch.randint(0, 4, (3, 6, 5), generator=g).to(device)
    losses = [lambda: FigureGroundTask.loss(probabilities, soft),
              lambda: KeypointTask.loss(logits, heat_maps, visible),
              lambda: PartTask.loss(logits, labels)]
    for loss in losses:
        with torch.autocast(device, dtype=low):
            inside = loss()
        outside = loss()
        assert inside.dtype == torch.float32
        # Equal bits on the CPU. On CUDA, cross_entropy over maps (nll_loss2d) adds its blocks'
        # sums with atomics, in any order: float32 rounding apart.
        exact = device == "cpu"
        torch.testing.assert_close(inside, outside, rtol=0 if exact else None, atol=0 if exact else None)
