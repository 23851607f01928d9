"""Smoke test of an installed hypercolumn_ops (from a wheel or an sdist), run outside the sources.

    cd /tmp && python /path/to/tools/smoke_test.py

Checks that the package imports from an installation (not from a source checkout), that its
version is the installed distribution's, that the compiled extension loaded, and that each of the
four operators on the native backend (the C++ CPU kernels) equals the reference backend in
float64, output and the gradients of features, weights and bias, on small random inputs with
points and boxes on the image border. Needs torch alone: it also checks that torchvision was not
imported, since the operators must run without it. Exits non-zero on any failure.
"""

import importlib.metadata
import os
import sys

import torch

# Float64 kernels and reference differ only in the order of their additions (a few ulps on values
# of order 1); 1e-9 is the test suite's float64 tolerance (tests/kernel_checks.py).
RTOL = ATOL = 1e-9
IMAGE = (37, 45)  # (H, W), not powers of two, as the layers below


def import_installed():
    import hypercolumn_ops

    package_dir = os.path.dirname(os.path.abspath(hypercolumn_ops.__file__))
    if os.path.exists(os.path.join(os.path.dirname(package_dir), "setup.py")):
        sys.exit(f"smoke test: hypercolumn_ops was imported from a source tree ({package_dir}); "
                 f"run this from outside the sources, against an installed package")
    installed = importlib.metadata.version("hypercolumn_ops")
    if installed != hypercolumn_ops.__version__:
        sys.exit(f"smoke test: __version__ {hypercolumn_ops.__version__} but the installed "
                 f"distribution is {installed}")
    if "native" not in hypercolumn_ops.available_backends("cpu"):
        sys.exit("smoke test: the compiled extension (the native backend) is not available")
    from hypercolumn_ops import _native

    print(f"hypercolumn_ops {hypercolumn_ops.__version__} from {package_dir}, torch {torch.__version__}, "
          f"build {_native.BUILD_INFO}")
    return hypercolumn_ops


def inputs(generator):
    """Three layers (B = 2) of 3, 5 and 2 channels at strides about 2, 4 and 8 of a 37 x 45 image;
    points and boxes with some on the image border; classifiers with K = 3 (KK = 9), M = 2."""
    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    features = [rand(2, c, h, w) * 2 - 1 for c, h, w in ((3, 19, 23), (5, 9, 11), (2, 5, 6))]
    points = torch.cat([torch.tensor([[0, 0.0, 0.0], [1, 45.0, 37.0], [1, 45.0, 0.0]], dtype=torch.float64),
                        torch.cat([torch.randint(0, 2, (4, 1), generator=generator).double(),
                                   rand(4, 1) * 45, rand(4, 1) * 37], 1)])
    corners = torch.sort(rand(3, 2, 2) * torch.tensor([45.0, 37.0], dtype=torch.float64), dim=1).values
    boxes = torch.cat([torch.tensor([[0.0], [1.0], [1.0]], dtype=torch.float64), corners.reshape(3, 4)], 1)
    boxes[0, 1:] = torch.tensor([0.0, 0.0, 45.0, 37.0])
    weights = [rand(9, 2, f.shape[1]) - 0.5 for f in features]
    bias = rand(9, 2) - 0.5
    locations = rand(points.shape[0], 2)
    return features, points, boxes, weights, bias, locations


def calls(hc, features, points, boxes, weights, bias, locations):
    """Each operator as (name, function of the differentiable tensors)."""
    return [
        ("sparse_hypercolumn",
         lambda f: hc.sparse_hypercolumn(f, points, image_size=IMAGE)),
        ("box_hypercolumn",
         lambda f: hc.box_hypercolumn(f, boxes, (5, 7), image_size=IMAGE)),
        ("fused_hypercolumn",
         lambda f, w, b: hc.fused_hypercolumn(f, boxes, w, b, output_size=(5, 7), image_size=IMAGE,
                                              activation="sigmoid")),
        ("fused_hypercolumn_points",
         lambda f, w, b: hc.fused_hypercolumn_points(f, points, w, b, locations=locations, image_size=IMAGE)),
    ]


def run(hc, backend, function, tensors, grad_output_seed):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    features = leaves[:3]
    classifier = [] if len(leaves) == 3 else [leaves[3:6], leaves[6]]
    with hc.use_backend(backend):
        out = function(features, *classifier)
        grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_output_seed),
                                  dtype=out.dtype)
        grads = torch.autograd.grad(out, leaves, grad_output)
    return out.detach(), grads


def main():
    hc = import_installed()
    generator = torch.Generator().manual_seed(0)
    features, points, boxes, weights, bias, locations = inputs(generator)
    for index, (name, function) in enumerate(calls(hc, features, points, boxes, weights, bias, locations)):
        tensors = features if name in ("sparse_hypercolumn", "box_hypercolumn") else [*features, *weights, bias]
        native_out, native_grads = run(hc, "native", function, tensors, index)
        reference_out, reference_grads = run(hc, "reference", function, tensors, index)
        if not native_out.isfinite().all():
            sys.exit(f"smoke test: {name}: non-finite native output")
        torch.testing.assert_close(native_out, reference_out, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
        for i, (a, b) in enumerate(zip(native_grads, reference_grads)):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}, gradient {i}: {m}")
        print(f"{name}: output {tuple(native_out.shape)} and {len(native_grads)} gradients equal the reference")
    if "torchvision" in sys.modules:
        sys.exit("smoke test: the operators imported torchvision")
    print("smoke test passed")


if __name__ == "__main__":
    main()
