"""The per-layer choice between the two exact evaluation orders of ``docs/semantics.md``.

A fused operator can evaluate layer ``l`` by

- ``SAMPLE_FEATURES``: gather the four bilinear taps of each of the ``S`` samples of every point
  (``S = 1``, or ``n_y x n_x`` with a box operator's ``sampling_ratio``) for all ``C_l``
  channels, blend them, and take dot products with the (at most four) classifier cells whose
  location weight is non-zero: about ``P * C_l * (4 * S + cells_hit * M)`` multiply-adds, all
  gathers; or
- ``PROJECT_SCORES``: a 1x1 convolution of the whole map to ``NC * KK * M`` score channels
  (``B * H_l * W_l * C_l * NC * KK * M`` multiply-adds of dense matrix product, which runs
  several times faster per multiply-add than a gather), then sampling the score maps:
  ``P * 4 * S * cells_hit * M`` gathered multiply-adds.

The cheaper estimate wins. Backward costs scale the same way (the same gathers, or the same
matrix products transposed), so the forward estimate decides both.
"""

from dataclasses import dataclass
from typing import List, Sequence

from ._codes import ORDER_PROJECT_SCORES as PROJECT_SCORES
from ._codes import ORDER_SAMPLE_FEATURES as SAMPLE_FEATURES

# How many dense matrix-product multiply-adds cost as much as one gathered multiply-add.
# CPU: measured with the native kernels (benchmarks/profile_cpu.py workloads, float32, NCHW,
# one thread, AVX-512 EPYC), forcing one layer at a time into each order: 2.9 to 4.3 (GEMMs of
# Q = 25 to 425 score channels are partly memory-bound; the sampling path's dot products are
# vectorised), so 3.5.
# CUDA: cuBLAS on tensor-core-free float32 still beats scattered loads by more.
GEMM_SPEEDUP = {"cpu": 3.5, "cuda": 16.0}
# The same as (numerator, denominator), for comparisons in integers (torch.compile of torch 2.4
# cannot trace float.as_integer_ratio).
_SPEEDUP_RATIOS = {device: speedup.as_integer_ratio() for device, speedup in GEMM_SPEEDUP.items()}


@dataclass(frozen=True)
class LayerPlan:
    """The order chosen for one layer and the two estimates (gather-equivalent multiply-adds)."""

    order: int
    sample_cost: float
    project_cost: float

    @property
    def name(self) -> str:
        return "project_scores" if self.order == PROJECT_SCORES else "sample_features"


def _costs(shape: Sequence[int], num_points: int, num_classes: int, cells: int, outputs: int, samples: int):
    """(dense multiply-adds of the projection, gathered ones after it, gathered ones of sampling
    the features) of one layer ``(B, C_l, H_l, W_l)``."""
    batch, channels, height, width = shape
    cells_hit = min(cells, 4)
    dense = batch * height * width * channels * num_classes * cells * outputs
    gathered_project = num_points * 4 * samples * cells_hit * outputs
    gathered_sample = num_points * channels * (4 * samples + cells_hit * outputs)
    return dense, gathered_project, gathered_sample


def _device(device_type: str) -> str:
    return device_type if device_type in GEMM_SPEEDUP else "cuda"


def layer_orders(feature_shapes: Sequence[Sequence[int]], num_points: int, num_classes: int, cells: int,
                 outputs: int, device_type: str, samples: int = 1) -> List[int]:
    """The cheaper order of each layer (the arguments as :func:`plan_layers`'); the operators
    call this on every call, so it makes no plan objects."""
    numerator, denominator = _SPEEDUP_RATIOS[_device(device_type)]
    orders = []
    for shape in feature_shapes:
        dense, gathered_project, gathered_sample = _costs(shape, num_points, num_classes, cells, outputs, samples)
        # project < sample, in integers times the speed-up's denominator: under torch.compile the
        # sizes may be symbolic, and a comparison of floats made from them is a guard that torch
        # 2.4 cannot evaluate (it recompiles at every new count).
        cheaper = dense * denominator + gathered_project * numerator < gathered_sample * numerator
        orders.append(PROJECT_SCORES if cheaper else SAMPLE_FEATURES)
    return orders


def plan_layers(feature_shapes: Sequence[Sequence[int]], num_points: int, num_classes: int, cells: int,
                outputs: int, device_type: str, samples: int = 1) -> List[LayerPlan]:
    """Choose an order per layer, with both estimates.

    Args:
        feature_shapes: ``(B, C_l, H_l, W_l)`` of each layer.
        num_points: points classified (``R * oh * ow`` for boxes, ``N`` for points).
        num_classes: ``NC`` classifier sets (1 without labels).
        cells: ``KK``, classifier cells per set.
        outputs: ``M``, outputs per cell.
        device_type: ``"cpu"`` or ``"cuda"``.
        samples: bilinear samples averaged per point (``S``).
    """
    speedup = GEMM_SPEEDUP[_device(device_type)]
    orders = layer_orders(feature_shapes, num_points, num_classes, cells, outputs, device_type, samples)
    plans = []
    for shape, order in zip(feature_shapes, orders):
        dense, gathered_project, gathered_sample = _costs(shape, num_points, num_classes, cells, outputs, samples)
        plans.append(LayerPlan(order, float(gathered_sample), dense / speedup + float(gathered_project)))
    return plans


def many_points_order(channels: int, cells: int, outputs: int, samples: int = 1) -> int:
    """The order :func:`plan_layers` tends to as ``num_points`` grows, the map's projection then
    costing little per point: ``PROJECT_SCORES`` unless sampling a point's scores
    (``4 * S * cells_hit * M`` gathered multiply-adds) costs as much as sampling and classifying
    its features (``C_l * (4 * S + cells_hit * M)``), which only a layer of one or two channels
    reaches.

    For sizes that are symbolic (``torch.compile`` with dynamic shapes, ``torch.export`` with a
    dynamic number of boxes or points): an order chosen from them would be a guard on them, or
    a constraint that export refuses; both orders are exact, so the traced graph takes this one.
    """
    cells_hit = min(cells, 4)
    projected = 4 * samples * cells_hit * outputs
    return PROJECT_SCORES if projected < channels * (4 * samples + cells_hit * outputs) else SAMPLE_FEATURES
