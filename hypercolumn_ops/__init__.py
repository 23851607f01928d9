"""Fused hypercolumn operators (Hariharan et al., CVPR 2015) for PyTorch.

``sparse_hypercolumn``, ``box_hypercolumn``, ``fused_hypercolumn`` and
``fused_hypercolumn_points`` sample many CNN layers at points or on box grids, bilinearly, and
(fused) classify the hypercolumns with location-specific classifiers, without upsampling any
layer to image size. See ``docs/semantics.md`` (the specification) and the README.
"""

import os

# Under torch.use_deterministic_algorithms(True) cuBLAS matrix products (the score-map projection
# of the CUDA and Triton backends, the reference's classifier) raise unless this is set; the
# operators must never raise for that reason (the CUDA kernels fall back to sampling features
# where it is set to something else). It only fixes the size of cuBLAS's workspace.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from . import _native  # noqa: E402, F401  (loads and registers the compiled operators when built)
from .backends import available_backends, use_backend  # noqa: E402
from .ops import (box_hypercolumn, fused_hypercolumn, fused_hypercolumn_points,  # noqa: E402
                  set_value_checks, sparse_hypercolumn)

from .version import __version__  # noqa: E402, F401

# Submodules imported on first use (hypercolumn_ops.nn.HypercolumnHead, ...), so that importing
# the operators does not import torchvision.
_SUBMODULES = ("baselines", "hed", "models", "nn", "onnx", "planning", "reference", "tasks")


def __getattr__(name):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "available_backends",
    "box_hypercolumn",
    "fused_hypercolumn",
    "fused_hypercolumn_points",
    "set_value_checks",
    "sparse_hypercolumn",
    "use_backend",
]
