"""The operators' fast path (``csrc/fast_path.cpp``): it takes the common calls, gives exactly what
the Python path gives (the same operator on the same normalised arguments, so outputs and
gradients are equal bit for bit), and declines every other call, which the Python path then runs
or refuses. The public errors themselves are tested through the public functions in test_api.py,
where every call tries this path first."""

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import hypercolumn_ops
from hypercolumn_ops import ops

import cases

pytestmark = pytest.mark.skipif(ops._FAST is None, reason="the compiled extension is not built")


class Spy:
    """Stands for the extension's module in ``ops`` and records, per call, whether the fast path
    took it (returned an output) or declined (returned None)."""

    def __init__(self, module):
        self.module = module
        self.taken = []

    def __getattr__(self, name):
        function = getattr(self.module, name)

        def call(*args):
            out = function(*args)
            self.taken.append(out is not None)
            return out

        return call


def _in_coordinate_dtype(case: cases.Case, dtype: torch.dtype) -> cases.Case:
    """``case`` with its coordinate rows (points, boxes, locations) in ``dtype``."""
    def convert(value):
        return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    args = (case.args[0], convert(case.args[1])) + tuple(case.args[2:])
    kwargs = dict(case.kwargs)
    if kwargs.get("locations") is not None:
        kwargs["locations"] = convert(kwargs["locations"])
    return cases.Case(case.op, args, kwargs, case.name)


def _run(case: cases.Case, monkeypatch, fast: bool):
    """(output, gradients, the fast path's answers) of ``case`` with or without the fast path."""
    spy = Spy(ops._FAST)
    with monkeypatch.context() as patch:
        patch.setattr(ops, "_FAST", spy if fast else None)
        out, grads = cases.outputs_and_grads(case, "native")
    return out, grads, spy.taken


def _assert_same(case, fast, python):
    assert torch.equal(torch.nan_to_num(fast[0], nan=1234.5), torch.nan_to_num(python[0], nan=1234.5)), case
    assert fast[0].dtype == python[0].dtype and fast[0].shape == python[0].shape, case
    for got, expected in zip(fast[1], python[1]):
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(expected)), case


def _common_cases(dtype):
    coordinate = torch.float64 if dtype == torch.float64 else torch.float32
    return [_in_coordinate_dtype(c, coordinate) for c in cases.all_cases(dtype, "cpu", requires_grad=True)
            if c.name != "box-list"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fast_path_takes_common_calls_and_equals_the_python_path(dtype, monkeypatch):
    for case in _common_cases(dtype):
        fast = _run(case, monkeypatch, fast=True)
        assert fast[2] == [True], f"{case}: the fast path declined a common call"
        _assert_same(case, fast, _run(case, monkeypatch, fast=False))


def test_fast_path_takes_the_bfloat16_and_float16_calls(monkeypatch):
    for dtype in (torch.bfloat16, torch.float16):
        for case in _common_cases(dtype)[:6]:
            fast = _run(case, monkeypatch, fast=True)
            assert fast[2] == [True], case
            _assert_same(case, fast, _run(case, monkeypatch, fast=False))


def _fused_case(**kwargs):
    g = torch.Generator().manual_seed(3)
    features = cases.features(torch.float32, "cpu", generator=g, requires_grad=True)
    weights = cases.classifier(3, 2, None, torch.float32, "cpu", g, requires_grad=True)
    boxes = cases.boxes(4, torch.float32, "cpu", g)
    call = dict(output_size=(5, 4), image_size=cases.IMAGE)
    call.update(kwargs)
    return cases.Case("fused_hypercolumn", (features, boxes, weights), call, "fused")


class _Tagged(torch.Tensor):
    """A tensor subclass that takes part in __torch_function__."""


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _declined_calls():
    """(name, case, context) the fast path must leave to the Python path, which runs them."""
    plain = _fused_case()
    features, boxes, weights = plain.args
    yield "boxes as a list per image", cases.Case(
        "fused_hypercolumn", (features, [boxes[boxes[:, 0] == b, 1:] for b in range(2)], weights),
        plain.kwargs, "list"), None
    yield "float64 boxes for float32 features", cases.Case(
        "fused_hypercolumn", (features, boxes.double(), weights), plain.kwargs, "float64 boxes"), None
    yield "a numpy int output size", _fused_case(output_size=np.int64(4)), None
    yield "a torch.Size image size", _fused_case(image_size=torch.Size(cases.IMAGE)), None
    yield "a numpy float spatial scale", _fused_case(image_size=None, spatial_scale=np.float64(0.5)), None
    yield "an autocast region", plain, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    yield "a __torch_function__ mode", plain, _Mode
    yield "the reference backend forced", plain, lambda: hypercolumn_ops.use_backend("reference")
    tagged = [f.detach().as_subclass(_Tagged).requires_grad_() for f in features]
    yield "a tensor subclass", cases.Case("fused_hypercolumn", (tagged, boxes, weights), plain.kwargs, "subclass"), None


@pytest.mark.parametrize("name, case, context", list(_declined_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_fast_path_declines_other_forms_which_the_python_path_runs(name, case, context, monkeypatch):
    spy = Spy(ops._FAST)
    monkeypatch.setattr(ops, "_FAST", spy)
    if context is None:
        out = case()
    else:
        with context():
            out = case()
    assert spy.taken in ([], [False]), f"{name}: the fast path took the call"
    if context is None and name != "a tensor subclass":  # the same call without the fast path
        monkeypatch.setattr(ops, "_FAST", None)
        assert torch.equal(out, case())


def test_fast_path_refuses_nothing_itself(monkeypatch):
    """An invalid batch index on the CPU: the fast path declines and the Python path raises the
    public error; with value checks off, the fast path takes the call and gives the NaN rows the
    Python path gives."""
    case = _fused_case()
    features, boxes, weights = case.args
    bad = boxes.clone()
    bad[1, 0] = 7
    spy = Spy(ops._FAST)
    monkeypatch.setattr(ops, "_FAST", spy)
    with pytest.raises(ValueError, match="boxes: column 0"):
        hypercolumn_ops.fused_hypercolumn(features, bad, weights, **case.kwargs)
    assert spy.taken == [False]
    with hypercolumn_ops.set_value_checks(False):
        fast = hypercolumn_ops.fused_hypercolumn(features, bad, weights, **case.kwargs)
        assert spy.taken == [False, True]
        monkeypatch.setattr(ops, "_FAST", None)
        python = hypercolumn_ops.fused_hypercolumn(features, bad, weights, **case.kwargs)
    assert fast[1].isnan().all() and torch.equal(fast.nan_to_num(), python.nan_to_num())


def test_fast_path_plans_each_call_shape(monkeypatch):
    """The fast path keeps the planned orders per call shape: calls that alternate between two
    shapes with different best orders each get their own, as on the Python path (float32 results
    of the two orders differ in their last bits, so equal outputs show the same order ran)."""
    g = torch.Generator().manual_seed(5)
    features = cases.features(torch.float32, "cpu", generator=g)
    weights = cases.classifier(1, 1, None, torch.float32, "cpu", g)
    shapes = tuple(f.shape for f in features)
    planned = {count: hypercolumn_ops._validation._planned_orders(shapes, count * 4, 1, 1, 1, "cpu", 1)
               for count in (1, 300)}
    assert planned[1] != planned[300], "the two box counts were meant to take different orders"
    for count in (1, 300, 1, 300):
        boxes = cases.boxes(count, torch.float32, "cpu", g)[:count]
        out = hypercolumn_ops.fused_hypercolumn(features, boxes, weights, output_size=2, image_size=cases.IMAGE)
        monkeypatch.setattr(ops, "_FAST", None)
        python = hypercolumn_ops.fused_hypercolumn(features, boxes, weights, output_size=2, image_size=cases.IMAGE)
        monkeypatch.undo()
        assert torch.equal(out, python), count
