"""Datasets of BiSSL: the paper's downstream sets (torchvision, from disk) and offline sets.

:func:`get_dataset` returns a :class:`LabeledDataset` for any registered name:

* the paper's twelve downstream sets (:mod:`.paper_sets`): ``food, cars, dtd, pets, flowers,
  aircraft, cifar10, cifar100, caltech101, sun397, voc07`` (multi-label), ``cub200``;
* offline sets (:mod:`.offline`): ``digits`` (scikit-learn, no files), ``photo_patches``
  (patches of scikit-learn's two sample photographs, no files) and ``fashion_mnist`` (local idx
  files or the Debian package);
* ``imagenet``: the paper's pretext data, ``<root>/imagenet/{train,val}/<wnid>/...``;
* ``imagefolder``: any ``<root>/<split>/<class>/<image>`` tree.

Nothing is downloaded unless ``download=True`` is passed (never in tests or CI).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .labeled import LabeledDataset, few_label_subset, stratified_split, train_val_split
from .offline import digits, fashion_mnist, photo_patches, prepare_fashion_mnist
from .paper_sets import PAPER_BUILDERS, VOC_CLASSES, cub200, image_folder, imagenet
from .views import TwoViewDataset

__all__ = [
    "DATASETS",
    "PAPER_DATASETS",
    "VOC_CLASSES",
    "DatasetInfo",
    "LabeledDataset",
    "TwoViewDataset",
    "cub200",
    "dataset_info",
    "digits",
    "fashion_mnist",
    "few_label_subset",
    "get_dataset",
    "image_folder",
    "imagenet",
    "num_classes",
    "photo_patches",
    "prepare_fashion_mnist",
    "stratified_split",
    "train_val_split",
]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a registered dataset.

    Attributes:
        name: registry name.
        num_classes: classes (labels for multi-label); None when it depends on the files
            (``imagefolder``: use ``len(dataset.classes)``).
        channels: image channels after loading (1 grayscale, 3 RGB).
        multilabel: targets are 0/1 vectors (VOC07: evaluated by 11-point mAP).
    """

    name: str
    num_classes: int | None
    channels: int
    multilabel: bool = False


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo("food", 101, 3),
        DatasetInfo("cars", 196, 3),
        DatasetInfo("dtd", 47, 3),
        DatasetInfo("pets", 37, 3),
        DatasetInfo("flowers", 102, 3),
        DatasetInfo("aircraft", 100, 3),
        DatasetInfo("cifar10", 10, 3),
        DatasetInfo("cifar100", 100, 3),
        DatasetInfo("caltech101", 101, 3),
        DatasetInfo("sun397", 397, 3),
        DatasetInfo("voc07", 20, 3, multilabel=True),
        DatasetInfo("cub200", 200, 3),
        DatasetInfo("digits", 10, 1),
        DatasetInfo("fashion_mnist", 10, 1),
        DatasetInfo("photo_patches", 2, 1),
        DatasetInfo("imagenet", 1000, 3),
        DatasetInfo("imagefolder", None, 3),
    ]
}

#: The paper's downstream datasets, in its table order.
PAPER_DATASETS = tuple(PAPER_BUILDERS)

_ALIASES = {
    "food101": "food", "stanfordcars": "cars", "oxfordiiitpet": "pets", "flowers102": "flowers",
    "fgvcaircraft": "aircraft", "sun": "sun397", "voc2007": "voc07", "cub": "cub200",
    "fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist",
}  # fmt: skip


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}.")
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key.replace("_", ""), _ALIASES.get(key, key))
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}.")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (aliases such as ``"Food101"`` accepted).

    Example:
        >>> dataset_info("voc2007")
        DatasetInfo(name='voc07', num_classes=20, channels=3, multilabel=True)
    """
    return DATASETS[_canonical(name)]


def num_classes(name: str) -> int:
    """Number of classes of a registered dataset.

    Example:
        >>> num_classes("cifar100"), num_classes("digits")
        (100, 10)
    """
    info = dataset_info(name)
    if info.num_classes is None:
        raise ValueError(f"{name!r} has no fixed class count; use len(get_dataset(...).classes).")
    return info.num_classes


def get_dataset(
    name: str,
    root: str | os.PathLike[str] = "data",
    split: str = "train",
    transform: Callable[[Any], Any] | None = None,
    download: bool = False,
    *,
    image_size: int = 32,
) -> LabeledDataset:
    """Load a registered dataset split as a :class:`LabeledDataset` of PIL images.

    Args:
        name: a name of :data:`DATASETS` (or an alias: ``Food101``, ``FashionMNIST``, ...).
        root: the data root (``--data-root``); torchvision's folder layout below it.
        split: ``"train"`` or ``"test"`` (some sets also ``"val"``/``"trainval"``, see
            :mod:`.paper_sets`).
        transform: applied to each image (e.g. :func:`~applications.bissl.augment.eval_transform`).
        download: allow torchvision to download (never in tests or CI).
        image_size: side of the images of ``digits`` and ``photo_patches`` (ignored otherwise).

    Returns:
        The dataset; ``.targets``, ``.classes``, ``.num_classes`` and ``.multilabel`` describe it.

    Example:
        >>> ds = get_dataset("digits", split="test", image_size=16)
        >>> len(ds), ds.num_classes
        (359, 10)
    """
    key = _canonical(name)
    root = str(root)
    if key == "digits":
        ds = digits(split, image_size=image_size)
    elif key == "photo_patches":
        ds = photo_patches(split, image_size=image_size)
    elif key == "fashion_mnist":
        ds = fashion_mnist(root, split, download=download)
    elif key == "imagefolder":
        ds = image_folder(root, split, download=download)
    elif key == "imagenet":
        ds = imagenet(root, split, download=download)
    else:
        ds = PAPER_BUILDERS[key](root, split, download)
    return ds.with_transform(transform)
