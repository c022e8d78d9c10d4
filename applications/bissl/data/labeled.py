"""One dataset type for every source, plus seeded validation splits and few-label subsets.

:class:`LabeledDataset` wraps any map-style dataset yielding ``(image, _)`` with labels known up
front (``targets``), so that splits can be drawn without decoding images, and so that a train and a
validation split of the same data can carry different transforms (``with_transform``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["LabeledDataset", "few_label_subset", "stratified_split", "train_val_split"]


class LabeledDataset(Dataset):
    """A view of ``base`` restricted to ``indices``, with known ``targets`` and its own transform.

    Args:
        base: map-style dataset whose item ``i`` is ``(image, anything)`` (the label is read from
            ``targets``, not from the item).
        targets: label of every item of ``base``: a sequence of ints (single-label) or a float
            tensor ``(len(base), num_classes)`` of 0/1 (multi-label, e.g. VOC07).
        classes: class names, ``len(classes) == num_classes``.
        transform: applied to the image (e.g. :func:`~applications.bissl.augment.eval_transform`).
        indices: positions of ``base`` in this view (default: all).

    Example:
        >>> base = [(f"img{i}", None) for i in range(4)]
        >>> ds = LabeledDataset(base, [0, 1, 0, 1], ["a", "b"]).subset([1, 3])
        >>> len(ds), ds[0], ds.targets.tolist()
        (2, ('img1', 1), [1, 1])
    """

    def __init__(
        self,
        base: Any,
        targets: Sequence[int] | torch.Tensor,
        classes: Sequence[str],
        transform: Callable[[Any], Any] | None = None,
        indices: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        self.base = base
        all_targets = torch.as_tensor(targets)
        if all_targets.ndim == 1:
            all_targets = all_targets.long()
        if all_targets.shape[0] != len(base):
            raise ValueError(f"targets has {all_targets.shape[0]} labels for a base of {len(base)} items.")
        self._all_targets = all_targets
        self.classes = list(classes)
        self.transform = transform
        self.indices = torch.arange(len(base)) if indices is None else torch.as_tensor(indices).long()

    @property
    def targets(self) -> torch.Tensor:
        """Labels of this view: ``(N,)`` int64, or ``(N, C)`` float for multi-label data."""
        return self._all_targets[self.indices]

    @property
    def num_classes(self) -> int:
        """Number of classes (output size of the linear head)."""
        return len(self.classes)

    @property
    def multilabel(self) -> bool:
        """Whether targets are 0/1 vectors (VOC07) rather than class indices."""
        return self._all_targets.ndim == 2

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, i: int) -> Any:
        """The untransformed image of item ``i``."""
        return self.base[int(self.indices[i])][0]

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        j = int(self.indices[i])
        img = self.base[j][0]
        if self.transform is not None:
            img = self.transform(img)
        target = self._all_targets[j]
        return img, (target if self.multilabel else int(target))

    def subset(self, positions: Sequence[int] | torch.Tensor) -> LabeledDataset:
        """The items at ``positions`` of this view (same base, same transform)."""
        positions = torch.as_tensor(positions).long()
        return LabeledDataset(self.base, self._all_targets, self.classes, self.transform, self.indices[positions])

    def with_transform(self, transform: Callable[[Any], Any] | None) -> LabeledDataset:
        """The same items with another transform (the base is shared, not copied)."""
        return LabeledDataset(self.base, self._all_targets, self.classes, transform, self.indices)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def stratified_split(targets: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions into (rest, picked) with ``fraction`` of every class picked (seeded).

    Multi-label targets ``(N, C)`` are split uniformly at random instead (no stratification).

    Example:
        >>> rest, picked = stratified_split(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 0.5, seed=0)
        >>> sorted(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])[picked].tolist())
        [0, 0, 1, 1]
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction!r}.")
    g = _generator(seed)
    n = targets.shape[0]
    if targets.ndim == 2:
        perm = torch.randperm(n, generator=g)
        k = int(round(fraction * n))
        return perm[k:].sort().values, perm[:k].sort().values
    picked = []
    for c in torch.unique(targets):
        pos = torch.nonzero(targets == c).flatten()
        pos = pos[torch.randperm(len(pos), generator=g)]
        k = int(round(fraction * len(pos)))
        picked.append(pos[:k])
    picked_t = torch.cat(picked).sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[picked_t] = False
    return torch.nonzero(mask).flatten(), picked_t


def train_val_split(
    dataset: LabeledDataset, val_fraction: float = 0.1, seed: int = 0
) -> tuple[LabeledDataset, LabeledDataset]:
    """Seeded stratified split of a training set into (train, validation) for HPO.

    Both parts keep ``dataset.transform``; give the validation part its own with
    ``val.with_transform(eval_transform(...))``.

    Args:
        dataset: the training data.
        val_fraction: share of every class held out, in (0, 1).
        seed: split seed (the same seed gives the same split).

    Returns:
        ``(train, val)``, disjoint, covering ``dataset``.

    Example:
        >>> ds = LabeledDataset([(i, None) for i in range(10)], [0] * 5 + [1] * 5, ["a", "b"])
        >>> tr, va = train_val_split(ds, 0.2, seed=1)
        >>> len(tr), len(va), sorted(va.targets.tolist())
        (8, 2, [0, 1])
    """
    rest, picked = stratified_split(dataset.targets, val_fraction, seed)
    return dataset.subset(rest), dataset.subset(picked)


def few_label_subset(
    dataset: LabeledDataset,
    *,
    per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> LabeledDataset:
    """Seeded subset with ``per_class`` labelled items of every class, or ``fraction`` of each class.

    Args:
        dataset: single-label data.
        per_class: items kept per class (all of a class when it has fewer).
        fraction: share of every class kept, in (0, 1); give exactly one of the two.
        seed: subset seed.

    Returns:
        The subset, in the order of ``dataset``.

    Example:
        >>> ds = LabeledDataset([(i, None) for i in range(9)], [0, 1, 2] * 3, ["a", "b", "c"])
        >>> few_label_subset(ds, per_class=2, seed=0).targets.bincount().tolist()
        [2, 2, 2]
    """
    if (per_class is None) == (fraction is None):
        raise ValueError(
            f"give exactly one of per_class={per_class!r} and fraction={fraction!r} "
            "(e.g. per_class=10 for ten labels per class)."
        )
    if dataset.multilabel:
        raise ValueError("few_label_subset needs single-label data; multi-label targets have no classes to count.")
    if fraction is not None:
        return dataset.subset(stratified_split(dataset.targets, fraction, seed)[1])
    if not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a positive int, got {per_class!r}.")
    g = _generator(seed)
    targets = dataset.targets
    keep = []
    for c in torch.unique(targets):
        pos = torch.nonzero(targets == c).flatten()
        keep.append(pos[torch.randperm(len(pos), generator=g)[:per_class]])
    return dataset.subset(torch.cat(keep).sort().values)
