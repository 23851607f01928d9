"""Deploys a model that calls the operators to C++, with no Python at run time, and checks it.

A small segmenter (two convolutions, ``HypercolumnHead`` on both, ``sparse_hypercolumn`` at the
box centres) is exported with ``torch.export`` with a dynamic number of boxes, compiled by
AOTInductor into a package, then run by ``hypercolumn_ops_aoti`` (``tools/aoti_run.cpp``, built
by CMake and linked with ``libhypercolumn_ops``) on box counts the export never saw. The C++
program compares every output with eager PyTorch's; this script exits with its status.

Usage: python tools/aoti_check.py [--runner build/cmake/hypercolumn_ops_aoti]
(torch 2.6 or newer: AOTInductor packages.)
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import hypercolumn_ops
from hypercolumn_ops.nn import HypercolumnHead


class Segmenter(nn.Module):
    """Features at strides 1 and 2, a 3 x 3 grid of two-output classifiers over each box, and
    the hypercolumn at each box centre."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.head = HypercolumnHead([4, 6], num_outputs=2, grid_size=3, output_size=(7, 5), activation="sigmoid")

    def forward(self, images, boxes):
        f1 = self.conv1(images).relu()
        f2 = self.conv2(f1).relu()
        masks = self.head([f1, f2], boxes, image_size=images.shape[-2:])
        centres = torch.cat([boxes[:, :1], (boxes[:, 1:3] + boxes[:, 3:5]) / 2], 1)
        columns = hypercolumn_ops.sparse_hypercolumn([f1, f2], centres, image_size=images.shape[-2:])
        return masks.flatten(1).sum(1, keepdim=True) + columns


def boxes(count, generator):
    corner = torch.rand(count, 2, generator=generator, dtype=torch.float64) * 20
    size = 1 + torch.rand(count, 2, generator=generator, dtype=torch.float64) * 12
    batch = torch.randint(0, 2, (count, 1), generator=generator).double()
    return torch.cat([batch, corner, corner + size], 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runner", default="build/cmake/hypercolumn_ops_aoti", help="the C++ program")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # float64: the C++ program can then hold the outputs to float64 rounding of eager's.
    model = Segmenter().double().eval()
    images = torch.randn(2, 3, 24, 32, generator=generator, dtype=torch.float64)
    count = torch.export.Dim("R", min=1, max=4096)
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        exported = torch.export.export(model, (images, boxes(4, generator)),
                                       dynamic_shapes={"images": None, "boxes": {0: count}})
        package = torch._inductor.aoti_compile_and_package(exported, package_path=str(Path(tmp) / "segmenter.pt2"))
        cases = []
        for r in (1, 9, 30):
            case_boxes = boxes(r, generator)
            cases.append([images, case_boxes, model(images, case_boxes)])
        torch.save(cases, Path(tmp) / "cases.pt")
        return subprocess.run([args.runner, package, str(Path(tmp) / "cases.pt")]).returncode


if __name__ == "__main__":
    sys.exit(main())
