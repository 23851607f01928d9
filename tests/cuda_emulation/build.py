"""Builds the CUDA kernels of ``csrc/cuda/`` as a CPU extension with ``cuda_emulation.h``.

The sources are copied with a few mechanical rewrites (nothing else in them changes):

- ``kernel<<<grid, block, shared, stream>>>(args)`` -> ``hc_emulation::launch(grid, block, shared, kernel,
  args)``;
- the ATen/c10 CUDA headers and cub's -> ``cuda_emulation.h`` (streams, guards, atomics, launch
  checks, cub's radix sort), in place of a file's first such include;
- ``c10::DeviceType::CUDA`` -> ``c10::DeviceType::CPU`` (the device type the CUDA entries check
  their features for, ``csrc/cuda/launch.h``: the emulated kernels take CPU tensors);
- the operators are registered as ``torch.ops.hypercolumn_ops_cuda_emulated`` for CPU tensors
  (``csrc/ops.cpp``'s schema, ``csrc/autograd.cpp``'s formulas and ``csrc/op_handles.h``'s
  handles under that name), beside the real ``hypercolumn_ops``.
"""

import os
import re

import torch.utils.cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
NAMESPACE = "hypercolumn_ops_cuda_emulated"

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<(.*?)>>>\(", re.DOTALL)
_CUDA_INCLUDE = re.compile(r'#include <(?:ATen/cuda|c10/cuda|cub)/[^>]+>\n')


def _launch(match: re.Match) -> str:
    kernel, config = match.group(1), match.group(2)
    grid, block, shared = [part.strip() for part in config.split(",")[:3]]
    return f"hc_emulation::launch({grid}, {block}, {shared}, {kernel}, "


def rewrite(text: str) -> str:
    text = _LAUNCH.sub(_launch, text)
    first = _CUDA_INCLUDE.search(text)
    if first:
        text = text[:first.start()] + '#include "cuda_emulation.h"\n' + _CUDA_INCLUDE.sub("", text[first.start():])
    text = text.replace("c10::DeviceType::CUDA", "c10::DeviceType::CPU")
    text = text.replace("TORCH_LIBRARY_IMPL(hypercolumn_ops, CUDA, m)", f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU, m)")
    text = text.replace("TORCH_LIBRARY_IMPL(hypercolumn_ops, Autograd, m)", f"TORCH_LIBRARY_IMPL({NAMESPACE}, Autograd, m)")
    text = text.replace('"hypercolumn_ops::', f'"{NAMESPACE}::')
    return text.replace("TORCH_LIBRARY(hypercolumn_ops, m)", f"TORCH_LIBRARY({NAMESPACE}, m)")


def _read(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as file:
        return file.read()


_FAILED = []  # the first failed build's error, raised again by every later call


def build(verbose: bool = False):
    """Writes the rewritten sources under build/cuda_emulation/ and loads the extension (cached by
    torch.utils.cpp_extension between runs while the sources do not change). A failed build fails
    every later call in the process too: torch.utils.cpp_extension would otherwise take the same
    sources as built and load the previous build's library."""
    if _FAILED:
        raise _FAILED[0]
    try:
        return _build(verbose)
    except Exception as error:
        _FAILED.append(error)
        raise


def _build(verbose: bool):
    out = os.path.join(ROOT, "build", "cuda_emulation")
    os.makedirs(os.path.join(out, "cuda"), exist_ok=True)
    sources = []
    cuda = sorted(os.path.join("cuda", name) for name in os.listdir(os.path.join(ROOT, "csrc", "cuda"))
                  if name.endswith((".cu", ".cuh", ".h", ".cpp")))
    for relative in ["ops.cpp", "autograd.cpp", "op_handles.h"] + cuda:
        with open(os.path.join(ROOT, "csrc", relative)) as file:
            text = rewrite(file.read())
        target = os.path.join(out, relative.replace(".cu", ".cpp") if relative.endswith(".cu") else relative)
        if _read(target) != text:  # rewritten only when changed, so the build cache holds
            with open(target, "w") as file:
                file.write(text)
        if target.endswith(".cpp"):
            sources.append(target)
    return torch.utils.cpp_extension.load(
        name=NAMESPACE, sources=sources, build_directory=out, is_python_module=False, verbose=verbose,
        extra_include_paths=[HERE, os.path.join(ROOT, "csrc"), os.path.join(out, "cuda")],
        extra_cflags=["-O1", "-std=c++20", "-pthread"], extra_ldflags=["-pthread"])
