"""Backend selection: which implementation of the operators runs on a device.

``"native"`` is the compiled ``TORCH_LIBRARY`` kernels (C++ on CPU, CUDA on GPU), ``"triton"``
the Triton kernels (CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``), ``"reference"``
pure PyTorch on any device. Every backend offers the same four functions over the normalised
arguments of ``csrc/ops.cpp``: ``torch.ops.hypercolumn_ops``, ``torch.ops.hypercolumn_ops_triton``
and ``hypercolumn_ops.reference``.
"""

import contextlib
import importlib.util
import os
from typing import Iterator, List, Optional, Union

import torch

NAMES = ("native", "triton", "reference")

# A stack rather than a thread-local: torch.compile reads (and guards on) module globals.
_forced: List[str] = []

# Looked up once, at import: torch.compile does not trace importlib (torch 2.11) or os.environ
# (torch 2.4). Triton itself reads TRITON_INTERPRET once, when it is first imported.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _device_type(device: Union[str, torch.device]) -> str:
    return torch.device(device).type


def native_available(device_type: str) -> bool:
    from . import _native

    return _native.available(device_type)


def _triton_available(device_type: str) -> bool:
    if not _TRITON_INSTALLED:
        return False
    if device_type == "cuda":
        return torch.cuda.is_available()
    return device_type == "cpu" and _TRITON_INTERPRET


def available_backends(device: Union[str, torch.device] = "cpu") -> List[str]:
    """Backends that can run on ``device``, best first (``"reference"`` is always last)."""
    device_type = _device_type(device)
    names = []
    if native_available(device_type):
        names.append("native")
    if _triton_available(device_type):
        names.append("triton")
    names.append("reference")
    return names


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force backend ``name`` for the operator calls inside the block.

    Raises ``ValueError`` for an unknown name; a call inside the block raises ``ValueError`` if
    the backend cannot run on its tensors' device.
    """
    if name not in NAMES:
        raise ValueError(f"use_backend: unknown backend {name!r}; expected one of {', '.join(NAMES)}")
    if name != "reference" and not any(name in available_backends(d) for d in ("cpu", "cuda")):
        raise ValueError(f"use_backend: backend {name!r} is not available here "
                         f"(available on cpu: {available_backends('cpu')})")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def current_backend() -> Optional[str]:
    """The backend forced by the innermost ``use_backend`` block, or None."""
    return _forced[-1] if _forced else None


def backend_module(device: torch.device):
    """The implementation of the four operators for tensors on ``device``: an object whose
    ``sparse_hypercolumn``, ``box_hypercolumn``, ``fused_hypercolumn`` and
    ``fused_hypercolumn_points`` take the normalised arguments (an operator namespace of
    ``torch.ops``, or the reference module)."""
    name = current_backend()
    available = available_backends(device)
    if name is None:
        name = available[0]
    elif name not in available:
        raise ValueError(f"use_backend: backend {name!r} cannot run on {device.type} tensors "
                         f"(available: {available})")
    if name == "native":
        return torch.ops.hypercolumn_ops
    if name == "triton":
        from . import triton_backend  # noqa: F401  (registers torch.ops.hypercolumn_ops_triton)

        return torch.ops.hypercolumn_ops_triton
    from . import reference

    return reference
