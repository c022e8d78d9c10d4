"""The data of a UMM run, from the BiSSL application's dataset registry and augmentations.

Three disjoint image sets (labels used only for evaluation):

* ``pretrain``: the first ``n_pretrain`` images of the train split (of a seeded permutation of it
  with ``shuffle_subsets``); SSL pretraining, the lower
  level of fine-tuning, and (with labels) the training set of the linear probe and kNN.
* ``heldout``: the next ``n_heldout`` train-split images, never seen in pretraining; their views
  feed the upper level (no labels).
* ``test``: the first ``n_probe_test`` images of ``cfg.test_split``; probe/kNN accuracy and class-partition
  coding-rate reduction.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from applications.bissl.augment import TwoViewAugment, eval_transform
from applications.bissl.data import LabeledDataset, TwoViewDataset, get_dataset

from .config import UMMConfig

__all__ = ["Splits", "ViewBank", "eval_tensors", "load_splits", "view_batches"]


class Splits:
    """The ``pretrain``, ``heldout`` and ``test`` :class:`~applications.bissl.data.LabeledDataset` s of a run."""

    def __init__(self, pretrain: LabeledDataset, heldout: LabeledDataset, test: LabeledDataset) -> None:
        self.pretrain, self.heldout, self.test = pretrain, heldout, test


def load_splits(cfg: UMMConfig) -> Splits:
    """Load the dataset and cut the three disjoint sets (see the module doc).

    Raises:
        ValueError: the train split has fewer than ``n_pretrain + n_heldout`` images.

    Example:
        >>> from applications.umm.config import get_preset
        >>> s = load_splits(get_preset("tiny"))
        >>> len(s.pretrain), len(s.heldout), len(s.test)
        (64, 32, 64)
    """
    train = get_dataset(cfg.dataset, cfg.data_root, "train", image_size=cfg.image_size)
    test = get_dataset(cfg.dataset, cfg.data_root, cfg.test_split, image_size=cfg.image_size)
    need = cfg.n_pretrain + cfg.n_heldout
    if len(train) < need:
        raise ValueError(
            f"`n_pretrain` + `n_heldout` = {need} exceeds the {len(train)} train images of {cfg.dataset!r}; lower them."
        )
    n_test = min(cfg.n_probe_test, len(test))
    if cfg.shuffle_subsets:
        g = torch.Generator().manual_seed(cfg.seed)
        order, test_order = torch.randperm(len(train), generator=g), torch.randperm(len(test), generator=g)
    else:
        order, test_order = torch.arange(len(train)), torch.arange(len(test))
    return Splits(
        train.subset(order[: cfg.n_pretrain]),
        train.subset(order[cfg.n_pretrain : need]),
        test.subset(test_order[:n_test]),
    )


def _stack(ds: Dataset, batch: int, workers: int) -> list[Any]:
    loader = DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers)
    return list(loader)


def eval_tensors(images: LabeledDataset, cfg: UMMConfig) -> tuple[Tensor, Tensor]:
    """All images under the test-time transform, stacked: ``(x (N, C, S, S), y (N,))``."""
    parts = _stack(images.with_transform(eval_transform(cfg.image_size, cfg.in_channels)), 512, cfg.num_workers)
    return torch.cat([p[0] for p in parts]), torch.cat([torch.as_tensor(p[1]) for p in parts])


class ViewBank:
    """A fixed bank of ``size`` augmented view pairs per image (``cfg.view_bank``), built once.

    On a CPU the per-image PIL augmentation costs more than a small ResNet's step; the bank
    computes ``size`` epochs' worth of BiSSL views once and epoch ``e`` reuses slot ``e % size``.
    A finite bank is a smaller augmentation distribution (it makes memorisation easier, which
    the diagnostic is meant to show); ``size = 0`` (the default) draws fresh views every epoch.
    """

    def __init__(self, images: LabeledDataset, cfg: UMMConfig, size: int, seed: int) -> None:
        ds = TwoViewDataset(images, TwoViewAugment(cfg.image_size, cfg.in_channels), seed=seed)
        slots = []
        for e in range(size):
            ds.set_epoch(e)
            parts = _stack(ds, 256, cfg.num_workers)
            slots.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
        self.slots = slots

    def __len__(self) -> int:
        return self.slots[0][0].shape[0]

    def epoch(self, epoch: int) -> tuple[Tensor, Tensor]:
        """All view pairs of ``epoch``: two tensors ``(N, C, S, S)``."""
        return self.slots[epoch % len(self.slots)]


_BANKS: dict[tuple, ViewBank] = {}


def _bank(images: LabeledDataset, cfg: UMMConfig, seed: int) -> ViewBank:
    key = (id(images.base), tuple(images.indices.tolist()[:4]), len(images), cfg.view_bank, cfg.image_size, seed)
    if key not in _BANKS:
        if len(_BANKS) >= 4:
            _BANKS.pop(next(iter(_BANKS)))
        _BANKS[key] = ViewBank(images, cfg, cfg.view_bank, seed)
    return _BANKS[key]


def view_batches(
    images: LabeledDataset,
    cfg: UMMConfig,
    *,
    batch: int,
    epoch: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    view_seed: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Two-view batches ``(x1, x2)`` of one epoch (BiSSL's augmentations, seeded per image and epoch).

    The order is a permutation drawn from ``seed + epoch``; the last incomplete batch is dropped;
    under DDP rank ``r`` takes its ``1/world`` share of every global batch. With
    ``cfg.view_bank > 0`` the views come from a :class:`ViewBank`. ``view_seed`` (default
    ``seed``) seeds the augmentations, ``seed`` the order.
    """
    view_seed = seed if view_seed is None else view_seed
    ds = TwoViewDataset(images, TwoViewAugment(cfg.image_size, cfg.in_channels), seed=view_seed)
    ds.set_epoch(epoch)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    per = batch // world
    order = [i for k in range(len(perm) // batch) for i in perm[k * batch + rank * per : k * batch + (rank + 1) * per]]
    if cfg.view_bank:
        v1, v2 = _bank(images, cfg, view_seed).epoch(epoch)
        for k in range(0, len(order), per):
            idx = torch.tensor(order[k : k + per])
            yield v1[idx], v2[idx]
        return
    loader = DataLoader(torch.utils.data.Subset(ds, order), batch_size=per, num_workers=cfg.num_workers)
    for x1, x2 in loader:
        yield x1, x2
