"""The coordinate and weight math of the contract as ``@triton.jit`` helpers.

Same names and steps as ``csrc/hypercolumn_math.h`` (C++ and CUDA) and
``hypercolumn_ops/reference.py``, so the three implementations read side by side. Every helper
works element-wise on blocks; the accumulation dtype is that of the coordinates passed in
(float64 for float64 features, float32 otherwise).
"""

import triton
import triton.language as tl

PADDING_BORDER = tl.constexpr(0)
PADDING_ZEROS = tl.constexpr(1)
ACTIVATION_SIGMOID = tl.constexpr(1)


@triton.jit
def is_finite(value):
    """NaN and +-inf fail, without relying on a fast-math isfinite."""
    return (value == value) & (value - value == 0)


@triton.jit
def feature_axis(coord, scale, size, padding):
    """One axis: image coordinate -> (lower index, upper index, upper weight, inside).

    ``f = coord * scale - 0.5`` clamped to ``[0, size - 1]``; ``inside`` is False where
    padding="zeros" puts the point outside the map (``f < -1`` or ``f > size``). A non-finite
    coordinate yields index 0 and a NaN weight (it is replaced before any integer cast).
    """
    f = coord * scale - 0.5
    finite = is_finite(f)
    # Sizes arrive as runtime ints or (when 1) as constexprs: widen them by arithmetic, not .to().
    inside = (padding != PADDING_ZEROS) | ((f >= -1.0) & (f <= tl.zeros_like(f) + size))
    f = tl.where(finite, f, 0.0)
    f = tl.minimum(tl.maximum(f, 0.0), tl.zeros_like(f) + (size - 1))
    lo = tl.minimum(f.to(tl.int64), size - 1)  # f >= 0, so truncation is floor
    hi = tl.minimum(lo + 1, size - 1)
    frac = tl.where(finite, f - lo.to(f.dtype), float("nan"))
    return lo, hi, frac, inside


@triton.jit
def bilinear_taps(x, y, scale_y, scale_x, height, width, padding):
    """Bilinear taps of image points (x, y) on a (height, width) map -> y0, y1, x0, x1 (always in
    range) and weights w00, w01, w10, w11 (``w{dy}{dx}``; 0 outside with padding="zeros")."""
    y0, y1, ly, in_y = feature_axis(y, scale_y, height, padding)
    x0, x1, lx, in_x = feature_axis(x, scale_x, width, padding)
    keep = (in_y & in_x).to(ly.dtype)
    hy = 1.0 - ly
    hx = 1.0 - lx
    return y0, y1, x0, x1, keep * hy * hx, keep * hy * lx, keep * ly * hx, keep * ly * lx


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
    # feature_axis with scale K and border padding.
    ku0, ku1, lu, _ = feature_axis(u, grid, grid, PADDING_BORDER)
    kv0, kv1, lv, _ = feature_axis(v, grid, grid, PADDING_BORDER)
    return (kv0 * grid + ku0, kv0 * grid + ku1, kv1 * grid + ku0, kv1 * grid + ku1,
            (1.0 - lv) * (1.0 - lu), (1.0 - lv) * lu, lv * (1.0 - lu), lv * lu)


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
def point_geometry(coords_ptr, locations_ptr, offs_p, mask_p, cells_per_box, output_height, output_width,
                   batch, ACC: tl.constexpr, IS_BOX: tl.constexpr, HAS_LOCATIONS: tl.constexpr):
    """Points ``offs_p`` of an operator -> (row, batch index, valid, x, y, u, v).

    Box form (``IS_BOX``): point ``p`` is grid point ``p % (oh * ow)`` of box ``row = p // (oh * ow)``,
    rows ``(batch_index, x1, y1, x2, y2)``. Point form: ``row = p``, rows ``(batch_index, x, y)`` and,
    with ``HAS_LOCATIONS``, locations ``(u, v)`` (otherwise the box centre, K == 1). ``valid`` is
    False for masked-off points, invalid batch indices and non-finite coordinates.
    """
    if IS_BOX:
        row = offs_p // cells_per_box
        cell = offs_p % cells_per_box
        base = coords_ptr + row * 5
        batch_value = tl.load(base, mask=mask_p, other=0.0).to(ACC)
        x1 = tl.load(base + 1, mask=mask_p, other=0.0).to(ACC)
        y1 = tl.load(base + 2, mask=mask_p, other=0.0).to(ACC)
        x2 = tl.load(base + 3, mask=mask_p, other=0.0).to(ACC)
        y2 = tl.load(base + 4, mask=mask_p, other=0.0).to(ACC)
        x, y, u, v = box_grid_point(x1, y1, x2, y2, cell // output_width, cell % output_width, output_height,
                                    output_width)
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
