"""The ``"reference"`` backend: pure PyTorch, written formula by formula from the contract.

It is the truth every kernel is tested against, and the fallback on any device. It takes the
normalised arguments of the compiled operators (see ``csrc/ops.cpp``) and is differentiable
through ordinary autograd. It is written for clarity, not memory: it gathers the hypercolumns
of a chunk of points at a time (``CHUNK`` points), so it also runs on real workloads.
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

PADDING_BORDER = 0
PADDING_ZEROS = 1
ACTIVATION_NONE = 0
ACTIVATION_SIGMOID = 1

CHUNK = 1 << 15


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums accumulate in float32 at least: float64 stays, the rest compute in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def feature_axis(coord: Tensor, scale: float, size: int, padding: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One axis of a bilinear sample: ``f = coord * scale - 0.5``, clamped to ``[0, size - 1]``.

    Returns the lower and upper indices, the upper index's weight, and whether the point is
    inside (``padding="zeros"`` drops ``f < -1`` and ``f > size``). A non-finite coordinate
    gets index 0 and weight 0: callers turn its outputs into NaN (see ``hypercolumns``), and
    it passes no gradient (a NaN weight would, as NaN * 0).
    """
    f = coord * scale - 0.5
    finite = torch.isfinite(f)
    inside = torch.ones_like(finite)
    if padding == PADDING_ZEROS:
        inside = (f >= -1) & (f <= size)
    f = torch.where(finite, f, torch.zeros_like(f)).clamp(0, size - 1)
    lo = f.floor().long().clamp(max=size - 1)
    hi = (lo + 1).clamp(max=size - 1)
    return lo, hi, f - lo.to(f.dtype), inside


def sample_layer(feature: Tensor, batch: Tensor, x: Tensor, y: Tensor, scale_y: float, scale_x: float,
                 padding: int) -> Tensor:
    """Bilinear samples of one layer ``(B, C, H, W)`` at image points -> ``(N, C)``."""
    _, _, height, width = feature.shape
    y0, y1, ly, in_y = feature_axis(y, scale_y, height, padding)
    x0, x1, lx, in_x = feature_axis(x, scale_x, width, padding)
    keep = (in_y & in_x).to(ly.dtype)
    pixels = feature.permute(0, 2, 3, 1)  # (B, H, W, C): one row of channels per pixel
    value = (((1 - ly) * (1 - lx) * keep)[:, None] * pixels[batch, y0, x0]
             + ((1 - ly) * lx * keep)[:, None] * pixels[batch, y0, x1]
             + (ly * (1 - lx) * keep)[:, None] * pixels[batch, y1, x0]
             + (ly * lx * keep)[:, None] * pixels[batch, y1, x1])
    return value


def location_weights(u: Tensor, v: Tensor, grid: int) -> Tensor:
    """Blend weights ``alpha`` ``(N, K*K)`` of the classifier cells: bilinear upsampling of a
    one-hot ``K x K`` map at relative place ``(u, v)``, ``align_corners=False``. Rows of
    non-finite places are NaN."""
    ku0, ku1, lu, _ = feature_axis(u, grid, grid, PADDING_BORDER)
    kv0, kv1, lv, _ = feature_axis(v, grid, grid, PADDING_BORDER)
    alpha = torch.zeros(u.shape[0], grid * grid, dtype=u.dtype, device=u.device)
    for kv, ku, w in ((kv0, ku0, (1 - lv) * (1 - lu)), (kv0, ku1, (1 - lv) * lu),
                      (kv1, ku0, lv * (1 - lu)), (kv1, ku1, lv * lu)):
        alpha = alpha.index_put((torch.arange(u.shape[0], device=u.device), kv * grid + ku), w,
                                accumulate=True)
    finite = (torch.isfinite(u) & torch.isfinite(v))[:, None]
    return torch.where(finite, alpha, torch.full_like(alpha, float("nan")))


def box_grid_points(boxes: Tensor, output_height: int, output_width: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Grid points of every box, box-major then row-major: batch value, x, y, u, v, each
    ``(R * oh * ow,)``. ``x = x1 + (j + 0.5) * (x2 - x1) / ow``, ``u = (j + 0.5) / ow``."""
    dtype, device = boxes.dtype, boxes.device
    j = torch.arange(output_width, dtype=dtype, device=device)
    i = torch.arange(output_height, dtype=dtype, device=device)
    u = ((j + 0.5) / output_width)[None, None, :].expand(boxes.shape[0], output_height, output_width)
    v = ((i + 0.5) / output_height)[None, :, None].expand(boxes.shape[0], output_height, output_width)
    b, x1, y1, x2, y2 = (boxes[:, c, None, None] for c in range(5))
    x = x1 + (j[None, None, :] + 0.5) * (x2 - x1) / output_width
    y = y1 + (i[None, :, None] + 0.5) * (y2 - y1) / output_height
    shape = (boxes.shape[0], output_height, output_width)
    return (b.expand(shape).reshape(-1), x.expand(shape).reshape(-1), y.expand(shape).reshape(-1),
            u.reshape(-1), v.reshape(-1))


def batch_indices(values: Tensor, batch: int) -> Tuple[Tensor, Tensor]:
    """Batch values -> (index clamped into range, whether the value was an integer in [0, B))."""
    valid = (values >= 0) & (values < batch) & (values == values.floor())
    index = torch.where(valid, values, torch.zeros_like(values)).long()
    return index, valid


def valid_points(batch_values: Tensor, x: Tensor, y: Tensor, batch: int) -> Tuple[Tensor, Tensor]:
    """Batch index of each point (clamped into range) and whether the point is valid: an
    integer batch value in [0, B) and finite coordinates."""
    index, valid = batch_indices(batch_values, batch)
    return index, valid & torch.isfinite(x) & torch.isfinite(y)


def hypercolumns(features: Sequence[Tensor], batch_values: Tensor, x: Tensor, y: Tensor,
                 scale_y: Sequence[float], scale_x: Sequence[float], padding: int) -> Tensor:
    """Hypercolumns ``(N, sum C_l)`` at image points; NaN rows where the point or its batch
    index is invalid."""
    acc = accumulation_dtype(features[0].dtype)
    batch, valid = valid_points(batch_values, x, y, features[0].shape[0])
    columns = [sample_layer(f.to(acc), batch, x.to(acc), y.to(acc), sy, sx, padding)
               for f, sy, sx in zip(features, scale_y, scale_x)]
    column = torch.cat(columns, dim=1)
    return torch.where(valid[:, None], column, torch.full_like(column, float("nan")))


def classify(column_chunks: Sequence[Tensor], weights: Sequence[Tensor], bias: Optional[Tensor],
             labels: Optional[Tensor], alpha: Tensor, activation: int) -> Tensor:
    """Location-weighted classification of hypercolumns, split per layer.

    ``s_k(p) = sum_l W_l[label, k] @ f_l(p) + b[p, k]``; ``out(p) = sum_k alpha_k(p) * act(s_k(p))``.
    ``column_chunks[l]`` is ``(N, C_l)``, ``weights[l]`` is ``(NC, KK, M, C_l)``, ``bias`` is
    ``(N, KK, M)``, ``alpha`` is ``(N, KK)``. Returns ``(N, M)``.
    """
    acc = column_chunks[0].dtype
    classes = weights[0].shape[0]
    valid = None
    if labels is not None:  # a label outside [0, NC) gives NaN outputs, like the kernels
        valid = (labels >= 0) & (labels < classes)
        labels = torch.where(valid, labels, torch.zeros_like(labels))
    scores = 0
    for column, weight in zip(column_chunks, weights):
        per_class = torch.einsum("nc,qkmc->nqkm", column, weight.to(acc))
        if labels is None:
            scores = scores + per_class[:, 0]
        else:
            scores = scores + per_class[torch.arange(column.shape[0], device=column.device), labels]
    if valid is not None:
        scores = torch.where(valid[:, None, None], scores, torch.full_like(scores, float("nan")))
    if bias is not None:
        scores = scores + bias.to(acc)
    if activation == ACTIVATION_SIGMOID:
        scores = torch.sigmoid(scores)
    return torch.einsum("nk,nkm->nm", alpha, scores)


def _chunks(count: int):
    # At least one (maybe empty) chunk, so that an empty output is still a function of the inputs.
    return [(start, min(start + CHUNK, count)) for start in range(0, max(count, 1), CHUNK)]


def sparse_hypercolumn(features: List[Tensor], points: Tensor, scale_y: List[float], scale_x: List[float],
                       padding: int) -> Tensor:
    """``(N, sum C_l)`` hypercolumns at points ``(N, 3)`` rows ``(batch_index, x, y)``."""
    column = hypercolumns(features, points[:, 0], points[:, 1], points[:, 2], scale_y, scale_x, padding)
    return column.to(features[0].dtype)


def box_hypercolumn(features: List[Tensor], boxes: Tensor, output_height: int, output_width: int,
                    scale_y: List[float], scale_x: List[float], padding: int) -> Tensor:
    """``(R, sum C_l, oh, ow)`` hypercolumns on the grid of every box ``(R, 5)``."""
    b, x, y, _, _ = box_grid_points(boxes, output_height, output_width)
    column = hypercolumns(features, b, x, y, scale_y, scale_x, padding)
    out = column.reshape(boxes.shape[0], output_height, output_width, column.shape[1]).permute(0, 3, 1, 2)
    return out.to(features[0].dtype).contiguous()


def _fused(features: List[Tensor], batch_values: Tensor, x: Tensor, y: Tensor, u: Optional[Tensor],
           v: Optional[Tensor], weights: List[Tensor], bias: Optional[Tensor], labels: Optional[Tensor],
           scale_y: List[float], scale_x: List[float], padding: int, activation: int) -> Tensor:
    """``(N, M)`` fused outputs at points, a chunk of points at a time."""
    acc = accumulation_dtype(features[0].dtype)
    grid = int(round(weights[0].shape[1] ** 0.5))
    splits = [f.shape[1] for f in features]
    outputs = []
    for start, stop in _chunks(x.shape[0]):
        column = hypercolumns(features, batch_values[start:stop], x[start:stop], y[start:stop],
                              scale_y, scale_x, padding)
        if u is None:
            alpha = torch.ones(stop - start, 1, dtype=acc, device=x.device)
        else:
            alpha = location_weights(u[start:stop].to(acc), v[start:stop].to(acc), grid)
        # Invalid points and places: NaN outputs, but no gradient (NaN * 0 would pass NaN).
        valid = valid_points(batch_values[start:stop], x[start:stop], y[start:stop], features[0].shape[0])[1]
        valid = valid & torch.isfinite(alpha).all(1)
        column = torch.where(valid[:, None], column, torch.zeros_like(column))
        alpha = torch.where(valid[:, None], alpha, torch.zeros_like(alpha))
        out = classify(column.split(splits, dim=1), weights, None if bias is None else bias[start:stop],
                       None if labels is None else labels[start:stop], alpha, activation)
        outputs.append(torch.where(valid[:, None], out, torch.full_like(out, float("nan"))))
    return torch.cat(outputs).to(features[0].dtype)


def fused_hypercolumn(features: List[Tensor], boxes: Tensor, weights: List[Tensor], bias: Optional[Tensor],
                      labels: Optional[Tensor], output_height: int, output_width: int, scale_y: List[float],
                      scale_x: List[float], padding: int, activation: int, orders: List[int]) -> Tensor:
    """``(R, M, oh, ow)`` location-weighted classification of every box's grid. ``orders`` is
    ignored: both evaluation orders are exact, the reference samples features first."""
    count = boxes.shape[0]
    cells = output_height * output_width
    b, x, y, u, v = box_grid_points(boxes, output_height, output_width)
    if labels is not None:
        labels = labels.repeat_interleave(cells)
    if bias is not None:
        bias = bias.repeat_interleave(cells, dim=0)
    out = _fused(features, b, x, y, u, v, weights, bias, labels, scale_y, scale_x, padding, activation)
    return out.reshape(count, output_height, output_width, out.shape[1]).permute(0, 3, 1, 2).contiguous()


def fused_hypercolumn_points(features: List[Tensor], points: Tensor, locations: Optional[Tensor],
                             weights: List[Tensor], bias: Optional[Tensor], labels: Optional[Tensor],
                             scale_y: List[float], scale_x: List[float], padding: int, activation: int,
                             orders: List[int]) -> Tensor:
    """``(N, M)`` location-weighted classification of points ``(N, 3)`` at places ``(N, 2)``."""
    u = v = None
    if locations is not None:
        u, v = locations[:, 0], locations[:, 1]
    return _fused(features, points[:, 0], points[:, 1], points[:, 2], u, v, weights, bias, labels,
                  scale_y, scale_x, padding, activation)
