"""Backend selection: which implementation of the operators runs on a device.

``"native"`` is the compiled ``TORCH_LIBRARY`` kernels (C++ on CPU, CUDA on GPU), ``"triton"``
the Triton kernels (CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``), ``"reference"``
pure PyTorch on any device. Every backend offers the same four functions over the normalised
arguments of ``csrc/ops.cpp``: ``torch.ops.hypercolumn_ops``, ``torch.ops.hypercolumn_ops_triton``
and ``hypercolumn_ops.reference``.

A ``use_backend`` block holds for the thread that enters it; torch.compile guards on the choice.
"""

import contextlib
import importlib.util
import os
import threading
from typing import Dict, Iterator, List, Optional, Union

import torch

NAMES = ("native", "triton", "reference")
OPERATORS = ("sparse_hypercolumn", "box_hypercolumn", "fused_hypercolumn", "fused_hypercolumn_points")

# Per thread: the stack of backends forced by use_backend blocks.
_local = threading.local()

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
    """Backends that can run on ``device``, best first (``"reference"`` is always last).

    Args:
        device: a device or device type, e.g. ``"cpu"`` or ``torch.device("cuda", 1)``.

    Returns:
        Names, e.g. ``["native", "triton", "reference"]`` on a GPU with the extension built.
    """
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
    """Force backend ``name`` for the operator calls inside the block, in this thread.

    Args:
        name: ``"native"``, ``"triton"`` or ``"reference"``.

    Raises ``ValueError`` for an unknown name; a call inside the block raises ``ValueError`` if
    the backend cannot run on its tensors' device::

        with hypercolumn_ops.use_backend("reference"):
            expected = hypercolumn_ops.fused_hypercolumn(features, boxes, weights, image_size=(H, W))
    """
    if name not in NAMES:
        raise ValueError(f"use_backend: unknown backend {name!r}; expected one of {', '.join(NAMES)}")
    if name != "reference" and not any(name in available_backends(d) for d in ("cpu", "cuda")):
        raise ValueError(f"use_backend: backend {name!r} is not available here "
                         f"(available on cpu: {available_backends('cpu')})")
    forced = getattr(_local, "forced", None)
    if forced is None:
        forced = _local.forced = []
    forced.append(name)
    try:
        yield
    finally:
        forced.pop()


def current_backend() -> Optional[str]:
    """The backend forced by this thread's innermost ``use_backend`` block, or None."""
    forced = getattr(_local, "forced", None)
    return forced[-1] if forced else None


# The operators of each backend, {name: callable}, built on first use (a plain dict, which
# torch.compile traces, also when the first use is inside a compiled function): the native and
# Triton ones are the `.default` overloads (calling an overload packet costs the host a lookup).
_MODULES: Dict[str, Dict[str, object]] = {}
# The best backend of each device type: fixed once the extension is loaded and CUDA is known.
_DEFAULTS: Dict[str, Dict[str, object]] = {}


def _namespace(name: str) -> Dict[str, object]:
    module = _MODULES.get(name)
    if module is None:
        if name == "native":
            ops = torch.ops.hypercolumn_ops
        elif name == "triton":
            from . import triton_backend  # noqa: F401  (registers torch.ops.hypercolumn_ops_triton)

            ops = torch.ops.hypercolumn_ops_triton
        else:
            from . import reference as ops
        if name == "reference":
            module = {op: getattr(ops, op) for op in OPERATORS}
        else:
            module = {op: getattr(ops, op).default for op in OPERATORS}
        _MODULES[name] = module
    return module


def backend_module(value: torch.Tensor) -> Dict[str, object]:
    """The implementation of the four operators for tensors on ``value``'s device: a dict from
    ``"sparse_hypercolumn"``, ``"box_hypercolumn"``, ``"fused_hypercolumn"`` and
    ``"fused_hypercolumn_points"`` to callables that take the normalised arguments (operators of
    ``torch.ops``, or the reference's functions). Every operator call asks: the common case (no
    ``use_backend`` block, a CPU or CUDA tensor) reads two flags and a dict."""
    forced = getattr(_local, "forced", None)
    device_type = "cpu" if value.is_cpu else "cuda" if value.is_cuda else value.device.type
    if not forced:
        module = _DEFAULTS.get(device_type)
        if module is None:
            module = _DEFAULTS[device_type] = _namespace(available_backends(device_type)[0])
        return module
    name = forced[-1]
    available = available_backends(device_type)
    if name not in available:
        raise ValueError(f"use_backend: backend {name!r} cannot run on {device_type} tensors "
                         f"(available: {available})")
    return _namespace(name)
