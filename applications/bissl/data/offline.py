"""Datasets that need no download: scikit-learn's digits and Fashion-MNIST from local idx files.

* ``digits``: the 1,797 8x8 handwritten digits shipped inside scikit-learn, upscaled (bilinear) to a
  chosen side, as 1-channel PIL images; a fixed stratified 80/20 train/test split (seed 0).
* ``fashion_mnist``: torchvision's :class:`~torchvision.datasets.FashionMNIST` reading the standard
  idx files from ``<root>/FashionMNIST/raw/``. When the decompressed files are missing they are
  decompressed from ``*.gz`` files in that folder, or from the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``); nothing is downloaded.
* ``photo_patches``: grayscale patches of the two colour photographs shipped inside scikit-learn
  (``load_sample_images``: a Chinese temple and a flower), a natural-image pretext set of another
  domain than handwritten digits that every machine has; labels = which photograph (unused).
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import FashionMNIST

from .labeled import LabeledDataset, stratified_split

__all__ = [
    "FASHION_MNIST_FILES",
    "SYSTEM_FASHION_MNIST_DIR",
    "digits",
    "fashion_mnist",
    "photo_patches",
    "prepare_fashion_mnist",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs the idx files.
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: The four idx files torchvision's FashionMNIST reads (decompressed names).
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

_DIGIT_CLASSES = [str(i) for i in range(10)]


class _ImageList:
    """A list of PIL images with dummy labels, indexable like a torchvision dataset."""

    def __init__(self, images: list[Image.Image]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.images[i], -1


def digits(split: str = "train", image_size: int = 32) -> LabeledDataset:
    """scikit-learn's handwritten digits as a 10-class, 1-channel image dataset.

    Args:
        split: ``"train"`` (1,438 images) or ``"test"`` (359), a fixed stratified split.
        image_size: side of the upscaled images (the originals are 8x8 with 17 grey levels).

    Returns:
        A :class:`LabeledDataset` of PIL ``"L"`` images (no transform set).

    Example:
        >>> ds = digits("test", image_size=16)
        >>> len(ds), ds.image(0).size, ds.num_classes
        (359, (16, 16), 10)
    """
    if split not in ("train", "test"):
        raise ValueError(f"digits has splits 'train' and 'test', got split={split!r}.")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (the digits are 8x8), got {image_size!r}.")
    images, targets = _digit_images(image_size)
    train_pos, test_pos = stratified_split(targets, 0.2, seed=0)
    pos = train_pos if split == "train" else test_pos
    return LabeledDataset(_ImageList([images[int(i)] for i in pos]), targets[pos], _DIGIT_CLASSES)


@functools.lru_cache(maxsize=4)
def _digit_images(image_size: int) -> tuple[list[Image.Image], torch.Tensor]:
    """All 1,797 digits as PIL images of the given side (cached: PIL images are never mutated)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = [Image.fromarray(p, mode="L").resize((image_size, image_size), Image.Resampling.BILINEAR) for p in pixels]
    return images, torch.as_tensor(bunch.target, dtype=torch.long)


PATCHES_PER_PHOTO = {"train": 2000, "test": 250}
PATCH_SIDE = 48  # pixels of the photograph per patch, before resizing to ``image_size``


def photo_patches(split: str = "train", image_size: int = 32) -> LabeledDataset:
    """Random grayscale patches of scikit-learn's two sample photographs (offline natural images).

    Every patch is a ``48 x 48`` square of a photograph (427 x 640 pixels) at a seeded random
    position, converted to grayscale and resized to ``image_size``. Train patches come from the left
    80 % of each photograph, test patches from the right 20 %, so the splits never overlap.

    Args:
        split: ``"train"`` (4,000 patches) or ``"test"`` (500).
        image_size: side of the returned images.

    Returns:
        A 2-class (which photograph) :class:`LabeledDataset` of 1-channel PIL images.

    Example:
        >>> ds = photo_patches("test", image_size=16)
        >>> len(ds), ds.image(0).size, ds.image(0).mode
        (500, (16, 16), 'L')
    """
    if split not in PATCHES_PER_PHOTO:
        raise ValueError(f"photo_patches has splits 'train' and 'test', got split={split!r}.")
    if not isinstance(image_size, int) or image_size < 4:
        raise ValueError(f"image_size must be an int >= 4, got {image_size!r}.")
    images, targets = _photo_patches(split, image_size)
    return LabeledDataset(_ImageList(images), targets, ["china", "flower"])


@functools.lru_cache(maxsize=4)
def _photo_patches(split: str, image_size: int) -> tuple[list[Image.Image], torch.Tensor]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0 if split == "train" else 1)
    images, targets = [], []
    for label, photo in enumerate(photos):
        gray = Image.fromarray(photo).convert("L")
        w, h = gray.size
        cut = int(0.8 * w)
        x_lo, x_hi = (0, cut - PATCH_SIDE) if split == "train" else (cut, w - PATCH_SIDE)
        for _ in range(PATCHES_PER_PHOTO[split]):
            x, y = int(rng.integers(x_lo, x_hi + 1)), int(rng.integers(0, h - PATCH_SIDE + 1))
            patch = gray.crop((x, y, x + PATCH_SIDE, y + PATCH_SIDE))
            images.append(patch.resize((image_size, image_size), Image.Resampling.BILINEAR))
            targets.append(label)
    return images, torch.tensor(targets, dtype=torch.long)


def prepare_fashion_mnist(root: str | os.PathLike[str], system_dir: str | os.PathLike[str] | None = None) -> Path:
    """Make sure ``<root>/FashionMNIST/raw/`` holds the four decompressed idx files.

    Each missing file is decompressed from ``<raw>/<name>.gz`` if present, else from
    ``<system_dir>/<name>.gz`` (default: the Debian package's folder), else copied from an
    uncompressed ``<system_dir>/<name>``.

    Args:
        root: the dataset root passed to :func:`get_dataset`.
        system_dir: a folder holding the original files (default :data:`SYSTEM_FASHION_MNIST_DIR`).

    Returns:
        The raw folder.

    Raises:
        FileNotFoundError: a file is nowhere to be found; the message says how to get it.

    Example:
        >>> import tempfile
        >>> try:
        ...     prepare_fashion_mnist(tempfile.mkdtemp(), system_dir=tempfile.mkdtemp())
        ... except FileNotFoundError as e:
        ...     print("dataset-fashion-mnist" in str(e))
        True
    """
    raw = Path(root) / "FashionMNIST" / "raw"
    source = Path(system_dir) if system_dir is not None else SYSTEM_FASHION_MNIST_DIR
    for name in FASHION_MNIST_FILES:
        dest = raw / name
        if dest.is_file():
            continue
        candidates = [raw / f"{name}.gz", source / f"{name}.gz", source / name]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {name!r} not found in {str(raw)!r} (as is or .gz) nor in {str(source)!r}. "
                "Install it offline with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), copy the "
                "four idx .gz files into the raw folder, or call get_dataset(..., download=True)."
            )
        raw.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".part")
        if found.suffix == ".gz":
            with gzip.open(found, "rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
        else:
            shutil.copyfile(found, tmp)
        os.replace(tmp, dest)
    return raw


def fashion_mnist(root: str | os.PathLike[str], split: str = "train", download: bool = False) -> LabeledDataset:
    """Fashion-MNIST (60k train / 10k test, 28x28 grayscale, 10 classes) through torchvision.

    Args:
        root: folder holding ``FashionMNIST/raw/`` (see :func:`prepare_fashion_mnist`).
        split: ``"train"`` or ``"test"``.
        download: let torchvision download the files when they are nowhere on disk.

    Returns:
        A :class:`LabeledDataset` of PIL ``"L"`` images.
    """
    if split not in ("train", "test"):
        raise ValueError(f"fashion_mnist has splits 'train' and 'test', got split={split!r}.")
    try:
        prepare_fashion_mnist(root)
    except FileNotFoundError:
        if not download:
            raise
    base = FashionMNIST(str(root), train=split == "train", download=download)
    return LabeledDataset(base, base.targets, base.classes)
