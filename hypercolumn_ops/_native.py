"""The ``"native"`` backend: the compiled operators of ``csrc/``, their fake (meta) kernels and
their autograd formulas.

Importing this module loads ``hypercolumn_ops._C``. A package installed without building it
(a plain copy of the sources) runs on the other backends; an extension built against another
torch than the one running is refused with an ImportError that says how to rebuild.
"""

import importlib
import importlib.util

import torch
from torch import Tensor


def _load_extension():
    """The compiled module, or None where it was not built."""
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return None
    try:
        return importlib.import_module(f"{__package__}._C")
    except ImportError as error:  # built, but does not load: an undefined symbol of another torch
        raise ImportError(
            f"hypercolumn_ops: the compiled extension failed to load ({error}). It was probably built "
            f"against another torch than {torch.__version__}; rebuild it with "
            f"`pip install --no-build-isolation -e .`") from error


_C = _load_extension()

BUILD_INFO = _C.build_info() if _C is not None else None


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def check_build(info: dict, running: str = torch.__version__) -> None:
    """Raise ImportError if the extension was built against another torch than ``running``."""
    if _major_minor(info["torch_version"]) != _major_minor(running):
        raise ImportError(
            f"hypercolumn_ops: the compiled extension was built against torch {info['torch_version']} "
            f"but torch {running} is running; rebuild it with `pip install --no-build-isolation -e .`")


if BUILD_INFO is not None:
    check_build(BUILD_INFO)


def available(device_type: str) -> bool:
    """Whether the compiled kernels exist for ``device_type``."""
    if BUILD_INFO is None:
        return False
    if device_type == "cpu":
        return True
    return device_type == "cuda" and BUILD_INFO["with_cuda"] and torch.cuda.is_available()


def register_fakes(namespace: str) -> None:
    """Fake kernels (shapes only) of the operators of ``namespace``: the compiled ones, or another
    backend's with the same schema (csrc/ops.cpp)."""
    lib = namespace + "::"

    def empty_features_like(features):
        return [torch.empty_like(f) for f in features]

    @torch.library.register_fake(lib + "sparse_hypercolumn")
    def _(features, points, image_size, spatial_scale, padding):
        torch._check(points.dim() == 2 and points.shape[1] == 3, lambda: "points: expected (N, 3)")
        channels = sum(f.shape[1] for f in features)
        return features[0].new_empty((points.shape[0], channels))

    @torch.library.register_fake(lib + "sparse_hypercolumn_backward")
    def _(grad, features, points, image_size, spatial_scale, padding):
        return empty_features_like(features)

    @torch.library.register_fake(lib + "box_hypercolumn")
    def _(features, boxes, output_height, output_width, image_size, spatial_scale, padding, sampling_ratio, aligned):
        torch._check(boxes.dim() == 2 and boxes.shape[1] == 5, lambda: "boxes: expected (R, 5)")
        channels = sum(f.shape[1] for f in features)
        return features[0].new_empty((boxes.shape[0], channels, output_height, output_width))

    @torch.library.register_fake(lib + "box_hypercolumn_backward")
    def _(grad, features, boxes, output_height, output_width, image_size, spatial_scale, padding, sampling_ratio,
          aligned):
        return empty_features_like(features)

    @torch.library.register_fake(lib + "fused_hypercolumn")
    def _(features, boxes, weights, bias, labels, output_height, output_width, image_size, spatial_scale, padding,
          activation, orders, sampling_ratio, aligned):
        return features[0].new_empty((boxes.shape[0], weights[0].shape[2], output_height, output_width))

    def fused_backward_fake(features, count, weights):
        grad_bias = features[0].new_empty((count, weights[0].shape[1], weights[0].shape[2]))
        return empty_features_like(features), [torch.empty_like(w) for w in weights], grad_bias

    @torch.library.register_fake(lib + "fused_hypercolumn_backward")
    def _(grad, features, boxes, weights, bias, labels, output_height, output_width, image_size, spatial_scale,
          padding, activation, orders, sampling_ratio, aligned):
        return fused_backward_fake(features, boxes.shape[0], weights)

    @torch.library.register_fake(lib + "fused_hypercolumn_points")
    def _(features, points, locations, weights, bias, labels, image_size, spatial_scale, padding, activation, orders):
        return features[0].new_empty((points.shape[0], weights[0].shape[2]))

    @torch.library.register_fake(lib + "fused_hypercolumn_points_backward")
    def _(grad, features, points, locations, weights, bias, labels, image_size, spatial_scale, padding, activation,
          orders):
        return fused_backward_fake(features, points.shape[0], weights)


def register_autograd(namespace: str) -> None:
    """Autograd formulas of the operators of a backend defined in Python (Triton), the same as
    csrc/autograd.cpp's for the compiled operators: gradients flow to features, weights and bias;
    coordinates, locations and labels are constants, as in torchvision.ops.roi_align. Backward
    recomputes what forward sampled. Differentiating a backward operator raises."""
    lib = namespace + "::"
    ops = getattr(torch.ops, namespace)

    def keep_inputs(ctx, inputs, output):
        # Tensors (also those inside lists, and None for absent optional tensors) go through
        # save_for_backward; the rest of the arguments are plain values.
        tensors, layout = [], []
        for value in inputs:
            if isinstance(value, (list, tuple)) and value and isinstance(value[0], Tensor):
                layout.append(("list", len(value)))
                tensors.extend(value)
            elif value is None or isinstance(value, Tensor):
                layout.append(("tensor", None))
                tensors.append(value)
            else:
                layout.append(("value", value))
        ctx.save_for_backward(*tensors)
        ctx.layout = layout

    def saved_inputs(ctx):
        tensors = iter(ctx.saved_tensors)
        inputs = []
        for kind, value in ctx.layout:
            if kind == "list":
                inputs.append([next(tensors) for _ in range(value)])
            elif kind == "tensor":
                inputs.append(next(tensors))
            else:
                inputs.append(value)
        return inputs

    def constants(values):
        # The gradients of constant inputs: None each, but an empty list for an empty list
        # (image_size or spatial_scale): autograd matches the inputs' structure, where an empty
        # list is a node of no leaves.
        return tuple([] if isinstance(value, list) and not value else None for value in values)

    def sparse_backward(ctx, grad):
        inputs = saved_inputs(ctx)
        return (ops.sparse_hypercolumn_backward(grad, *inputs),) + constants(inputs[1:])

    def box_backward(ctx, grad):
        inputs = saved_inputs(ctx)
        return (ops.box_hypercolumn_backward(grad, *inputs),) + constants(inputs[1:])

    def fused_backward(ctx, grad):
        inputs = saved_inputs(ctx)
        grad_features, grad_weights, grad_bias = ops.fused_hypercolumn_backward(grad, *inputs)
        bias = inputs[3]
        return ((grad_features, None, grad_weights, None if bias is None else grad_bias.to(bias.dtype))
                + constants(inputs[4:]))

    def fused_points_backward(ctx, grad):
        inputs = saved_inputs(ctx)
        grad_features, grad_weights, grad_bias = ops.fused_hypercolumn_points_backward(grad, *inputs)
        bias = inputs[4]
        return ((grad_features, None, None, grad_weights, None if bias is None else grad_bias.to(bias.dtype))
                + constants(inputs[5:]))

    torch.library.register_autograd(lib + "sparse_hypercolumn", sparse_backward, setup_context=keep_inputs)
    torch.library.register_autograd(lib + "box_hypercolumn", box_backward, setup_context=keep_inputs)
    torch.library.register_autograd(lib + "fused_hypercolumn", fused_backward, setup_context=keep_inputs)
    torch.library.register_autograd(lib + "fused_hypercolumn_points", fused_points_backward,
                                    setup_context=keep_inputs)

    # The backward operators are not differentiable: a gradient of their gradients raises.
    for name in ("sparse_hypercolumn", "box_hypercolumn", "fused_hypercolumn", "fused_hypercolumn_points"):
        def not_twice(ctx, *grads, op=lib + name + "_backward"):
            raise NotImplementedError(f"{op}: the gradient of this gradient (double backward) is not supported")

        torch.library.register_autograd(lib + name + "_backward", not_twice)


if _C is not None:
    register_fakes("hypercolumn_ops")  # the autograd formulas are compiled (csrc/autograd.cpp)
