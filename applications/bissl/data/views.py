"""Unlabelled two-view dataset for pretext training, with per-item seeded augmentation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["TwoViewDataset"]


class TwoViewDataset(Dataset):
    r"""The images of ``dataset`` (labels dropped), each returned as two augmented views.

    The augmentation of item :math:`i` in epoch :math:`e` runs under its own seed
    :math:`s = \mathrm{seed} \cdot 10^9 + e \cdot 10^7 + i` (torch's global generator is forked and
    restored around it), so the views do not depend on the number of DataLoader workers, on the
    batch order, or on where a run was interrupted and resumed.

    Args:
        dataset: any map-style dataset with ``.image(i)`` (a
            :class:`~applications.bissl.data.LabeledDataset`) or items ``(image, label)``.
        augment: maps an image to ``(view1, view2)``, e.g.
            :class:`~applications.bissl.augment.TwoViewAugment`.
        seed: base seed of the augmentations.

    Example:
        >>> ds = TwoViewDataset([(torch.zeros(1), 0)], lambda x: (x + torch.rand(1), x), seed=0)
        >>> a, b = ds[0][0], ds[0][0]
        >>> bool(torch.equal(a, b))  # same item, same epoch: same views
        True
    """

    def __init__(
        self, dataset: Any, augment: Callable[[Any], tuple[torch.Tensor, torch.Tensor]], seed: int = 0
    ) -> None:
        self.dataset = dataset
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation seeds of ``epoch`` (call before iterating an epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.dataset.image(i) if hasattr(self.dataset, "image") else self.dataset[i][0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_000_000 + self.epoch * 10_000_000 + int(i))
            return self.augment(image)
