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
from ..reference import layer_scales

NAMESPACE = "hypercolumn_ops_triton"


def _op(name: str):
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())


def _box_points(boxes: Tensor, output_height: int, output_width: int, sampling_ratio: int, aligned: bool,
                labels: Optional[Tensor] = None) -> launchers.Points:
    return launchers.Points(boxes, True, output_height, output_width, labels=labels, sampling_ratio=sampling_ratio,
                            aligned=aligned)


def _box_output(features: List[Tensor], boxes: Tensor, output_height: int, output_width: int) -> Tensor:
    channels = sum(f.shape[1] for f in features)
    return launchers.new_output((boxes.shape[0], channels, output_height, output_width), features[0])


@_op("sparse_hypercolumn")
def sparse_hypercolumn(features: List[Tensor], points: Tensor, image_size: List[int], spatial_scale: List[float],
                       padding: int) -> Tensor:
    scale_y, scale_x = layer_scales(features, image_size, spatial_scale)
    out = launchers.new_output((points.shape[0], sum(f.shape[1] for f in features)), features[0])
    with launchers.device_guard(points):
        launchers.sample_hypercolumns(features, launchers.Points(points, False), scale_y, scale_x, padding, out)
    return out


@_op("sparse_hypercolumn_backward")
def sparse_hypercolumn_backward(grad: Tensor, features: List[Tensor], points: Tensor, image_size: List[int],
                                spatial_scale: List[float], padding: int) -> List[Tensor]:
    scale_y, scale_x = layer_scales(features, image_size, spatial_scale)
    with launchers.device_guard(points):
        return launchers.sample_hypercolumns_backward(grad, features, launchers.Points(points, False), scale_y,
                                                      scale_x, padding)


@_op("box_hypercolumn")
def box_hypercolumn(features: List[Tensor], boxes: Tensor, output_height: int, output_width: int,
                    image_size: List[int], spatial_scale: List[float], padding: int, sampling_ratio: int,
                    aligned: bool) -> Tensor:
    scale_y, scale_x = layer_scales(features, image_size, spatial_scale)
    out = _box_output(features, boxes, output_height, output_width)
    with launchers.device_guard(boxes):
        points = _box_points(boxes, output_height, output_width, sampling_ratio, aligned)
        launchers.sample_hypercolumns(features, points, scale_y, scale_x, padding, out)
    return out


@_op("box_hypercolumn_backward")
def box_hypercolumn_backward(grad: Tensor, features: List[Tensor], boxes: Tensor, output_height: int,
                             output_width: int, image_size: List[int], spatial_scale: List[float],
                             padding: int, sampling_ratio: int, aligned: bool) -> List[Tensor]:
    scale_y, scale_x = layer_scales(features, image_size, spatial_scale)
    with launchers.device_guard(boxes):
        return launchers.sample_hypercolumns_backward(
            grad, features, _box_points(boxes, output_height, output_width, sampling_ratio, aligned), scale_y, scale_x,
            padding)


def _fused_boxes(features, boxes, weights, bias, labels, output_height, output_width, image_size, spatial_scale,
                 padding, activation, orders, sampling_ratio, aligned) -> launchers.FusedOp:
    scale_y, scale_x = layer_scales(features, image_size, spatial_scale)
    points = _box_points(boxes, output_height, output_width, sampling_ratio, aligned, labels)
    return launchers.FusedOp(features, points, weights, bias, scale_y, scale_x, padding, activation, orders)


@_op("fused_hypercolumn")
def fused_hypercolumn(features: List[Tensor], boxes: Tensor, weights: List[Tensor], bias: Optional[Tensor],
                      labels: Optional[Tensor], output_height: int, output_width: int, image_size: List[int],
                      spatial_scale: List[float], padding: int, activation: int, orders: List[int],
                      sampling_ratio: int, aligned: bool) -> Tensor:
    out = launchers.new_output((boxes.shape[0], weights[0].shape[2], output_height, output_width), features[0])
    with launchers.device_guard(boxes):
        return _fused_boxes(features, boxes, weights, bias, labels, output_height, output_width, image_size,
                            spatial_scale, padding, activation, orders, sampling_ratio, aligned).forward(out)


@_op("fused_hypercolumn_backward")
def fused_hypercolumn_backward(grad: Tensor, features: List[Tensor], boxes: Tensor, weights: List[Tensor],
                               bias: Optional[Tensor], labels: Optional[Tensor], output_height: int,
                               output_width: int, image_size: List[int], spatial_scale: List[float], padding: int,
                               activation: int, orders: List[int], sampling_ratio: int,
                               aligned: bool) -> Tuple[List[Tensor], List[Tensor], Tensor]:
    with launchers.device_guard(boxes):
        return _fused_boxes(features, boxes, weights, bias, labels, output_height, output_width, image_size,
                            spatial_scale, padding, activation, orders, sampling_ratio, aligned).backward(grad)


def _fused_points(features, points, locations, weights, bias, labels, image_size, spatial_scale, padding, activation,
                  orders) -> launchers.FusedOp:
    scale_y, scale_x = layer_scales(features, image_size, spatial_scale)
    where = launchers.Points(points, False, locations=locations, labels=labels)
    return launchers.FusedOp(features, where, weights, bias, scale_y, scale_x, padding, activation, orders)


@_op("fused_hypercolumn_points")
def fused_hypercolumn_points(features: List[Tensor], points: Tensor, locations: Optional[Tensor],
                             weights: List[Tensor], bias: Optional[Tensor], labels: Optional[Tensor],
                             image_size: List[int], spatial_scale: List[float], padding: int, activation: int,
                             orders: List[int]) -> Tensor:
    out = launchers.new_output((points.shape[0], weights[0].shape[2]), features[0])
    with launchers.device_guard(points):
        return _fused_points(features, points, locations, weights, bias, labels, image_size, spatial_scale, padding,
                             activation, orders).forward(out)


@_op("fused_hypercolumn_points_backward")
def fused_hypercolumn_points_backward(grad: Tensor, features: List[Tensor], points: Tensor,
                                      locations: Optional[Tensor], weights: List[Tensor], bias: Optional[Tensor],
                                      labels: Optional[Tensor], image_size: List[int], spatial_scale: List[float],
                                      padding: int, activation: int,
                                      orders: List[int]) -> Tuple[List[Tensor], List[Tensor], Tensor]:
    with launchers.device_guard(points):
        return _fused_points(features, points, locations, weights, bias, labels, image_size, spatial_scale, padding,
                             activation, orders).backward(grad)


register_fakes(NAMESPACE)
register_autograd(NAMESPACE)
