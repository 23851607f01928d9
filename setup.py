"""Builds hypercolumn_ops._C: the C++ CPU kernels always, the CUDA kernels with a CUDA torch and nvcc.

FORCE_CUDA=1 builds the CUDA sources even where no GPU is visible (nvcc is enough); FORCE_CUDA=0
builds the CPU kernels only. Install with `pip install --no-build-isolation -e .`.
"""

import glob
import importlib.util
import os
import sys

import shutil

import torch
from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home() -> None:
    """Set CUDA_HOME to a toolkit with headers when the caller has not: torch guesses it from
    `which nvcc`, which a wrapper script (/usr/local/bin/nvcc -> /usr/local/cuda-X/bin/nvcc)
    turns into /usr/local, where the build finds no CUDA headers or libraries."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for home in candidates + ["/usr/local/cuda"]:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


find_cuda_home()  # before cpp_extension reads CUDA_HOME at import
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA")
    if force is not None:
        return force == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def pip_cuda_includes():
    """Header folders of the pip-installed CUDA libraries (the nvidia-* wheels torch depends on), for a
    CUDA toolkit that lacks the cuBLAS / cuSPARSE headers ATen's CUDA headers include."""
    if CUDA_HOME is None or os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec is not None and spec.submodule_search_locations else []
    return [d for root in roots for d in sorted(glob.glob(os.path.join(root, "*", "include")))
            if os.path.exists(os.path.join(d, "cusparse.h"))]


DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def extension():
    with_cuda = want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    # The C++ runtime torch uses, as the shared library: a g++ whose own library folder holds only
    # libstdc++.a (the relocated GCC 13 of the GPU image we test on) links a second, static copy
    # into the extension, whose stream and locale state is not torch's; formatting a number into an
    # error message then stops short or crashes. Named by file, the shared library is found in the
    # system folders and resolves every symbol before the archive is searched.
    runtime = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []
    # Hidden symbols: the kernels' helpers (header templates) are called directly and inlined
    # within the library rather than through its PLT; the module init and the operator registrations
    # need no exported symbol of ours.
    cxx = ["-O3", "-fvisibility=hidden", *openmp]  # cpp_extension adds the C++ standard torch needs
    macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    kind = CppExtension
    extra = {"cxx": cxx}
    if with_cuda and cuda_sources:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to read the architecture from: A100 and H100 machine code, plus PTX that
            # newer GPUs compile at load time.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        kind = CUDAExtension
        sources += cuda_sources
        macros.append(("HYPERCOLUMN_OPS_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler", "-fvisibility=hidden"]
        include_dirs += pip_cuda_includes()
    cuda = "off"
    if kind is CUDAExtension:
        cuda = f"on ({CUDA_HOME}, archs {os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPUs')})"
    print(f"hypercolumn_ops build: torch {torch.__version__}, CUDA kernels {cuda}, "
          f"OpenMP {'on' if openmp else 'off'}, {len(sources)} sources", flush=True)
    return kind("hypercolumn_ops._C", sources, include_dirs=include_dirs, define_macros=macros,
                extra_compile_args=extra, extra_link_args=openmp + runtime)


setup(
    packages=find_packages(include=["hypercolumn_ops", "hypercolumn_ops.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
)
