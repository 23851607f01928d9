"""torch.compile(fullgraph=True) traces models that call every operator, forward and backward,
with no graph break, on every backend that runs on the CPU here."""

import io

import pytest
import torch

import hypercolumn_ops

IMAGE = (15, 17)


class Heads(torch.nn.Module):
    """Calls all four operators and sums their outputs into one loss."""

    def __init__(self, channels=(3, 6), grid=3, outputs=2):
        super().__init__()
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(grid * grid, outputs, c, dtype=torch.float64)) for c in channels])
        self.bias = torch.nn.Parameter(torch.randn(grid * grid, outputs, dtype=torch.float64))

    def forward(self, features, boxes, points, locations):
        a = hypercolumn_ops.sparse_hypercolumn(features, points, image_size=IMAGE)
        b = hypercolumn_ops.box_hypercolumn(features, boxes, (4, 3), image_size=IMAGE, padding="zeros")
        c = hypercolumn_ops.fused_hypercolumn(features, boxes, list(self.weights), self.bias, output_size=(5, 4),
                                              image_size=IMAGE, activation="sigmoid")
        d = hypercolumn_ops.fused_hypercolumn_points(features, points, list(self.weights), self.bias,
                                                     locations=locations, image_size=IMAGE)
        return a.sum() + b.square().sum() + c.sum() + d.sum()


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(2, 3, 8, 9, generator=g, dtype=torch.float64, requires_grad=True),
                torch.randn(2, 6, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)]
    boxes = torch.tensor([[0, 1.0, 2.0, 12.0, 9.0], [1, -2.0, 3.0, 7.5, 16.0]], dtype=torch.float64)
    points = torch.tensor([[0, 0.5, 3.0], [1, 16.0, 14.5], [1, 8.0, 7.0]], dtype=torch.float64)
    locations = torch.rand(3, 2, generator=g, dtype=torch.float64)
    return features, boxes, points, locations


# aot_eager traces what inductor gets; inductor (torch.compile's default) also generates and
# builds C++ around the operators: seconds per graph, so once, with the compiled kernels.
COMPILERS = [(b, "aot_eager") for b in hypercolumn_ops.available_backends("cpu") if b != "triton"]
COMPILERS += [("native", "inductor")] if "native" in hypercolumn_ops.available_backends("cpu") else []


@pytest.mark.parametrize("backend, compiler", COMPILERS)
@pytest.mark.slow
def test_compile_fullgraph_matches_eager(backend, compiler):
    torch._dynamo.reset()
    model = Heads()
    features, boxes, points, locations = inputs(0)
    with hypercolumn_ops.use_backend(backend):
        eager = model(features, boxes, points, locations)
        eager_grads = torch.autograd.grad(eager, [*features, *model.parameters()])
        compiled = torch.compile(model, fullgraph=True, backend=compiler)
        out = compiled(features, boxes, points, locations)
        grads = torch.autograd.grad(out, [*features, *model.parameters()])
    # The same kernels run in the same order: only the graph around them differs (inductor may
    # add the four sums in another order: float64 rounding of a sum of about 100 terms).
    torch.testing.assert_close(out, eager, rtol=1e-12, atol=1e-12)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-12, atol=1e-12)


def counted_rows(boxes, points, generator):
    """``boxes`` random boxes and ``points`` random points (with locations) over both images."""
    g = generator
    box_rows = torch.cat([torch.randint(0, 2, (boxes, 1), generator=g), torch.rand(boxes, 2, generator=g) * 6,
                          8 + torch.rand(boxes, 2, generator=g) * 6], 1).double()
    point_rows = torch.cat([torch.randint(0, 2, (points, 1), generator=g),
                            torch.rand(points, 2, generator=g) * 14], 1).double()
    return box_rows, point_rows, torch.rand(points, 2, generator=g, dtype=torch.float64)


# The reference backend is left out: written for clarity, it specialises on the counts.
@pytest.mark.parametrize("backend", [b for b in hypercolumn_ops.available_backends("cpu") if b != "reference"])
@pytest.mark.slow
def test_compiled_model_follows_changing_box_and_point_counts(backend):
    """A detector sends another number of boxes every step: after the first count, the model
    compiles once more with symbolic counts (torch.compile's default), then never again, and
    stays equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = Heads()
    features = inputs(0)[0]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    g = torch.Generator().manual_seed(5)
    with hypercolumn_ops.use_backend(backend):
        for count in (3, 5, 8, 13, 21):
            boxes, points, locations = counted_rows(count, count + 1, g)
            out = compiled(features, boxes, points, locations)
            eager = model(features, boxes, points, locations)
            torch.testing.assert_close(out, eager, rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 2


class Segmenter(torch.nn.Module):
    """A detector's mask head as users write it: the image size read off the batch of images."""

    def __init__(self):
        super().__init__()
        from hypercolumn_ops.nn import HypercolumnHead

        self.head = HypercolumnHead([3, 6], num_outputs=2, grid_size=3, output_size=(5, 4), num_classes=4,
                                    activation="sigmoid").double()

    def forward(self, images, features, boxes, labels):
        return self.head(features, boxes, image_size=images.shape[-2:], labels=labels)


@pytest.mark.parametrize("dynamic", [None, True], ids=["default", "dynamic"])
@pytest.mark.parametrize("backend", [b for b in hypercolumn_ops.available_backends("cpu") if b != "reference"])
@pytest.mark.slow
def test_compiled_head_follows_changing_image_sizes(backend, dynamic):
    """A detector sees another image size (and box count) nearly every batch: a fullgraph-compiled
    head reads the size off the images (``image_size=images.shape[-2:]``, symbolic once it
    changes) and compiles at most twice over five sizes, equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = Segmenter()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=dynamic)
    g = torch.Generator().manual_seed(3)
    with hypercolumn_ops.use_backend(backend):
        # Both sides change every batch: torch.compile makes a dimension symbolic once it changes.
        for count, (height, width) in zip((3, 5, 8, 13, 21), ((32, 36), (40, 44), (28, 52), (64, 60), (30, 33))):
            images = torch.zeros(2, 3, height, width, dtype=torch.float64)
            features = [torch.randn(2, 3, height // 4, width // 4, generator=g, dtype=torch.float64),
                        torch.randn(2, 6, height // 8, width // 8, generator=g, dtype=torch.float64)]
            boxes = counted_rows(count, 1, g)[0]
            labels = torch.randint(0, 4, (count,), generator=g)
            out = compiled(images, features, boxes, labels)
            torch.testing.assert_close(out, model(images, features, boxes, labels), rtol=1e-12, atol=1e-12)
    assert counter.frame_count <= 2


def dynamic_export(strict=False):
    """``Heads`` exported with dynamic box and point counts: (model, its features, the program)."""
    model = Heads()
    features, boxes, points, locations = inputs(0)
    features = [f.detach() for f in features]
    boxes_count, points_count = torch.export.Dim("R", min=1, max=4096), torch.export.Dim("N", min=1, max=4096)
    shapes = {"features": [None] * len(features), "boxes": {0: boxes_count}, "points": {0: points_count},
              "locations": {0: points_count}}
    program = torch.export.export(model, (features, boxes, points, locations), dynamic_shapes=shapes, strict=strict)
    return model, features, program


def assert_equal_to_eager_at_other_counts(run, model, features, seed):
    g = torch.Generator().manual_seed(seed)
    for count in (1, 7, 40):
        boxes, points, locations = counted_rows(count, count + 2, g)
        # Both evaluation orders are exact and eager may pick the other one; inductor may add the
        # four sums in another order: float64 rounding apart.
        torch.testing.assert_close(run(features, boxes, points, locations), model(features, boxes, points, locations),
                                   rtol=1e-12, atol=1e-12)


class Pooler(torch.nn.Module):
    """torchvision detection's pooling and PointRend's sampling, as hypercolumn_ops calls: every
    sampling option that is not the default."""

    def forward(self, features, boxes, points):
        pooled = hypercolumn_ops.box_hypercolumn(features, boxes, (4, 3), spatial_scale=[0.5, 0.25],
                                                 padding="zeros", sampling_ratio=0, aligned=False)
        fixed = hypercolumn_ops.box_hypercolumn(features, boxes, (2, 5), image_size=IMAGE, sampling_ratio=2,
                                                padding="zeros_per_tap")
        sampled = hypercolumn_ops.sparse_hypercolumn(features, points, image_size=IMAGE, padding="zeros_per_tap")
        return pooled.square().sum() + fixed.sum() + sampled.sum()


@pytest.mark.parametrize("backend", [b for b in hypercolumn_ops.available_backends("cpu") if b != "reference"])
def test_compile_and_export_with_sampling_options(backend):
    """sampling_ratio (fixed and adaptive), aligned=False and padding="zeros_per_tap" trace with
    torch.compile(fullgraph=True) and torch.export, forward and backward, equal to eager."""
    torch._dynamo.reset()
    model = Pooler()
    features, boxes, points, _ = inputs(1)
    with hypercolumn_ops.use_backend(backend):
        eager = model(features, boxes, points)
        eager_grads = torch.autograd.grad(eager, features)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(features, boxes, points)
        grads = torch.autograd.grad(compiled, features)
        exported = torch.export.export(model, ([f.detach() for f in features], boxes, points)).module()
        out = exported([f.detach() for f in features], boxes, points)
    # The same kernels on the same inputs: only the sums around them may run in another order.
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, eager.detach(), rtol=1e-12, atol=1e-12)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("backend", [b for b in hypercolumn_ops.available_backends("cpu") if b != "reference"])
@pytest.mark.slow
def test_export_with_a_dynamic_number_of_boxes_and_points(backend, strict):
    """torch.export of a model whose box and point counts are dynamic: while exporting, the
    per-layer evaluation order is chosen without looking at the counts
    (planning.many_points_order), so export adds no constraint on them; the exported program, saved
    and loaded again, then runs other counts."""
    with hypercolumn_ops.use_backend(backend):
        model, features, exported = dynamic_export(strict)
        saved = io.BytesIO()
        torch.export.save(exported, saved)
        saved.seek(0)
        assert_equal_to_eager_at_other_counts(torch.export.load(saved).module(), model, features, 6)


@pytest.mark.skipif("native" not in hypercolumn_ops.available_backends("cpu"), reason="needs the compiled extension")
@pytest.mark.skipif(not hasattr(torch._inductor, "aoti_compile_and_package"),
                    reason="AOTInductor packages came with torch 2.6")
@pytest.mark.slow
def test_aot_inductor_package_with_a_dynamic_number_of_boxes_and_points(tmp_path):
    """AOTInductor compiles the exported model (all four operators, dynamic counts) into a
    package; loaded again, it runs other counts equal to eager. (tools/aoti_check.py runs such a
    package from C++ in CI.)"""
    with torch.no_grad():
        model, features, exported = dynamic_export()
        package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "heads.pt2"))
        assert_equal_to_eager_at_other_counts(torch._inductor.aoti_load_package(package), model, features, 7)
