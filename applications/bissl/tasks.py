r"""Downstream tasks: a data set name plus optional label scarcity and a pixel shift.

A task spec is ``"<dataset>[_inv][@<k>]"``:

* ``<dataset>`` - any name :func:`applications.bissl.data.get_dataset` knows (``digits``,
  ``fashion_mnist``, ``cifar10``, ``pets``, ...).
* ``_inv`` - photometric inversion :math:`x \mapsto 1 - x` of every image (train and test), a
  domain shift the pretext augmentations never produce (colour jitter keeps the polarity of
  the image), so the pretrained features must adapt to it.
* ``@<k>`` - keep only ``k`` labelled training images per class, chosen with a fixed seed
  (few-label regime); the test split is untouched.

Example:
    >>> parse_task("fashion_mnist_inv@20")
    TaskSpec(dataset='fashion_mnist', invert=True, per_class=20)
    >>> parse_task("digits")
    TaskSpec(dataset='digits', invert=False, per_class=None)
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import torch
from torchvision.transforms import v2

from .data import LabeledDataset, few_label_subset, get_dataset, num_classes

__all__ = ["TaskSpec", "parse_task", "build_task", "task_classes"]

_SPEC = re.compile(r"^(?P<name>[a-z0-9_]+?)(?P<inv>_inv)?(?:@(?P<k>\d+))?$")
SUBSET_SEED = 1234


class TaskSpec(NamedTuple):
    """A parsed task: base data set, inversion flag, labels per class (``None`` = all)."""

    dataset: str
    invert: bool
    per_class: int | None


def parse_task(spec: str) -> TaskSpec:
    """Parse ``"<dataset>[_inv][@<k>]"`` (see the module docstring)."""
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(
            f"Bad task spec {spec!r}: expected '<dataset>[_inv][@<labels per class>]', "
            "e.g. 'digits', 'fashion_mnist@20' or 'fashion_mnist_inv@20'."
        )
    k = m.group("k")
    if k is not None and int(k) < 1:
        raise ValueError(f"Bad task spec {spec!r}: labels per class must be >= 1.")
    return TaskSpec(m.group("name"), m.group("inv") is not None, int(k) if k else None)


def task_classes(spec: str, root: str | None = None) -> int:
    """Number of classes of a task (``imagefolder``: the class folders of ``<root>/train``)."""
    t = parse_task(spec)
    if t.dataset == "imagefolder":
        if root is None:
            raise ValueError("task 'imagefolder' needs the data root (--data-root DIR with DIR/train/<class>/...).")
        return len(get_dataset("imagefolder", root, "train").classes)
    return num_classes(t.dataset)


def with_inversion(spec: str, transform: Callable[[Any], Any] | None) -> Callable[[Any], Any] | None:
    """``transform`` preceded by the task's pixel inversion when the spec asks for it."""
    if not parse_task(spec).invert:
        return transform
    return (
        v2.Compose([v2.ToImage(), v2.RandomInvert(p=1.0), transform])
        if transform is not None
        else v2.RandomInvert(p=1.0)
    )


def build_task(
    spec: str,
    root: str,
    split: str,
    transform: Callable[[Any], Any] | None,
    *,
    image_size: int = 32,
    max_samples: int | None = None,
) -> LabeledDataset:
    """The data set of a task for ``split`` (``"train"`` or ``"test"``) with ``transform`` applied.

    Args:
        spec: task spec (module docstring).
        root: data root passed to ``get_dataset`` (``--data-root``).
        split: ``"train"`` or ``"test"``.
        transform: image transform (e.g. ``train_transform(...)``); inversion runs before it.
        image_size: image side for ``digits`` (upscaled from 8x8).
        max_samples: keep at most this many samples (a seeded random subset; for tests).

    Returns:
        A :class:`~applications.bissl.data.LabeledDataset` of ``(image, label)``; give it another
        transform with ``.with_transform(with_inversion(spec, t))``.
    """
    t = parse_task(spec)
    ds = get_dataset(t.dataset, root, split, with_inversion(spec, transform), image_size=image_size)
    if t.per_class is not None and split == "train":
        ds = few_label_subset(ds, per_class=t.per_class, seed=SUBSET_SEED)
    if max_samples is not None and len(ds) > max_samples:
        g = torch.Generator().manual_seed(SUBSET_SEED)
        ds = ds.subset(torch.randperm(len(ds), generator=g)[:max_samples].sort().values)
    return ds
