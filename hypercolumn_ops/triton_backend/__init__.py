"""The ``"triton"`` backend: Triton kernels for CUDA tensors (and CPU tensors under
``TRITON_INTERPRET=1``, which must be set before triton is first imported).

The four functions take the normalised arguments of ``csrc/ops.cpp`` (see
``hypercolumn_ops/ops.py``) and call the ``torch.ops.hypercolumn_ops_triton`` operators, which
carry their own fake kernels and autograd formulas. Files: ``hypercolumn_math.py`` (the
coordinate and weight math as ``@triton.jit`` helpers), ``kernels.py`` (the kernels),
``launchers.py`` (block sizes, buffers, per-layer steps), ``ops.py`` (operator registration).
"""

from typing import List, Optional

import torch
from torch import Tensor

from . import ops  # noqa: F401  (registers the operators)


def sparse_hypercolumn(features: List[Tensor], points: Tensor, scale_y: List[float], scale_x: List[float],
                       padding: int) -> Tensor:
    """``(N, sum C_l)`` hypercolumns at points ``(N, 3)`` rows ``(batch_index, x, y)``."""
    return torch.ops.hypercolumn_ops_triton.sparse_hypercolumn(features, points, scale_y, scale_x, padding)


def box_hypercolumn(features: List[Tensor], boxes: Tensor, output_height: int, output_width: int,
                    scale_y: List[float], scale_x: List[float], padding: int) -> Tensor:
    """``(R, sum C_l, oh, ow)`` hypercolumns on the grid of every box ``(R, 5)``."""
    return torch.ops.hypercolumn_ops_triton.box_hypercolumn(features, boxes, output_height, output_width, scale_y,
                                                            scale_x, padding)


def fused_hypercolumn(features: List[Tensor], boxes: Tensor, weights: List[Tensor], bias: Optional[Tensor],
                      labels: Optional[Tensor], output_height: int, output_width: int, scale_y: List[float],
                      scale_x: List[float], padding: int, activation: int, orders: List[int]) -> Tensor:
    """``(R, M, oh, ow)`` location-weighted classification of every box's grid."""
    return torch.ops.hypercolumn_ops_triton.fused_hypercolumn(features, boxes, weights, bias, labels, output_height,
                                                              output_width, scale_y, scale_x, padding, activation,
                                                              orders)


def fused_hypercolumn_points(features: List[Tensor], points: Tensor, locations: Optional[Tensor],
                             weights: List[Tensor], bias: Optional[Tensor], labels: Optional[Tensor],
                             scale_y: List[float], scale_x: List[float], padding: int, activation: int,
                             orders: List[int]) -> Tensor:
    """``(N, M)`` location-weighted classification of points ``(N, 3)`` at places ``(N, 2)``."""
    return torch.ops.hypercolumn_ops_triton.fused_hypercolumn_points(features, points, locations, weights, bias,
                                                                     labels, scale_y, scale_x, padding, activation,
                                                                     orders)
