r"""One train/val split of a task's labelled training images, shared by every stage.

The BiSSL stage's upper level (and its head warm-up) trains on ``train`` only; fine-tuning's
hyper-parameter search trains on ``train`` and selects on ``val``; the final seeded runs train on
both. The split is a seeded stratified split (:func:`~applications.bissl.data.train_val_split`
with ``cfg.finetune.val_fraction`` and ``cfg.finetune.seed``), drawn once and saved beside the
outputs as ``<run_dir>/splits/<task>.json``; a later stage that would draw another split (other
fraction, seed, cap or data) refuses to run instead of silently using it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from .config import PipelineConfig
from .data import LabeledDataset, train_val_split
from .tasks import build_task

__all__ = ["split_path", "task_split"]


def split_path(cfg: PipelineConfig, task: str) -> str:
    """``<run_dir>/splits/<task>.json``."""
    return os.path.join(cfg.run_dir, "splits", task.replace("@", "_at") + ".json")


def task_split(
    cfg: PipelineConfig, task: str, transform: Callable[[Any], Any] | None, *, save: bool = True
) -> tuple[LabeledDataset, LabeledDataset]:
    """``(train, val)`` parts of ``task``'s labelled training images, with ``transform``.

    Args:
        cfg: uses ``data_root``, ``model.image_size``, ``max_train_samples`` and
            ``finetune.val_fraction`` / ``finetune.seed``.
        task: task spec (:mod:`applications.bissl.tasks`).
        transform: image transform of both parts (give ``val`` another with ``with_transform``).
        save: write the indices to :func:`split_path` (or check them against the saved file).

    Returns:
        The two disjoint parts; their ``indices`` are positions in the task's base data set.

    Raises:
        ValueError: a split saved earlier for this run differs from the one drawn now.
    """
    ft = cfg.finetune
    full = build_task(
        task,
        cfg.data_root,
        "train",
        transform,
        image_size=cfg.model.image_size,
        max_samples=cfg.max_train_samples,
    )
    train, val = train_val_split(full, ft.val_fraction, ft.seed)
    record = {
        "task": task,
        "val_fraction": ft.val_fraction,
        "seed": ft.seed,
        "train": train.indices.tolist(),
        "val": val.indices.tolist(),
    }
    path = split_path(cfg, task)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != record:
            raise ValueError(
                f"the train/val split saved in {path!r} differs from the one this run draws (other "
                "--max-train-samples, val fraction, seed or data); use the same settings, or delete the "
                "file / pass another --out-dir to start a new run."
            )
    elif save:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    return train, val
