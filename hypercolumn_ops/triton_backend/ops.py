"""The Triton backend's operators: ``torch.library.custom_op`` definitions in the namespace
``hypercolumn_ops_triton`` with the schema of ``csrc/ops.cpp`` (forward and backward ops), and
the same fake kernels and autograd formulas as the compiled operators, so ``torch.compile``
traces forward and backward without a graph break.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import launchers
from .._native import register_autograd, register_fakes

NAMESPACE = "hypercolumn_ops_triton"


def _op(name: str):
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())


def _box_output(features: List[Tensor], boxes: Tensor, output_height: int, output_width: int) -> Tensor:
    channels = sum(f.shape[1] for f in features)
    return launchers.new_output((boxes.shape[0], channels, output_height, output_width), features[0])


@_op("sparse_hypercolumn")
def sparse_hypercolumn(features: List[Tensor], points: Tensor, scale_y: List[float], scale_x: List[float],
                       padding: int) -> Tensor:
    out = launchers.new_output((points.shape[0], sum(f.shape[1] for f in features)), features[0])
    with launchers.device_guard(points):
        launchers.sample_hypercolumns(features, launchers.Points(points, False), scale_y, scale_x, padding, out)
    return out


@_op("sparse_hypercolumn_backward")
def sparse_hypercolumn_backward(grad: Tensor, features: List[Tensor], points: Tensor, scale_y: List[float],
                                scale_x: List[float], padding: int) -> List[Tensor]:
    with launchers.device_guard(points):
        return launchers.sample_hypercolumns_backward(grad, features, launchers.Points(points, False), scale_y,
                                                      scale_x, padding)


@_op("box_hypercolumn")
def box_hypercolumn(features: List[Tensor], boxes: Tensor, output_height: int, output_width: int,
                    scale_y: List[float], scale_x: List[float], padding: int) -> Tensor:
    out = _box_output(features, boxes, output_height, output_width)
    with launchers.device_guard(boxes):
        launchers.sample_hypercolumns(features, launchers.Points(boxes, True, output_height, output_width),
                                      scale_y, scale_x, padding, out)
    return out


@_op("box_hypercolumn_backward")
def box_hypercolumn_backward(grad: Tensor, features: List[Tensor], boxes: Tensor, output_height: int,
                             output_width: int, scale_y: List[float], scale_x: List[float],
                             padding: int) -> List[Tensor]:
    with launchers.device_guard(boxes):
        return launchers.sample_hypercolumns_backward(
            grad, features, launchers.Points(boxes, True, output_height, output_width), scale_y, scale_x, padding)


def _fused_boxes(features, boxes, weights, bias, labels, output_height, output_width, scale_y, scale_x, padding,
                 activation, orders) -> launchers.FusedOp:
    points = launchers.Points(boxes, True, output_height, output_width, labels=labels)
    return launchers.FusedOp(features, points, weights, bias, scale_y, scale_x, padding, activation, orders)


@_op("fused_hypercolumn")
def fused_hypercolumn(features: List[Tensor], boxes: Tensor, weights: List[Tensor], bias: Optional[Tensor],
                      labels: Optional[Tensor], output_height: int, output_width: int, scale_y: List[float],
                      scale_x: List[float], padding: int, activation: int, orders: List[int]) -> Tensor:
    out = launchers.new_output((boxes.shape[0], weights[0].shape[2], output_height, output_width), features[0])
    with launchers.device_guard(boxes):
        return _fused_boxes(features, boxes, weights, bias, labels, output_height, output_width, scale_y, scale_x,
                            padding, activation, orders).forward(out)


@_op("fused_hypercolumn_backward")
def fused_hypercolumn_backward(grad: Tensor, features: List[Tensor], boxes: Tensor, weights: List[Tensor],
                               bias: Optional[Tensor], labels: Optional[Tensor], output_height: int,
                               output_width: int, scale_y: List[float], scale_x: List[float], padding: int,
                               activation: int, orders: List[int]) -> Tuple[List[Tensor], List[Tensor], Tensor]:
    with launchers.device_guard(boxes):
        return _fused_boxes(features, boxes, weights, bias, labels, output_height, output_width, scale_y, scale_x,
                            padding, activation, orders).backward(grad)


def _fused_points(features, points, locations, weights, bias, labels, scale_y, scale_x, padding, activation,
                  orders) -> launchers.FusedOp:
    where = launchers.Points(points, False, locations=locations, labels=labels)
    return launchers.FusedOp(features, where, weights, bias, scale_y, scale_x, padding, activation, orders)


@_op("fused_hypercolumn_points")
def fused_hypercolumn_points(features: List[Tensor], points: Tensor, locations: Optional[Tensor],
                             weights: List[Tensor], bias: Optional[Tensor], labels: Optional[Tensor],
                             scale_y: List[float], scale_x: List[float], padding: int, activation: int,
                             orders: List[int]) -> Tensor:
    out = launchers.new_output((points.shape[0], weights[0].shape[2]), features[0])
    with launchers.device_guard(points):
        return _fused_points(features, points, locations, weights, bias, labels, scale_y, scale_x, padding,
                             activation, orders).forward(out)


@_op("fused_hypercolumn_points_backward")
def fused_hypercolumn_points_backward(grad: Tensor, features: List[Tensor], points: Tensor,
                                      locations: Optional[Tensor], weights: List[Tensor], bias: Optional[Tensor],
                                      labels: Optional[Tensor], scale_y: List[float], scale_x: List[float],
                                      padding: int, activation: int,
                                      orders: List[int]) -> Tuple[List[Tensor], List[Tensor], Tensor]:
    with launchers.device_guard(points):
        return _fused_points(features, points, locations, weights, bias, labels, scale_y, scale_x, padding,
                             activation, orders).backward(grad)


register_fakes(NAMESPACE)
register_autograd(NAMESPACE)
