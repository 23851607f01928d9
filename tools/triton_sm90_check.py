"""Compile every Triton kernel of the ``"triton"`` backend for an H100 (sm_90), without a GPU.

    python tools/triton_sm90_check.py [CASE]   # TRITON_INTERPRET unset; CASE: part of the case names

Triton's interpreter (how the tests run the kernels on a CPU) never compiles them, so a kernel
that the interpreter accepts may still fail to compile for a GPU. This script runs the backend's
operators forward and backward on the CPU over the test cases of ``tests/cases.py`` and the
sampling options those leave at their defaults (``sampling_ratio``, ``aligned``,
``padding="zeros_per_tap"``; every dtype, both evaluation orders, atomic and deterministic
backward) with a compile-only driver: each kernel
launch compiles the kernel for sm_90, down to a cubin through Triton's ptxas, and runs nothing, so
the values computed along the way are meaningless. It prints each kernel and how many
specialisations were compiled, and exits 1 on the first kernel that does not compile.
"""

import os
import sys
from collections import Counter

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_sm90_check: unset TRITON_INTERPRET; this check compiles the kernels")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


class CompileOnlyDriver:
    """What JITFunction.run asks of the active driver, for a device that is never touched."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET


compiled = Counter()
_run = JITFunction.run


def compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    compiled[self.fn.__name__] += 1
    return kernel


def sampling_option_cases(dtype):
    """A case of each operator for each kernel variant of the sampling options: fixed and adaptive
    ``sampling_ratio``, ``aligned=False``, and the three paddings."""
    import cases

    g = torch.Generator().manual_seed(0)
    features = cases.features(dtype, "cpu", "channels_last", g, requires_grad=True)
    weights = cases.classifier(3, 2, 4, dtype, "cpu", g, requires_grad=True)
    boxes = cases.boxes(3, torch.float32, "cpu", g)
    points = cases.points(5, torch.float32, "cpu", g)
    box_labels = torch.randint(0, 4, (len(boxes),), generator=g)
    point_labels = torch.randint(0, 4, (len(points),), generator=g)
    locations = torch.rand(len(points), 2, generator=g)
    found = []
    for sampling_ratio, aligned, padding in ((2, True, "zeros_per_tap"), (0, False, "zeros"), (1, False, "border"),
                                             (-1, True, "zeros_per_tap"), (1, True, "zeros_per_tap")):
        name = f"ratio{sampling_ratio}-aligned{aligned}-{padding}"
        options = dict(image_size=cases.IMAGE, padding=padding, sampling_ratio=sampling_ratio, aligned=aligned)
        found.append(cases.Case("box_hypercolumn", (features, boxes, (3, 4)), options, name))
        found.append(cases.Case("fused_hypercolumn", (features, boxes, weights),
                                dict(output_size=(3, 4), labels=box_labels, activation="sigmoid", **options), name))
    found.append(cases.Case("sparse_hypercolumn", (features, points),
                            dict(image_size=cases.IMAGE, padding="zeros_per_tap"), "zeros_per_tap"))
    found.append(cases.Case("fused_hypercolumn_points", (features, points, weights),
                            dict(image_size=cases.IMAGE, labels=point_labels, locations=locations,
                                 activation="sigmoid", padding="zeros_per_tap"), "zeros_per_tap"))
    return found


def main() -> None:
    only = sys.argv[1] if len(sys.argv) > 1 else ""  # a substring of the case names to check
    driver.set_active(CompileOnlyDriver())
    JITFunction.run = compile_only

    import cases
    from hypercolumn_ops import triton_backend  # noqa: F401  (registers torch.ops.hypercolumn_ops_triton)
    from kernel_checks import run_in_order

    ops = torch.ops.hypercolumn_ops_triton
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        every_case = cases.all_cases(dtype, "cpu", requires_grad=True) + sampling_option_cases(dtype)
        for case in [c for c in every_case if only in repr(c)]:
            for deterministic in (False, True):
                for order in ((0, 1) if case.op.startswith("fused") else (None,)):
                    torch.use_deterministic_algorithms(deterministic)
                    try:
                        out = run_in_order(case, ops, order)
                        inputs = cases.differentiable_inputs(case)
                        torch.autograd.grad(out.float().nan_to_num().sum(), inputs, allow_unused=True)
                    except Exception as error:  # noqa: BLE001  (report which case broke, then fail)
                        print(f"triton_sm90_check: {case} ({dtype}, order {order}, deterministic {deterministic}) "
                              f"failed: {type(error).__name__}: {error}", file=sys.stderr)
                        sys.exit(1)
                    finally:
                        torch.use_deterministic_algorithms(False)
    for name, count in sorted(compiled.items()):
        print(f"{name}: {count} launches compiled for sm_90")
    print(f"triton {triton.__version__}: every kernel compiled for sm_90")


if __name__ == "__main__":
    main()
