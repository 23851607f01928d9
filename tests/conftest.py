"""Test setup shared by every test file.

- HYPERCOLUMN_OPS_POISON=1: compiled kernels fill their outputs with NaN before running, so an
  element a kernel forgets to write fails the comparison instead of passing on stale memory.
- CUBLAS_WORKSPACE_CONFIG: the reference backend multiplies matrices with cuBLAS, which
  torch.use_deterministic_algorithms(True) allows only with a fixed workspace; it must be set
  before cuBLAS starts, hence here.
- TRITON_INTERPRET=1 where the machine has no NVIDIA device: the Triton kernels then run on
  CPU tensors through Triton's interpreter, so their tests run in CI too. It must be set before
  triton is imported, hence here, before torch.
- ``needs_cuda``: tests marked with it are skipped where no CUDA device is visible.
- ``slow``: the long sets (random seeds, the emulated CUDA kernels over every case, AOTInductor,
  training, interpreter sweeps). ``pytest -m "not slow"`` is the quick tier, which still runs every
  operator on every backend; ``pytest tests`` (CI) runs both.
"""

import os

os.environ["HYPERCOLUMN_OPS_POISON"] = "1"
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _grad_mode_is_left_as_found():
    """A test (or the example it runs in-process) that switches autograd off globally would make
    every later gradient test fail far from the cause; this names the test that did it."""
    enabled = torch.is_grad_enabled()
    yield
    if torch.is_grad_enabled() != enabled:
        torch.set_grad_enabled(enabled)
        pytest.fail("the test left torch's grad mode changed")
