"""The coordinate and weight math of ``docs/semantics.md`` as ``@triton.jit`` helpers.

Same names and steps as ``csrc/hypercolumn_math.h`` (C++ and CUDA) and
``hypercolumn_ops/reference.py``, so the three implementations read side by side. Every helper
works element-wise on blocks; the accumulation dtype is that of the coordinates passed in
(float64 for float64 features, float32 otherwise).
"""

import triton
import triton.language as tl

from .. import _codes
from ..reference import MAX_ADAPTIVE_SAMPLES

PADDING_BORDER = tl.constexpr(_codes.PADDING_BORDER)
PADDING_ZEROS = tl.constexpr(_codes.PADDING_ZEROS)
PADDING_ZEROS_PER_TAP = tl.constexpr(_codes.PADDING_ZEROS_PER_TAP)
ACTIVATION_SIGMOID = tl.constexpr(_codes.ACTIVATION_SIGMOID)
MAX_SAMPLES = tl.constexpr(MAX_ADAPTIVE_SAMPLES)


@triton.jit
def is_finite(value):
    """NaN and +-inf fail, without relying on a fast-math isfinite."""
    return (value == value) & (value - value == 0)


@triton.jit
def axis_taps(f, size, PADDING: tl.constexpr):
    """One axis of a bilinear sample at feature coordinate ``f`` (pixel ``i``'s centre at ``i``)
    on an axis of ``size`` pixels -> (lower index, upper index, lower weight, upper weight), the
    indices always in range.

    - ``"border"``: ``f`` clamped to ``[0, size - 1]``.
    - ``"zeros"``: as border, but both weights 0 where ``f < -1`` or ``f > size`` (roi_align).
    - ``"zeros_per_tap"``: ``f`` not clamped; a tap outside ``[0, size - 1]`` weighs 0
      (grid_sample's ``padding_mode="zeros"``).

    ``f = +-inf`` (a finite coordinate times a large scale) clamps or falls outside like any far
    coordinate; NaN gives index 0 and NaN weights (it is replaced before any integer cast).
    """
    nan = f != f
    f = tl.where(nan, 0.0, f)
    # Sizes arrive as runtime ints or (when 1) as constexprs: widen them by arithmetic, not .to().
    last = tl.zeros_like(f) + (size - 1)
    if PADDING == PADDING_ZEROS_PER_TAP:
        # Far coordinates clamp to just outside the map, where both taps are outside too.
        f = tl.minimum(tl.maximum(f, -2.0), last + 2.0)
        below = tl.floor(f)
        frac = f - below
        lo = below.to(tl.int64)  # integral and in [-2, size + 1]: exact
        w_lo = tl.where((lo >= 0) & (lo <= size - 1), 1.0 - frac, 0.0)
        w_hi = tl.where((lo >= -1) & (lo <= size - 2), frac, 0.0)
        hi = tl.minimum(tl.maximum(lo + 1, 0), size - 1)
        lo = tl.minimum(tl.maximum(lo, 0), size - 1)
        w_lo = tl.where(nan, float("nan"), w_lo)
        w_hi = tl.where(nan, float("nan"), w_hi)
    else:
        if PADDING == PADDING_ZEROS:
            keep = ((f >= -1.0) & (f <= last + 1.0)).to(f.dtype)
        else:
            keep = tl.full(f.shape, 1.0, f.dtype)
        f = tl.minimum(tl.maximum(f, 0.0), last)
        lo = tl.minimum(f.to(tl.int64), size - 1)  # f >= 0, so truncation is floor
        hi = tl.minimum(lo + 1, size - 1)
        frac = tl.where(nan, float("nan"), f - lo.to(f.dtype))  # NaN carries into both weights
        w_lo = (1.0 - frac) * keep
        w_hi = frac * keep
    return lo, hi, w_lo, w_hi


@triton.jit
def feature_axis(coord, scale, size, PADDING: tl.constexpr):
    """One axis of a point: image coordinate -> :func:`axis_taps` at feature coordinate
    ``coord * scale - 0.5``. A NaN coordinate gives NaN weights; an infinite one (or a finite one
    whose feature coordinate overflows) clamps like any far coordinate: the callers mark points
    with non-finite coordinates invalid."""
    return axis_taps(coord * scale - 0.5, size, PADDING)


@triton.jit
def bilinear_taps(x, y, scale_y, scale_x, height, width, PADDING: tl.constexpr):
    """Bilinear taps of image points (x, y) on a (height, width) map -> y0, y1, x0, x1 (always in
    range) and weights w00, w01, w10, w11 (``w{dy}{dx}``; 0 outside as ``PADDING`` says)."""
    y0, y1, wy0, wy1 = feature_axis(y, scale_y, height, PADDING)
    x0, x1, wx0, wx1 = feature_axis(x, scale_x, width, PADDING)
    return y0, y1, x0, x1, wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1


@triton.jit
def box_grid_point(x1, y1, x2, y2, i, j, output_height, output_width):
    """Grid point (i, j) of boxes (x1, y1, x2, y2) on an (oh, ow) grid -> image (x, y) and
    relative place (u, v) in the box."""
    fi = i.to(x1.dtype) + 0.5
    fj = j.to(x1.dtype) + 0.5
    u = fj / output_width
    v = fi / output_height
    x = x1 + fj * (x2 - x1) / output_width
    y = y1 + fi * (y2 - y1) / output_height
    return x, y, u, v


@triton.jit
def location_weights(u, v, grid):
    """The four classifier cells ``k = kv * K + ku`` around relative place (u, v) in a K x K grid
    and their bilinear weights (they sum to 1; NaN where u or v is not finite). Repeated cells
    (grid edges, K == 1) carry their share separately."""
    # The K x K grid spans the box: u sits at K-grid coordinate u * K - 0.5, exactly
    # feature_axis with scale K and border padding (which would clamp an infinite place).
    ku0, ku1, wu0, wu1 = feature_axis(tl.where(is_finite(u), u, float("nan")), grid, grid, PADDING_BORDER)
    kv0, kv1, wv0, wv1 = feature_axis(tl.where(is_finite(v), v, float("nan")), grid, grid, PADDING_BORDER)
    return (kv0 * grid + ku0, kv0 * grid + ku1, kv1 * grid + ku0, kv1 * grid + ku1,
            wv0 * wu0, wv0 * wu1, wv1 * wu0, wv1 * wu1)


@triton.jit
def batch_index(value, batch):
    """Batch values -> (index, valid): valid only for integer values in [0, batch); the index of
    an invalid value is 0, so it can still form an in-range address."""
    in_range = (value >= 0.0) & (value < tl.zeros_like(value) + batch)  # also rejects NaN
    index = tl.where(in_range, value, 0.0).to(tl.int64)
    return index, in_range & (index.to(value.dtype) == value)


@triton.jit
def sigmoid(score):
    return 1.0 / (1.0 + tl.exp(-score))


@triton.jit
def box_geometry(coords_ptr, offs_p, mask_p, cells_per_box, output_width, batch, ACC: tl.constexpr):
    """Grid points ``offs_p`` of boxes -> (row, batch index, valid, i, j, x1, y1, x2, y2).

    Point ``p`` is output cell ``p % (oh * ow)`` (row ``i``, column ``j``) of box
    ``row = p // (oh * ow)``, rows ``(batch_index, x1, y1, x2, y2)``. ``valid`` is False for
    masked-off points, invalid batch indices and boxes whose extents ``x2 - x1``, ``y2 - y1`` are
    not finite in ``ACC`` (which also rejects non-finite corners).
    """
    row = offs_p // cells_per_box
    cell = offs_p % cells_per_box
    base = coords_ptr + row * 5
    batch_value = tl.load(base, mask=mask_p, other=0.0).to(ACC)
    x1 = tl.load(base + 1, mask=mask_p, other=0.0).to(ACC)
    y1 = tl.load(base + 2, mask=mask_p, other=0.0).to(ACC)
    x2 = tl.load(base + 3, mask=mask_p, other=0.0).to(ACC)
    y2 = tl.load(base + 4, mask=mask_p, other=0.0).to(ACC)
    b, valid = batch_index(batch_value, batch)
    valid = valid & mask_p & is_finite(x2 - x1) & is_finite(y2 - y1)
    return row, b, valid, cell // output_width, cell % output_width, x1, y1, x2, y2


@triton.jit
def point_geometry(coords_ptr, locations_ptr, offs_p, mask_p, cells_per_box, output_height, output_width,
                   batch, ACC: tl.constexpr, IS_BOX: tl.constexpr, HAS_LOCATIONS: tl.constexpr):
    """Points ``offs_p`` of an operator -> (row, batch index, valid, x, y, u, v).

    Box form (``IS_BOX``, see :func:`box_geometry`): ``(x, y)`` is the grid point of the point's
    output cell, ``(u, v)`` its place in the box. Point form: ``row = p``, rows
    ``(batch_index, x, y)`` and, with ``HAS_LOCATIONS``, locations ``(u, v)`` (otherwise the box
    centre, K == 1); ``valid`` is False for masked-off points, invalid batch indices and
    non-finite coordinates.
    """
    if IS_BOX:
        row, b, valid, i, j, x1, y1, x2, y2 = box_geometry(coords_ptr, offs_p, mask_p, cells_per_box, output_width,
                                                           batch, ACC)
        x, y, u, v = box_grid_point(x1, y1, x2, y2, i, j, output_height, output_width)
    else:
        row = offs_p
        base = coords_ptr + row * 3
        batch_value = tl.load(base, mask=mask_p, other=0.0).to(ACC)
        x = tl.load(base + 1, mask=mask_p, other=0.0).to(ACC)
        y = tl.load(base + 2, mask=mask_p, other=0.0).to(ACC)
        if HAS_LOCATIONS:
            u = tl.load(locations_ptr + row * 2, mask=mask_p, other=0.5).to(ACC)
            v = tl.load(locations_ptr + row * 2 + 1, mask=mask_p, other=0.5).to(ACC)
        else:
            u = tl.full(x.shape, 0.5, ACC)
            v = tl.full(x.shape, 0.5, ACC)
        b, valid = batch_index(batch_value, batch)
        valid = valid & mask_p & is_finite(x) & is_finite(y)
    return row, b, valid, x, y, u, v


@triton.jit
def sample_count(extent, cells, sampling_ratio, ALIGNED: tl.constexpr):
    """Samples per output cell along one axis of boxes whose extent is ``extent`` feature pixels
    on ``cells`` output cells (int32): ``sampling_ratio`` when positive, else
    ``ceil(extent / cells)`` (the extent at least 1 unless ``ALIGNED``), at most ``MAX_SAMPLES``,
    and 0 for an empty or reversed box, which then samples nothing."""
    if not ALIGNED:
        extent = tl.maximum(extent, 1.0)
    # Correctly rounded, as the reference's: an approximate division (Triton's float32 default)
    # could move the ceil's jumps. Triton's float64 division is correctly rounded already.
    if extent.dtype == tl.float32:
        count = tl.ceil(tl.math.div_rn(extent, tl.zeros_like(extent) + cells))
    else:
        count = tl.ceil(extent / cells)
    adaptive = tl.where(count > 0.0, tl.minimum(count, MAX_SAMPLES), 0.0).to(tl.int32)  # NaN: 0
    return tl.where(sampling_ratio > 0, tl.zeros_like(adaptive) + sampling_ratio, adaptive)


@triton.jit
def box_sample_counts(x1, y1, x2, y2, valid, scale_y, scale_x, output_height, output_width, sampling_ratio,
                      ALIGNED: tl.constexpr):
    """Samples per output cell ``(ny, nx)`` of boxes (x1, y1, x2, y2) on one layer, per
    :func:`sample_count`; 0 for invalid points, so that they never drive a loop's bound."""
    ny = sample_count((y2 - y1) * scale_y, output_height, sampling_ratio, ALIGNED)
    nx = sample_count((x2 - x1) * scale_x, output_width, sampling_ratio, ALIGNED)
    return tl.where(valid, ny, 0), tl.where(valid, nx, 0)


@triton.jit
def sample_coordinate(start, end, scale, cell, sample, count, cells, ALIGNED: tl.constexpr):
    """Feature coordinate of sample ``sample`` of output cell ``cell`` along one axis of boxes
    ``[start, end]`` split into ``cells`` cells of ``count`` samples: image coordinate
    ``start + (cell + (sample + 0.5) / count) * (end - start) / cells`` times ``scale``, minus 0.5
    when ``ALIGNED``. Without ``ALIGNED`` a box under one feature pixel wide is one pixel wide:
    ``start * scale + (cell + (sample + 0.5) / count) / cells``, as roi_align(aligned=False)."""
    # `sample` is a Python int under the interpreter: widen it by arithmetic.
    place = cell.to(start.dtype) + (sample + 0.5) / (tl.zeros_like(start) + tl.maximum(count, 1))
    coord = start + place * (end - start) / cells
    if ALIGNED:
        f = coord * scale - 0.5
    else:
        f = tl.where((end - start) * scale < 1.0, start * scale + place / cells, coord * scale)
    return f


@triton.jit
def box_sample_taps(x1, y1, x2, y2, i, j, sample_y, sample_x, ny, nx, scale_y, scale_x, height, width,
                    output_height, output_width, PADDING: tl.constexpr, ALIGNED: tl.constexpr):
    """Bilinear taps of sample ``(sample_y, sample_x)`` of output cell ``(i, j)`` of boxes, whose
    cells average ``ny x nx`` samples -> y0, y1, x0, x1, the weights w00, w01, w10, w11 divided by
    ``ny * nx`` (the cell's share), and ``taken`` (``sample_y < ny`` and ``sample_x < nx``;
    the weights are 0 where not)."""
    fy = sample_coordinate(y1, y2, scale_y, i, sample_y, ny, output_height, ALIGNED)
    fx = sample_coordinate(x1, x2, scale_x, j, sample_x, nx, output_width, ALIGNED)
    top, bottom, wy0, wy1 = axis_taps(fy, height, PADDING)
    left, right, wx0, wx1 = axis_taps(fx, width, PADDING)
    taken_y = sample_y < ny
    taken_x = sample_x < nx
    share_y = tl.where(taken_y, 1.0 / (tl.zeros_like(fy) + tl.maximum(ny, 1)), 0.0)
    share_x = tl.where(taken_x, 1.0 / (tl.zeros_like(fx) + tl.maximum(nx, 1)), 0.0)
    wy0 *= share_y
    wy1 *= share_y
    wx0 *= share_x
    wx1 *= share_x
    return top, bottom, left, right, wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1, taken_y & taken_x
