"""The integer codes of the compiled operators' arguments (``csrc/ops.cpp``), defined once for
Python: the public names of ``padding`` and ``activation``, and the per-layer evaluation orders.
``csrc/hypercolumn_math.h`` defines the same codes for C++ and CUDA; the Triton kernels and the
reference import them from here.
"""

PADDING_BORDER = 0
PADDING_ZEROS = 1
PADDING_ZEROS_PER_TAP = 2

ACTIVATION_NONE = 0
ACTIVATION_SIGMOID = 1

# The two exact evaluation orders of a fused operator's layer (hypercolumn_ops.planning).
ORDER_SAMPLE_FEATURES = 0
ORDER_PROJECT_SCORES = 1

PADDINGS = {"border": PADDING_BORDER, "zeros": PADDING_ZEROS, "zeros_per_tap": PADDING_ZEROS_PER_TAP}
ACTIVATIONS = {None: ACTIVATION_NONE, "sigmoid": ACTIVATION_SIGMOID}
