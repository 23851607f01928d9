"""Test setup shared by every test file.

- HYPERCOLUMN_OPS_POISON=1: compiled kernels fill their outputs with NaN before running, so an
  element a kernel forgets to write fails the comparison instead of passing on stale memory.
- CUBLAS_WORKSPACE_CONFIG: the reference backend multiplies matrices with cuBLAS, which
  torch.use_deterministic_algorithms(True) allows only with a fixed workspace; it must be set
  before cuBLAS starts, hence here.
- ``needs_cuda``: tests marked with it are skipped where no CUDA device is visible.
"""

import os

os.environ["HYPERCOLUMN_OPS_POISON"] = "1"
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)
