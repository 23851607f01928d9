"""The ``"reference"`` backend: pure PyTorch, written formula by formula from ``docs/semantics.md``.

It is the truth every kernel is tested against, and the fallback on any device. It takes the
normalised arguments of the compiled operators (see ``csrc/ops.cpp``) and is differentiable
through ordinary autograd. It is written for clarity, not memory: it gathers the hypercolumns
of a chunk of points (``CHUNK``) or boxes at a time, so it also runs on real workloads.
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._codes import (ACTIVATION_NONE, ACTIVATION_SIGMOID, PADDING_BORDER, PADDING_ZEROS,  # noqa: F401
                     PADDING_ZEROS_PER_TAP)

CHUNK = 1 << 15

# The most samples per axis of an output cell: a larger sampling_ratio is refused, and adaptive
# sampling (sampling_ratio <= 0) takes at most this many. torchvision's roi_align has no bound,
# so a huge ratio or a box of astronomical extent never finishes (and an infinite extent is
# undefined behaviour). Adaptive sampling reaches it only for boxes over 1024 feature pixels per
# output cell.
MAX_ADAPTIVE_SAMPLES = 1024


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums accumulate in float32 at least: float64 stays, the rest compute in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_scales(features: Sequence[Tensor], image_size: Sequence[int],
                 spatial_scale: Sequence[float]) -> Tuple[List[float], List[float]]:
    """Per-layer scales ``(sy, sx)``: ``(H_l / H, W_l / W)`` from ``image_size = (H, W)``, or
    ``spatial_scale[l]`` for both axes. Exactly one of the two lists is non-empty."""
    if len(image_size):
        height, width = image_size
        return [f.shape[2] / height for f in features], [f.shape[3] / width for f in features]
    return list(spatial_scale), list(spatial_scale)


def axis_taps(f: Tensor, size: int, padding: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The two taps of one axis of a bilinear sample at feature coordinate ``f`` (pixel ``i``'s
    centre at ``i``) on an axis of ``size`` pixels -> lower and upper index (in range), and their
    weights.

    - ``"border"``: ``f`` clamped to ``[0, size - 1]``.
    - ``"zeros"``: as border, but both weights 0 where ``f < -1`` or ``f > size``
      (``torchvision.ops.roi_align``).
    - ``"zeros_per_tap"``: ``f`` not clamped; a tap outside ``[0, size - 1]`` weighs 0
      (``F.grid_sample(padding_mode="zeros")``).

    ``f`` may be infinite (a finite coordinate times a large scale): it clamps or falls outside
    like any far coordinate. NaN ``f`` gets index 0 and weight 0: the callers give such points
    NaN outputs, and no gradient.
    """
    nan = torch.isnan(f)
    f = torch.where(nan, torch.zeros_like(f), f)
    if padding == PADDING_ZEROS_PER_TAP:
        # Far coordinates clamp to just outside the map, where both taps are outside too.
        f = f.clamp(-2, size + 1)
        lo = f.floor()
        frac = f - lo
        lo_inside = (lo >= 0) & (lo <= size - 1)
        hi_inside = (lo + 1 >= 0) & (lo + 1 <= size - 1)
        lo = lo.long()
        w_lo = torch.where(lo_inside & ~nan, 1 - frac, torch.zeros_like(frac))
        w_hi = torch.where(hi_inside & ~nan, frac, torch.zeros_like(frac))
        return lo.clamp(0, size - 1), (lo + 1).clamp(0, size - 1), w_lo, w_hi
    inside = ~nan
    if padding == PADDING_ZEROS:
        inside = inside & (f >= -1) & (f <= size)
    f = f.clamp(0, size - 1)
    lo = f.floor().long().clamp(max=size - 1)
    hi = (lo + 1).clamp(max=size - 1)
    frac = f - lo.to(f.dtype)
    keep = inside.to(f.dtype)
    return lo, hi, (1 - frac) * keep, frac * keep


def sample_layer(feature: Tensor, batch: Tensor, fx: Tensor, fy: Tensor, padding: int) -> Tensor:
    """Bilinear samples of one layer ``(B, C, H, W)`` at feature coordinates -> ``(N, C)``."""
    _, _, height, width = feature.shape
    y0, y1, wy0, wy1 = axis_taps(fy, height, padding)
    x0, x1, wx0, wx1 = axis_taps(fx, width, padding)
    pixels = feature.permute(0, 2, 3, 1)  # (B, H, W, C): one row of channels per pixel
    return ((wy0 * wx0)[:, None] * pixels[batch, y0, x0] + (wy0 * wx1)[:, None] * pixels[batch, y0, x1]
            + (wy1 * wx0)[:, None] * pixels[batch, y1, x0] + (wy1 * wx1)[:, None] * pixels[batch, y1, x1])


def location_weights(u: Tensor, v: Tensor, grid: int) -> Tensor:
    """Blend weights ``alpha`` ``(N, K*K)`` of the classifier cells: bilinear upsampling of a
    one-hot ``K x K`` map at relative place ``(u, v)``, ``align_corners=False``. Rows of
    non-finite places are NaN."""
    ku0, ku1, wu0, wu1 = axis_taps(u * grid - 0.5, grid, PADDING_BORDER)
    kv0, kv1, wv0, wv1 = axis_taps(v * grid - 0.5, grid, PADDING_BORDER)
    alpha = torch.zeros(u.shape[0], grid * grid, dtype=u.dtype, device=u.device)
    rows = torch.arange(u.shape[0], device=u.device)
    for kv, ku, w in ((kv0, ku0, wv0 * wu0), (kv0, ku1, wv0 * wu1), (kv1, ku0, wv1 * wu0), (kv1, ku1, wv1 * wu1)):
        alpha = alpha.index_put((rows, kv * grid + ku), w, accumulate=True)
    finite = (torch.isfinite(u) & torch.isfinite(v))[:, None]
    return torch.where(finite, alpha, torch.full_like(alpha, float("nan")))


def box_grid_points(boxes: Tensor, output_height: int, output_width: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Grid points of every box, box-major then row-major: batch value, x, y, u, v, each
    ``(R * oh * ow,)``. ``x = x1 + (j + 0.5) * (x2 - x1) / ow``, ``u = (j + 0.5) / ow``: the
    places of ``sampling_ratio=1, aligned=True``, in image pixels."""
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


def point_hypercolumns(features: Sequence[Tensor], points: Tensor, scale_y: Sequence[float],
                       scale_x: Sequence[float], padding: int) -> Tuple[List[Tensor], Tensor]:
    """Per-layer samples ``(N, C_l)`` at image points ``(N, 3)``, and whether each point is valid
    (an integer batch value in ``[0, B)``, finite coordinates). Layer ``l`` samples feature
    coordinate ``(x * sx - 0.5, y * sy - 0.5)``."""
    acc = accumulation_dtype(features[0].dtype)
    points = points.to(acc)
    batch, valid = batch_indices(points[:, 0], features[0].shape[0])
    x, y = points[:, 1], points[:, 2]
    valid = valid & torch.isfinite(x) & torch.isfinite(y)
    columns = [sample_layer(f.to(acc), batch, x * sx - 0.5, y * sy - 0.5, padding)
               for f, sy, sx in zip(features, scale_y, scale_x)]
    return columns, valid


def _sample_counts(extent: Tensor, cells: int, sampling_ratio: int) -> Tensor:
    """Samples per output cell along one axis of every box: ``sampling_ratio`` when positive, else
    ``ceil(extent / cells)`` of the box's extent in feature pixels (at most
    ``MAX_ADAPTIVE_SAMPLES``; 0 or less for an empty or reversed box, which then samples nothing)."""
    if sampling_ratio > 0:
        return torch.full(extent.shape, sampling_ratio, dtype=torch.long, device=extent.device)
    counts = torch.ceil(extent / cells).clamp(-1, MAX_ADAPTIVE_SAMPLES)
    return torch.where(torch.isnan(counts), torch.zeros_like(counts), counts).long()


def _axis_matrix(start: Tensor, end: Tensor, scale: float, cells: int, size: int, padding: int, sampling_ratio: int,
                 aligned: bool) -> Tensor:
    """The weights ``(R, cells, size)`` of one axis of every box's output cells over the map's
    pixels: cell ``j`` averages ``n`` samples at image coordinates
    ``start + (j + (s + 0.5) / n) * (end - start) / cells``, ``s < n``, each bilinear at feature
    coordinate ``coord * scale - 0.5`` (``aligned``) or ``coord * scale``. Without ``aligned``
    a box is at least one feature pixel wide: ``start * scale + (j + (s + 0.5) / n) / cells``
    where ``(end - start) * scale < 1``, as ``torchvision.ops.roi_align(aligned=False)``.

    Bilinear weights are separable, so a cell's average over ``n_y x n_x`` samples is the
    product of the two axes' averages: the sum over sample pairs regrouped.
    """
    extent = (end - start) * scale
    if not aligned:
        extent = extent.clamp(min=1)
    counts = _sample_counts(extent, cells, sampling_ratio)
    most = max(int(counts.max()), 1) if counts.numel() else 1
    s = torch.arange(most, dtype=start.dtype, device=start.device)
    j = torch.arange(cells, dtype=start.dtype, device=start.device)
    n = counts.clamp(min=1).to(start.dtype)[:, None, None]
    place = j[None, :, None] + (s[None, None, :] + 0.5) / n  # (R, cells, most), in cell units
    start, end = start[:, None, None], end[:, None, None]
    coord = start + place * (end - start) / cells
    f = coord * scale - 0.5 if aligned else coord * scale
    if not aligned:
        narrow = ((end - start) * scale < 1).expand_as(f)
        f = torch.where(narrow, start * scale + place / cells, f)
    lo, hi, w_lo, w_hi = axis_taps(f.reshape(-1), size, padding)
    taken = (s[None, None, :] < counts[:, None, None]).expand_as(f).reshape(-1).to(f.dtype)
    rows = torch.arange(f.numel() // most, device=f.device).repeat_interleave(most)
    matrix = torch.zeros(f.numel() // most, size, dtype=f.dtype, device=f.device)
    matrix = matrix.index_put((rows, lo), w_lo * taken, accumulate=True)
    matrix = matrix.index_put((rows, hi), w_hi * taken, accumulate=True)
    # A cell of no samples (counts <= 0) is 0; torchvision divides by max(n_y * n_x, 1).
    return matrix.reshape(-1, cells, size) / n


def box_columns(features: Sequence[Tensor], boxes: Tensor, output_height: int, output_width: int,
                scale_y: Sequence[float], scale_x: Sequence[float], padding: int, sampling_ratio: int,
                aligned: bool) -> Tuple[List[Tensor], Tensor]:
    """Per-layer samples ``(R, C_l, oh, ow)`` on the grid of every box ``(R, 5)``, and whether each
    box is valid (an integer batch value in ``[0, B)``, finite coordinates and extents).

    Output cell ``(i, j)`` averages ``n_y x n_x`` bilinear samples
    (``torchvision.ops.roi_align``'s rule, see :func:`_axis_matrix`); with ``sampling_ratio=1``
    and ``aligned=True`` it is the one sample at ``box_grid_points``.
    """
    acc = accumulation_dtype(features[0].dtype)
    boxes = boxes.to(acc)
    batch, valid = batch_indices(boxes[:, 0], features[0].shape[0])
    # Finite coordinates whose extent overflows (beyond half the dtype's largest value) put every
    # grid point at infinity: invalid too, as the kernels find them.
    extents = torch.stack([boxes[:, 3] - boxes[:, 1], boxes[:, 4] - boxes[:, 2]], dim=1)
    valid = valid & torch.isfinite(boxes[:, 1:]).all(1) & torch.isfinite(extents).all(1)
    safe = torch.where(valid[:, None], boxes[:, 1:], torch.zeros_like(boxes[:, 1:]))
    x1, y1, x2, y2 = safe.unbind(1)
    columns = []
    for feature, sy, sx in zip(features, scale_y, scale_x):
        _, channels, height, width = feature.shape
        rows = _axis_matrix(y1, y2, sy, output_height, height, padding, sampling_ratio, aligned)
        cols = _axis_matrix(x1, x2, sx, output_width, width, padding, sampling_ratio, aligned)
        column = feature.new_zeros((boxes.shape[0], channels, output_height, output_width), dtype=acc)
        for image in range(feature.shape[0]):  # one image's map at a time, not a copy per box
            mine = batch == image
            blended = torch.einsum("riy,cyx,rjx->rcij", rows[mine], feature[image].to(acc), cols[mine])
            column = column.index_put((mine.nonzero()[:, 0],), blended)
        columns.append(column)
    return columns, valid


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


def _chunks(count: int, size: int = CHUNK):
    # At least one (maybe empty) chunk, so that an empty output is still a function of the inputs.
    return [(start, min(start + size, count)) for start in range(0, max(count, 1), size)]


def _invalid_to_nan(out: Tensor, valid: Tensor) -> Tensor:
    shape = (-1,) + (1,) * (out.dim() - 1)
    return torch.where(valid.reshape(shape), out, torch.full_like(out, float("nan")))


def sparse_hypercolumn(features: List[Tensor], points: Tensor, image_size: List[int], spatial_scale: List[float],
                       padding: int) -> Tensor:
    """``(N, sum C_l)`` hypercolumns at points ``(N, 3)`` rows ``(batch_index, x, y)``."""
    scale_y, scale_x = layer_scales(features, image_size, spatial_scale)
    columns, valid = point_hypercolumns(features, points, scale_y, scale_x, padding)
    return _invalid_to_nan(torch.cat(columns, dim=1), valid).to(features[0].dtype)


def box_hypercolumn(features: List[Tensor], boxes: Tensor, output_height: int, output_width: int,
                    image_size: List[int], spatial_scale: List[float], padding: int, sampling_ratio: int,
                    aligned: bool) -> Tensor:
    """``(R, sum C_l, oh, ow)`` hypercolumns on the grid of every box ``(R, 5)``."""
    scale_y, scale_x = layer_scales(features, image_size, spatial_scale)
    columns, valid = box_columns(features, boxes, output_height, output_width, scale_y, scale_x, padding,
                                 sampling_ratio, aligned)
    return _invalid_to_nan(torch.cat(columns, dim=1), valid).to(features[0].dtype).contiguous()


def _fused(columns: Sequence[Tensor], valid: Tensor, alpha: Optional[Tensor], weights: List[Tensor],
           bias: Optional[Tensor], labels: Optional[Tensor], activation: int) -> Tensor:
    """``(N, M)`` fused outputs of per-layer hypercolumns ``(N, C_l)``; NaN where a point is
    invalid or its place is not finite, with no gradient (NaN * 0 would pass NaN)."""
    acc = columns[0].dtype
    if alpha is None:
        alpha = torch.ones(valid.shape[0], 1, dtype=acc, device=valid.device)
    valid = valid & torch.isfinite(alpha).all(1)
    columns = [torch.where(valid[:, None], c, torch.zeros_like(c)) for c in columns]
    alpha = torch.where(valid[:, None], alpha, torch.zeros_like(alpha))
    return _invalid_to_nan(classify(columns, weights, bias, labels, alpha, activation), valid)


def _grid(weights: Sequence[Tensor]) -> int:
    return math.isqrt(weights[0].shape[1])


def fused_hypercolumn(features: List[Tensor], boxes: Tensor, weights: List[Tensor], bias: Optional[Tensor],
                      labels: Optional[Tensor], output_height: int, output_width: int, image_size: List[int],
                      spatial_scale: List[float], padding: int, activation: int, orders: List[int],
                      sampling_ratio: int, aligned: bool) -> Tensor:
    """``(R, M, oh, ow)`` location-weighted classification of every box's grid. ``orders`` is
    ignored: both evaluation orders are exact, the reference samples features first. The
    location weights of output cell ``(i, j)`` are those of its place
    ``((j + 0.5) / ow, (i + 0.5) / oh)``, whatever the sampling."""
    scale_y, scale_x = layer_scales(features, image_size, spatial_scale)
    cells = output_height * output_width
    anchor = torch.zeros(1, 5, dtype=accumulation_dtype(features[0].dtype), device=boxes.device)
    _, _, _, u, v = box_grid_points(anchor, output_height, output_width)
    cell_alpha = location_weights(u, v, _grid(weights))
    outputs = []
    for start, stop in _chunks(boxes.shape[0], max(CHUNK // cells, 1)):
        columns, valid = box_columns(features, boxes[start:stop], output_height, output_width, scale_y, scale_x,
                                     padding, sampling_ratio, aligned)
        columns = [c.permute(0, 2, 3, 1).reshape(c.shape[0] * cells, c.shape[1]) for c in columns]
        count = stop - start
        out = _fused(columns, valid.repeat_interleave(cells), cell_alpha.repeat(count, 1), weights,
                     None if bias is None else bias[start:stop].repeat_interleave(cells, dim=0),
                     None if labels is None else labels[start:stop].repeat_interleave(cells), activation)
        outputs.append(out.reshape(count, output_height, output_width, out.shape[1]).permute(0, 3, 1, 2))
    return torch.cat(outputs).to(features[0].dtype).contiguous()


def fused_hypercolumn_points(features: List[Tensor], points: Tensor, locations: Optional[Tensor],
                             weights: List[Tensor], bias: Optional[Tensor], labels: Optional[Tensor],
                             image_size: List[int], spatial_scale: List[float], padding: int, activation: int,
                             orders: List[int]) -> Tensor:
    """``(N, M)`` location-weighted classification of points ``(N, 3)`` at places ``(N, 2)``."""
    scale_y, scale_x = layer_scales(features, image_size, spatial_scale)
    outputs = []
    for start, stop in _chunks(points.shape[0]):
        columns, valid = point_hypercolumns(features, points[start:stop], scale_y, scale_x, padding)
        alpha = None
        if locations is not None:
            place = locations[start:stop].to(columns[0].dtype)
            alpha = location_weights(place[:, 0], place[:, 1], _grid(weights))
        outputs.append(_fused(columns, valid, alpha, weights, None if bias is None else bias[start:stop],
                              None if labels is None else labels[start:stop], activation))
    return torch.cat(outputs).to(features[0].dtype)
