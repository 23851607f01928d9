"""ONNX export (``hypercolumn_ops.onnx``): models that call each operator, and the heads, exported
with ``torch.onnx.export(dynamo=True)`` and run by ONNX Runtime's CPU provider, at box or point
counts and map sizes the export never saw, against eager and against the float64 reference."""

import argparse
import copy
import dataclasses
from typing import Optional, Tuple

import pytest
import torch

import hypercolumn_ops

pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install onnx)")
pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install onnxscript)")
ort = pytest.importorskip("onnxruntime", reason="running exported models needs onnxruntime (pip install onnxruntime)")

import hypercolumn_ops.onnx as hc_onnx  # noqa: E402  (imports onnxscript)

Dim = torch.export.Dim
NATIVE = "native" in hypercolumn_ops.available_backends("cpu")


def ort_session(program):
    return ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def run_ort(session, inputs: dict):
    """Outputs of ``session`` as tensors; ``inputs`` by name, those the graph does not take left out."""
    names = [i.name for i in session.get_inputs()]
    feed = {name: inputs[name].numpy() for name in names}
    return [torch.from_numpy(out) for out in session.run(None, feed)]


def assert_close_relative(actual, expected, rtol):
    """Within ``rtol`` of each value, or ``rtol`` of the output's largest magnitude (at least 1)
    where values cancel to near zero (a relative bound alone is meaningless at a sum that is
    nearly 0); NaN where expected is NaN."""
    scale = max(float(expected.nan_to_num(0).abs().max()), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, equal_nan=True)


# ----------------------------------------------------------------------------- one operator


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of an operator with fixed options; counts and map sizes are dynamic."""

    op: str
    padding: str = "border"
    grid: int = 1  # K
    classes: Optional[int] = None  # NC, with labels
    bias: Optional[str] = None  # None, "shared" (KK, M), "class" (NC, KK, M), "rows" (R, KK, M), "box_bias"
    activation: Optional[str] = None
    scale: str = "image_size"  # or "spatial_scale"
    sampling_ratio: int = 1
    aligned: bool = True
    # Layer 0 has one channel, so planning.many_points_order samples its features; layer 1
    # projects its map to score channels first: every fused case takes both evaluation orders.
    channels: Tuple[int, int] = (1, 6)
    outputs: int = 2  # M

    @property
    def fused(self) -> bool:
        return self.op.startswith("fused")

    @property
    def boxes(self) -> bool:
        return self.op in ("box_hypercolumn", "fused_hypercolumn")

    def __str__(self):
        fields = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                  if getattr(self, f.name) != f.default and f.name != "op"]
        return ",".join([self.op] + fields)


class OneOperator(torch.nn.Module):
    """Calls ``case.op`` on two maps (strides 2 and 4 of the image, whose size follows the first
    map's) at ``rows`` (boxes or points); ``locations``, ``labels`` and ``row_bias`` are inputs
    too, one per row, used where the case needs them."""

    def __init__(self, case: Case, dtype=torch.float32, seed=0):
        super().__init__()
        self.case = case
        g = torch.Generator().manual_seed(seed)
        lead = (case.grid ** 2, case.outputs) if case.classes is None else (case.classes, case.grid ** 2, case.outputs)
        self.weight = torch.nn.ParameterList(
            [torch.nn.Parameter((torch.randn(*lead, c, generator=g) / c ** 0.5).to(dtype)) for c in case.channels])
        bias_shape = {"shared": lead[-2:], "class": lead}.get(case.bias)
        self.bias = None if bias_shape is None else torch.nn.Parameter(torch.randn(*bias_shape, generator=g).to(dtype))

    def forward(self, f0, f1, rows, locations, labels, row_bias):
        case = self.case
        features = [f0, f1]
        scales = {"image_size": (f0.shape[2] * 2, f0.shape[3] * 2)} if case.scale == "image_size" else \
            {"spatial_scale": [0.5, 0.25]}
        box = {"sampling_ratio": case.sampling_ratio, "aligned": case.aligned} if case.boxes else {}
        if case.op == "sparse_hypercolumn":
            return hypercolumn_ops.sparse_hypercolumn(features, rows, padding=case.padding, **scales)
        if case.op == "box_hypercolumn":
            return hypercolumn_ops.box_hypercolumn(features, rows, (5, 4), padding=case.padding, **scales, **box)
        fused = dict(padding=case.padding, activation=case.activation, labels=labels if case.classes else None,
                     **scales, **box)
        bias = row_bias if case.bias == "rows" else self.bias
        if case.bias == "box_bias":
            fused["box_bias"] = row_bias
        if case.op == "fused_hypercolumn":
            return hypercolumn_ops.fused_hypercolumn(features, rows, list(self.weight), bias, output_size=(5, 4),
                                                     **fused)
        return hypercolumn_ops.fused_hypercolumn_points(features, rows, list(self.weight), bias,
                                                        locations=locations if case.grid > 1 else None, **fused)


def case_inputs(case: Case, count: int, size: Tuple[int, int], seed: int, dtype=torch.float32) -> dict:
    """Inputs of :class:`OneOperator`: two images' maps of ``size`` and ``size // 2`` (an image of
    twice ``size``), ``count`` rows over and around the image, some on its borders."""
    g = torch.Generator().manual_seed(seed)
    height, width = size
    image_h, image_w = 2 * height, 2 * width
    f0 = torch.randn(2, case.channels[0], height, width, generator=g, dtype=torch.float64)
    f1 = torch.randn(2, case.channels[1], (height + 1) // 2, (width + 1) // 2, generator=g, dtype=torch.float64)
    batch = torch.randint(0, 2, (count, 1), generator=g).double()
    scale = torch.tensor([image_w, image_h], dtype=torch.float64)
    if case.boxes:
        corner = (torch.rand(count, 2, generator=g, dtype=torch.float64) * 1.3 - 0.15) * scale
        extent = torch.rand(count, 2, generator=g, dtype=torch.float64) * 0.7 * scale
        rows = torch.cat([batch, corner, corner + extent], dim=1)
        rows[: count // 4, 1:] = torch.tensor([0.0, 0.0, image_w, image_h], dtype=torch.float64)  # whole image
    else:
        rows = torch.cat([batch, (torch.rand(count, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1) * scale], 1)
        rows[: count // 4, 1:] = torch.tensor([0.0, image_h], dtype=torch.float64).expand(count // 4, 2)  # corners
    cells, outputs = case.grid ** 2, case.outputs
    return {"f0": f0.to(dtype), "f1": f1.to(dtype), "rows": rows.to(dtype),
            "locations": torch.rand(count, 2, generator=g, dtype=torch.float64).to(dtype),
            "labels": torch.randint(0, case.classes or 1, (count,), generator=g),
            "row_bias": torch.randn(count, cells, outputs, generator=g, dtype=torch.float64).to(dtype)}


def export_case(case: Case, dtype=torch.float32):
    """(model, ONNX Runtime session) of ``case``, exported at 3 rows on 9 x 7 and 5 x 4 maps, with
    the row count and every map size dynamic."""
    model = OneOperator(case, dtype).eval()
    example = case_inputs(case, 3, (9, 7), seed=1, dtype=dtype)
    rows = Dim("rows")
    shapes = {"f0": {2: Dim("h0"), 3: Dim("w0")}, "f1": {2: Dim("h1"), 3: Dim("w1")}, "rows": {0: rows},
              "locations": {0: rows}, "labels": {0: rows}, "row_bias": {0: rows}}
    program = hc_onnx.export(model, (), kwargs=example, dynamic_shapes=shapes)
    return model, ort_session(program)


def check_case(case: Case, model, session, dtype=torch.float32):
    """ORT at other counts and map sizes against eager (where the compiled kernels run the case)
    and against the reference, run in float64 on the same values."""
    exact = copy.deepcopy(model).double()
    for count, size, seed in ((11, (13, 10), 2), (1, (6, 16), 3)):
        inputs = case_inputs(case, count, size, seed, dtype)
        out, = run_ort(session, inputs)
        with torch.no_grad():
            if NATIVE and dtype == torch.float32:
                # The kernels and the graph add the same terms in other orders (the product of a
                # score map, the four taps, the K x K blend): float32 rounding, some ulps.
                assert_close_relative(out, model(**inputs), rtol=1e-5)
            with hypercolumn_ops.use_backend("reference"):
                truth = exact(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
        # float32: the same rounding against the exact value; float64: the graph computes the
        # reference's formulas in the same dtype, so only summation order separates them.
        assert_close_relative(out.double(), truth, rtol=1e-5 if dtype == torch.float32 else 1e-12)


SPARSE_CASES = [Case("sparse_hypercolumn", padding=p, scale=s) for p in ("border", "zeros", "zeros_per_tap")
                for s in ("image_size", "spatial_scale")]
BOX_CASES = [Case("box_hypercolumn", padding=p) for p in ("border", "zeros", "zeros_per_tap")] + [
    Case("box_hypercolumn", padding="zeros", sampling_ratio=2),
    Case("box_hypercolumn", padding="border", sampling_ratio=0, scale="spatial_scale"),
    Case("box_hypercolumn", padding="zeros", aligned=False),
    Case("box_hypercolumn", padding="zeros_per_tap", sampling_ratio=0, aligned=False),
]
FUSED_CASES = [
    Case("fused_hypercolumn"),
    Case("fused_hypercolumn", padding="zeros", grid=3, bias="shared", activation="sigmoid"),
    Case("fused_hypercolumn", grid=3, classes=4, bias="class", scale="spatial_scale"),
    Case("fused_hypercolumn", padding="zeros_per_tap", grid=2, bias="rows", outputs=1),
    Case("fused_hypercolumn", grid=4, classes=3, bias="box_bias", activation="sigmoid", padding="zeros"),
    Case("fused_hypercolumn", grid=3, bias="shared", sampling_ratio=0, padding="zeros"),
    Case("fused_hypercolumn", grid=2, classes=2, sampling_ratio=2, aligned=False, activation="sigmoid"),
]
POINT_CASES = [
    Case("fused_hypercolumn_points"),
    Case("fused_hypercolumn_points", padding="zeros", grid=3, bias="shared", activation="sigmoid"),
    Case("fused_hypercolumn_points", grid=3, classes=4, bias="class", scale="spatial_scale"),
    Case("fused_hypercolumn_points", padding="zeros_per_tap", grid=2, outputs=1),
    Case("fused_hypercolumn_points", grid=4, classes=3, bias="box_bias", activation="sigmoid", padding="zeros"),
]


@pytest.mark.parametrize("case", SPARSE_CASES + BOX_CASES + FUSED_CASES + POINT_CASES, ids=str)
@pytest.mark.slow
def test_exported_operator_matches_eager_at_other_counts_and_sizes(case):
    model, session = export_case(case)
    check_case(case, model, session)


@pytest.mark.parametrize("case", [SPARSE_CASES[1], BOX_CASES[5], FUSED_CASES[4], POINT_CASES[4]], ids=str)
@pytest.mark.slow
def test_float64_export_computes_the_reference(case):
    """In float64 the graph's formulas are the reference's: equal up to summation order."""
    model, session = export_case(case, torch.float64)
    check_case(case, model, session, torch.float64)


def test_invalid_rows_give_nan_and_empty_calls_give_empty_outputs():
    """With the value checks off, eager gives NaN for a batch index that is not an integer in
    [0, B), non-finite coordinates and a label outside [0, NC); the graph gives NaN in the same
    places (it has no checks to raise). No rows give an empty output of the right shape."""
    case = Case("fused_hypercolumn", grid=3, classes=4, bias="class", activation="sigmoid")
    model, session = export_case(case)
    inputs = case_inputs(case, 6, (8, 8), seed=4)
    inputs["rows"][0, 0] = 2.0  # batch index out of range
    inputs["rows"][1, 0] = 0.5  # not an integer
    inputs["rows"][2, 1] = float("nan")
    inputs["rows"][3, 3] = float("inf")
    inputs["labels"][4] = 7
    hypercolumn_ops.set_value_checks(False)
    try:
        with torch.no_grad():
            eager = model(**inputs)
    finally:
        hypercolumn_ops.set_value_checks(True)
    out, = run_ort(session, inputs)
    assert out[:5].isnan().all() and not out[5].isnan().any()
    # The kernels' float32 sums in another order: some ulps of the largest term.
    assert_close_relative(out, eager, rtol=1e-5)
    empty = case_inputs(case, 0, (8, 8), seed=5)
    out, = run_ort(session, empty)
    assert out.shape == (0, case.outputs, 5, 4)


def test_float16_export_computes_in_float32_and_rounds_once():
    """float16 maps and weights: the graph casts them to float32, computes, and casts the output
    back, as the kernels accumulate in float32."""
    case = Case("fused_hypercolumn", grid=3, classes=4, bias="class", activation="sigmoid")
    model, session = export_case(case, torch.float16)
    inputs = case_inputs(case, 7, (12, 10), seed=2, dtype=torch.float16)
    out, = run_ort(session, inputs)
    hypercolumn_ops.set_value_checks(False)  # what is tested is the graph's arithmetic
    try:
        with torch.no_grad():
            eager = model(**inputs)
    finally:
        hypercolumn_ops.set_value_checks(True)
    assert out.dtype == torch.float16
    # Both round a float32 value to float16 once; float32 sums in another order may round to
    # the neighbouring float16: one ulp, 2^-10 relative.
    assert_close_relative(out.float(), eager.float(), rtol=2 ** -10)


# ----------------------------------------------------------------------------- heads


class HeadOnTwoMaps(torch.nn.Module):
    """A head of ``hypercolumn_ops.nn`` on the two maps of :func:`case_inputs`, at boxes or (with
    ``points``) at points with their places."""

    def __init__(self, head, points: bool = False):
        super().__init__()
        self.head, self.points = head, points

    def forward(self, f0, f1, rows, locations, labels, row_bias):
        image_size = (f0.shape[2] * 2, f0.shape[3] * 2)
        if self.points:
            return self.head.forward_points([f0, f1], rows, image_size=image_size, locations=locations,
                                            labels=labels)
        return self.head([f0, f1], rows, image_size, labels)


HEADS = {
    "HypercolumnHead": lambda: HeadOnTwoMaps(hypercolumn_ops.nn.HypercolumnHead(
        [3, 8], 2, grid_size=3, output_size=(5, 4), num_classes=4, activation="sigmoid", padding="zeros")),
    "HypercolumnHead.forward_points": lambda: HeadOnTwoMaps(hypercolumn_ops.nn.HypercolumnHead(
        [3, 8], 2, grid_size=3, num_classes=4), points=True),
    # Not the package's operators: F.interpolate to image size, then F.grid_sample per image.
    "NaiveHypercolumnHead": lambda: HeadOnTwoMaps(hypercolumn_ops.nn.NaiveHypercolumnHead(
        [3, 8], 2, grid_size=3, output_size=(5, 4), num_classes=4, activation="sigmoid")),
}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name == "NaiveHypercolumnHead"
                                  else name for name in HEADS])  # the naive head's export: 20 s
@pytest.mark.slow
def test_exported_head_matches_eager_at_other_counts_and_sizes(name):
    torch.manual_seed(0)
    model = HEADS[name]().eval()
    case = Case("fused_hypercolumn_points" if model.points else "fused_hypercolumn", grid=3, classes=4,
                channels=(3, 8))
    example = case_inputs(case, 3, (10, 8), seed=1)
    rows = Dim("rows")
    shapes = {"f0": {2: Dim("h0"), 3: Dim("w0")}, "f1": {2: Dim("h1"), 3: Dim("w1")}, "rows": {0: rows},
              "locations": {0: rows}, "labels": {0: rows}, "row_bias": {0: rows}}
    sizes = [(12, 10), (6, 16)]
    if name == "NaiveHypercolumnHead":
        # It makes its image size an int (nn._pair), which fixes the maps' sizes in the export.
        shapes.update(f0=None, f1=None)
        sizes = [(10, 8), (10, 8)]
    session = ort_session(hc_onnx.export(model, (), kwargs=example, dynamic_shapes=shapes))
    for count, size, seed in zip((11, 1), sizes, (2, 3)):
        inputs = case_inputs(case, count, size, seed)
        out, = run_ort(session, inputs)
        with torch.no_grad():
            # The kernels and the graph add the same float32 terms in other orders.
            assert_close_relative(out, model(**inputs), rtol=1e-5)


class MaskBranch(torch.nn.Module):
    """``MaskRCNNHypercolumnHead`` as Mask R-CNN calls it: FPN levels "0" to "3", a list of
    per-image boxes, the images' sizes."""

    def __init__(self, head, image_shapes):
        super().__init__()
        self.head, self.image_shapes = head, image_shapes

    def forward(self, p2, p3, p4, p5, boxes0, boxes1):
        features = {"0": p2, "1": p3, "2": p4, "3": p5}
        return self.head(features, [boxes0, boxes1], self.image_shapes)


@pytest.mark.parametrize("class_agnostic", [False, True], ids=["per-class", "class-agnostic"])
@pytest.mark.slow
def test_exported_mask_rcnn_head_matches_eager_at_other_box_counts(class_agnostic):
    from hypercolumn_ops.models import MaskRCNNHypercolumnHead

    torch.manual_seed(0)
    head = MaskRCNNHypercolumnHead(8, num_classes=5, grid_size=3, output_size=14, class_agnostic=class_agnostic)
    model = MaskBranch(head, [(64, 60), (56, 64)]).eval()
    g = torch.Generator().manual_seed(0)
    levels = [torch.randn(2, 8, 64 // s, 64 // s, generator=g) for s in (4, 8, 16, 32)]

    def boxes(count):
        corner = torch.rand(count, 2, generator=g) * 48
        return torch.cat([corner, corner + 4 + torch.rand(count, 2, generator=g) * 30], 1)

    shapes = (None, None, None, None, {0: Dim("boxes0")}, {0: Dim("boxes1")})
    session = ort_session(hc_onnx.export(model, (*levels, boxes(3), boxes(2)), dynamic_shapes=shapes))
    for counts in ((7, 1), (0, 5)):
        inputs = dict(zip(["p2", "p3", "p4", "p5", "boxes0", "boxes1"], [*levels, boxes(counts[0]), boxes(counts[1])]))
        out, = run_ort(session, inputs)
        with torch.no_grad():
            # The kernels and the graph add the same float32 terms in other orders.
            assert_close_relative(out, model(**inputs), rtol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_importing_the_package_imports_no_onnx_module():
    import subprocess
    import sys

    code = ("import sys, hypercolumn_ops; "
            "print(sorted(m for m in ('onnx', 'onnxscript', 'onnxruntime', 'onnx_ir') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_export_refuses_what_the_translations_cannot_take():
    model = OneOperator(Case("sparse_hypercolumn")).eval()
    example = case_inputs(model.case, 3, (9, 7), seed=1)
    with pytest.raises(ValueError, match="opset_version: the translations need opset 18"):
        hc_onnx.export(model, (), kwargs=example, opset_version=17)
    with pytest.raises(ValueError, match="dynamo=True"):
        hc_onnx.export(model, (), kwargs=example, dynamo=False)


class DirectCall(torch.nn.Module):
    """``torch.ops.hypercolumn_ops.fused_hypercolumn_points`` called with raw codes."""

    def __init__(self, padding=0, activation=0, order=1):
        super().__init__()
        self.codes = padding, activation, order
        self.weight = torch.nn.Parameter(torch.randn(1, 1, 2, 3))

    def forward(self, features, points):
        padding, activation, order = self.codes
        return torch.ops.hypercolumn_ops.fused_hypercolumn_points.default(
            [features], points, None, [self.weight], None, None, [], [0.5], padding, activation, [order])


@pytest.mark.parametrize("codes, message", [
    ((0, 0, 2), "orders: layer 0 has evaluation order 2"),
    ((0, 3, 1), "fused_hypercolumn_points: activation code 3"),
    ((5, 0, 1), "fused_hypercolumn_points: padding code 5"),
], ids=["order", "activation", "padding"])
@pytest.mark.slow
def test_codes_without_a_translation_raise_while_exporting(codes, message):
    """Codes no public call makes: the exporter names the operator and the code."""
    features, points = torch.randn(1, 3, 6, 6), torch.tensor([[0.0, 2.0, 3.0]])
    with pytest.raises(Exception, match=message):
        hc_onnx.export(DirectCall(*codes), (features, points))


# ----------------------------------------------------------------------------- the example


def load_example():
    """``examples/export_onnx.py`` as a module."""
    import importlib.util
    import os
    import sys

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the example imports its neighbours
    spec = importlib.util.spec_from_file_location("export_onnx", os.path.join(folder, "export_onnx.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


@pytest.mark.slow
def test_figure_ground_model_exports_with_dynamic_image_size_and_boxes():
    """The training example's figure-ground model (backbone and head), exported at two 64 x 64
    images, run on three 96 x 96 ones with another number of boxes."""
    result = load_example().figure_ground(argparse.Namespace(checkpoint=None, repeats=1, out_dir=None))
    # Probabilities in [0, 1]: float32 rounding of the backbone's convolutions and the head's sums.
    assert result["max |ORT - eager|"] <= 1e-5


@pytest.mark.slow
def test_mask_rcnn_with_hypercolumn_masks_exports_and_its_masks_match_eager():
    """torchvision's Mask R-CNN with use_hypercolumn_masks, eval mode, exported once and run on
    three images with different numbers of detections: the same labels, and masks within 1e-4."""
    result = load_example().mask_rcnn(argparse.Namespace(image_size=64, repeats=1, out_dir=None))
    assert len(set(result["detections"])) > 1 and max(result["detections"]) > 0
    # Convolutions, RoIAlign of the box head and the mask head in float32, and ONNX Runtime's
    # kernels against torch's: rounding that the boxes carry into the masks' grids.
    assert result["max |ORT - eager| masks (28 x 28)"] <= 1e-4
    assert result["max |ORT - eager| masks (pasted)"] <= 1e-4
