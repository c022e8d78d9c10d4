"""The paper's twelve downstream datasets, read from disk through torchvision (never downloaded here).

Split conventions (``split="train"`` is always all labelled training data, so that a seeded
validation split can be drawn from it with :func:`~applications.bissl.data.train_val_split`):

==========  =========================================  ==================================
name        ``"train"``                                ``"test"``
==========  =========================================  ==================================
food        Food101 ``train``                          ``test``
cars        StanfordCars ``train``                     ``test``
dtd         DTD ``train`` + ``val`` (partition 1)      ``test``
pets        OxfordIIITPet ``trainval``                 ``test``
flowers     Flowers102 ``train`` + ``val``             ``test``
aircraft    FGVCAircraft ``trainval`` (variants)       ``test``
cifar10/100 CIFAR ``train=True``                       ``train=False``
caltech101  seeded stratified 80% (no official split)  the other 20%
sun397      seeded stratified 80% (no official split)  the other 20%
voc07       VOC2007 ``trainval``, multi-label          ``test``
cub200      CUB_200_2011 ``is_training_image == 1``    the others
==========  =========================================  ==================================

The pretext set ``imagenet`` is read from an image folder (:func:`imagenet`).
Official ``"val"`` splits (dtd, flowers, aircraft) and ``"trainval"`` are also accepted by name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision.datasets as tvd
from PIL import Image
from torch.utils.data import ConcatDataset

from .labeled import LabeledDataset, stratified_split

__all__ = ["PAPER_BUILDERS", "VOC_CLASSES", "cub200", "image_folder", "imagenet"]

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip


def _labels_of(ds: object) -> list[int]:
    """Labels of a torchvision dataset without decoding images."""
    for attr in ("targets", "_labels", "y"):
        if hasattr(ds, attr):
            return [int(t) for t in getattr(ds, attr)]
    if hasattr(ds, "_samples"):  # StanfordCars: list of (path, label)
        return [int(t) for _, t in ds._samples]
    return [int(ds[i][1]) for i in range(len(ds))]  # generic fallback: reads every item


def _wrap(parts: list, classes: list[str]) -> LabeledDataset:
    labels = [t for p in parts for t in _labels_of(p)]
    base = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    return LabeledDataset(base, labels, classes)


def _check_split(name: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"dataset {name!r} has splits {allowed}, got split={split!r}.")


def _official(cls: Callable, name: str, mapping: dict[str, list[str]], **kw: object) -> Callable:
    def build(root: str, split: str, download: bool) -> LabeledDataset:
        _check_split(name, split, tuple(mapping))
        parts = [cls(root, split=s, download=download, **kw) for s in mapping[split]]
        classes = getattr(parts[0], "classes", None) or [str(i) for i in range(max(_labels_of(parts[0])) + 1)]
        return _wrap(parts, list(classes))

    return build


def _cifar(cls: Callable, name: str) -> Callable:
    def build(root: str, split: str, download: bool) -> LabeledDataset:
        _check_split(name, split, ("train", "test"))
        ds = cls(root, train=split == "train", download=download)
        return _wrap([ds], list(ds.classes))

    return build


def _seeded_split(cls: Callable, name: str, classes_attr: str) -> Callable:
    def build(root: str, split: str, download: bool) -> LabeledDataset:
        _check_split(name, split, ("train", "test"))
        ds = _wrap([cls(root, download=download)], [])
        ds.classes = list(getattr(ds.base, classes_attr))
        train, test = stratified_split(ds.targets, 0.2, seed=0)
        return ds.subset(train if split == "train" else test)

    return build


class _VOCImages:
    """VOC images only (labels come from parsed annotations)."""

    def __init__(self, voc: tvd.VOCDetection) -> None:
        self.voc = voc

    def __len__(self) -> int:
        return len(self.voc.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.open(self.voc.images[i]).convert("RGB"), -1


def _voc07(root: str, split: str, download: bool) -> LabeledDataset:
    from xml.etree.ElementTree import parse

    _check_split("voc07", split, ("train", "trainval", "val", "test"))
    image_set = "trainval" if split == "train" else split
    voc = tvd.VOCDetection(root, year="2007", image_set=image_set, download=download)
    targets = torch.zeros(len(voc.images), len(VOC_CLASSES))
    for i, ann_path in enumerate(voc.annotations):
        objects = voc.parse_voc_xml(parse(ann_path).getroot())["annotation"].get("object", [])
        for obj in objects if isinstance(objects, list) else [objects]:
            targets[i, VOC_CLASSES.index(obj["name"])] = 1.0
    return LabeledDataset(_VOCImages(voc), targets, VOC_CLASSES)


class _FileImages:
    """Images read from a list of paths, converted to RGB."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB"), -1


def cub200(root: str | os.PathLike[str], split: str = "train", download: bool = False) -> LabeledDataset:
    """CUB-200-2011 from its official folder: ``<root>/CUB_200_2011/`` with ``images/<class>/*.jpg``,
    ``images.txt``, ``image_class_labels.txt`` (1-based labels), ``train_test_split.txt`` and
    ``classes.txt``.

    Args:
        root: folder that contains ``CUB_200_2011``.
        split: ``"train"`` or ``"test"`` (the official split).
        download: unsupported (torchvision has no CUB loader); must be False.

    Returns:
        A :class:`LabeledDataset` of RGB PIL images, 200 classes.
    """
    _check_split("cub200", split, ("train", "test"))
    if download:
        raise ValueError("cub200 cannot be downloaded; place CUB_200_2011 under --data-root (download=False).")
    base = Path(root) / "CUB_200_2011"
    if not (base / "images.txt").is_file():
        raise FileNotFoundError(f"CUB-200-2011 not found: expected {str(base / 'images.txt')!r}.")

    def table(name: str) -> dict[int, str]:
        rows = (line.split(maxsplit=1) for line in (base / name).read_text().splitlines() if line.strip())
        return {int(k): v.strip() for k, v in rows}

    paths, labels, is_train = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    classes = [v for _, v in sorted(table("classes.txt").items())]
    keep = sorted(i for i in paths if (is_train[i] == "1") == (split == "train"))
    images = _FileImages([base / "images" / paths[i] for i in keep])
    return LabeledDataset(images, [int(labels[i]) - 1 for i in keep], classes)


def image_folder(root: str | os.PathLike[str], split: str = "train", download: bool = False) -> LabeledDataset:
    """A generic image-folder dataset: ``<root>/<split>/<class name>/<image>``.

    Args:
        root: folder holding one sub-folder per split.
        split: sub-folder name (``"train"``, ``"test"``, ...).
        download: must be False.

    Returns:
        A :class:`LabeledDataset` (classes sorted by folder name, as torchvision's ImageFolder).
    """
    if download:
        raise ValueError("an image folder cannot be downloaded; pass download=False.")
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder split not found: {str(folder)!r} (expected <root>/<split>/<class>/...).")
    ds = tvd.ImageFolder(str(folder))
    return LabeledDataset(ds, ds.targets, ds.classes)


def imagenet(root: str | os.PathLike[str], split: str = "train", download: bool = False) -> LabeledDataset:
    """ImageNet-1k (the pretext data of the paper) in the usual folder layout:
    ``<root>/imagenet/{train,val}/<wnid>/<image>.JPEG``; ``split="test"`` reads ``val``.

    Args:
        root: folder that contains ``imagenet``.
        split: ``"train"``, ``"val"`` or ``"test"`` (= ``"val"``).
        download: must be False (ImageNet cannot be downloaded automatically).

    Returns:
        A :class:`LabeledDataset` (classes are the sorted folder names).
    """
    _check_split("imagenet", split, ("train", "val", "test"))
    return image_folder(Path(root) / "imagenet", "val" if split == "test" else split, download)


#: name -> builder(root, split, download) for the paper's downstream datasets.
PAPER_BUILDERS: dict[str, Callable[[str, str, bool], LabeledDataset]] = {
    "food": _official(tvd.Food101, "food", {"train": ["train"], "test": ["test"]}),
    "cars": _official(tvd.StanfordCars, "cars", {"train": ["train"], "test": ["test"]}),
    "dtd": _official(tvd.DTD, "dtd", {"train": ["train", "val"], "trainval": ["train", "val"], "val": ["val"], "test": ["test"]}),
    "pets": _official(tvd.OxfordIIITPet, "pets", {"train": ["trainval"], "trainval": ["trainval"], "test": ["test"]}),
    "flowers": _official(tvd.Flowers102, "flowers", {"train": ["train", "val"], "trainval": ["train", "val"], "val": ["val"], "test": ["test"]}),
    "aircraft": _official(tvd.FGVCAircraft, "aircraft", {"train": ["trainval"], "trainval": ["trainval"], "val": ["val"], "test": ["test"]}),
    "cifar10": _cifar(tvd.CIFAR10, "cifar10"),
    "cifar100": _cifar(tvd.CIFAR100, "cifar100"),
    "caltech101": _seeded_split(tvd.Caltech101, "caltech101", "categories"),
    "sun397": _seeded_split(tvd.SUN397, "sun397", "classes"),
    "voc07": _voc07,
    "cub200": cub200,
}  # fmt: skip
