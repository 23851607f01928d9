"""The ``"triton"`` backend: Triton kernels for CUDA tensors (and CPU tensors under
``TRITON_INTERPRET=1``, which must be set before triton is first imported).

Importing it registers the ``torch.ops.hypercolumn_ops_triton`` operators, with the schema and
normalised arguments of ``csrc/ops.cpp`` and their own fake kernels and autograd formulas.
Files: ``hypercolumn_math.py`` (the coordinate and weight math as ``@triton.jit`` helpers),
``kernels.py`` (the kernels), ``launchers.py`` (block sizes, buffers, per-layer steps),
``ops.py`` (operator registration).
"""

from . import ops  # noqa: F401  (registers the torch.ops.hypercolumn_ops_triton operators)
