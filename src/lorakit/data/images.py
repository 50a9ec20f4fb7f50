"""Labelled images for classification: the data sets lorakit knows by name, read into uint8 tensors.

    fashion-mnist/train   55,000 of Fashion-MNIST's 60,000 training images (28 x 28 grey, 10 classes)
    fashion-mnist/val      the other 5,000: validation while training
    fashion-mnist/test    its 10,000 test images
    digits/train, digits/test   scikit-learn's 1,797 handwritten digits (8 x 8 grey, 10 classes;
                                every fifth is test: 1,438 / 359)
    faces/train, faces/test     scikit-image's LFW subset: 200 25 x 25 grey crops, faces and non-faces
                                (every fifth is test: 160 / 40)

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (MIT licence; the four idx
files under /usr/share/datasets/fashion-mnist), or from the directory $LORAKIT_FASHION_MNIST names.
The split into train and val is fixed (the last 5,000 images are val), so a run and its resume see
the same images.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorakit.errors import LorakitError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
FACE_CLASSES = ("face", "not a face")
FASHION_VAL = 5000  # the last images of Fashion-MNIST's training file


class ImageDataError(LorakitError):
    """An image data set is missing or unreadable."""


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # (N, H, W) uint8, grey
    labels: torch.Tensor  # (N,) int64
    classes: tuple[str, ...]
    name: str

    def __len__(self) -> int:
        return len(self.labels)


def image_set(spec: str) -> ImageSet:
    """The data set ``spec`` names: ``fashion-mnist/{train,val,test}``, ``digits/{train,test}`` or
    ``faces/{train,test}``."""
    source, _, split = spec.partition("/")
    if source == "fashion-mnist" and split in ("train", "val", "test"):
        prefix = "t10k" if split == "test" else "train"
        images = read_idx(_fashion_file(f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(_fashion_file(f"{prefix}-labels-idx1-ubyte.gz"))
        if split != "test":
            part = slice(None, -FASHION_VAL) if split == "train" else slice(-FASHION_VAL, None)
            images, labels = images[part], labels[part]
        return ImageSet(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)),
                        FASHION_MNIST_CLASSES, spec)
    if source in ("digits", "faces") and split in ("train", "test"):
        images, labels = _digits() if source == "digits" else _faces()
        test = torch.arange(len(labels)) % 5 == 4
        part = test if split == "test" else ~test
        return ImageSet(images[part], labels[part], DIGIT_CLASSES if source == "digits" else FACE_CLASSES, spec)
    raise ImageDataError(f"unknown image data {spec!r}; use fashion-mnist/train, fashion-mnist/val, "
                         "fashion-mnist/test, digits/train, digits/test, faces/train or faces/test")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (LeCun's MNIST format, optionally gzipped): a big-endian header giving the type
    and the dimensions, then the values. Only unsigned bytes, the type every MNIST-like set uses."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise ImageDataError(f"{path}: cannot be read ({err})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ImageDataError(f"{path}: not an idx file of unsigned bytes")
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    if len(raw) != 4 + 4 * dims + int(np.prod(shape)):
        raise ImageDataError(f"{path}: holds {len(raw)} bytes, not the {4 + 4 * dims + int(np.prod(shape))} its "
                             f"header ({shape}) calls for; the file is truncated")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fashion_file(name: str) -> Path:
    directory = Path(os.environ.get("LORAKIT_FASHION_MNIST", FASHION_MNIST_DIR))
    path = directory / name
    if not path.is_file():
        raise ImageDataError(f"{path}: Fashion-MNIST is not installed; install Debian's package "
                             "(`sudo apt-get install dataset-fashion-mnist`), or set LORAKIT_FASHION_MNIST to a "
                             "directory holding its four idx files")
    return path


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImageDataError("the digits data set comes with scikit-learn: `pip install scikit-learn`") from None
    digits = load_digits()  # (1797, 8, 8) values 0..16
    images = torch.from_numpy((digits.images * 255 / 16).round().astype(np.uint8))
    return images, torch.from_numpy(digits.target.astype(np.int64))


def _faces() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from skimage import data
    except ImportError:
        raise ImageDataError("the faces data set comes with scikit-image: `pip install scikit-image`") from None
    faces = data.lfw_subset()  # (200, 25, 25) floats in [0, 1]: 100 faces, then 100 non-faces
    images = torch.from_numpy((faces * 255).round().astype(np.uint8))
    return images, (torch.arange(len(images)) >= 100).long()


def model_input(images: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, H, W) uint8 grey images -> (N, 3, size, size) float, as an ImageNet model expects them:
    scaled to [0, 1], resized (bilinear, antialiased when shrinking), grey copied to the three
    colour channels, normalised with ``mean`` and ``std``. With ``generator``, the training
    augmentation: each image shifted by up to a fourteenth of its side (zero-padded, then cropped
    back) and mirrored left-right half the time, drawn from ``generator`` alone so that a step's
    images are a function of the step's seed."""
    x = images.float().div(255)[:, None]  # (N, 1, H, W)
    if generator is not None:
        x = _shifted_and_mirrored(x, generator)
    shrinking = size < x.shape[-1]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                        antialias=shrinking)
    x = x.expand(-1, 3, -1, -1)  # (N, 3, size, size)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _shifted_and_mirrored(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    pad = max(1, h // 14)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).tolist()
    mirror = (torch.rand(n, generator=generator) < 0.5).tolist()
    out = torch.stack([padded[i, :, top:top + h, left:left + w] for i, (top, left) in enumerate(offsets)])
    flip = torch.tensor(mirror).view(n, 1, 1, 1)
    return torch.where(flip, out.flip(-1), out)
