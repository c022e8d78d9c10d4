"""``--d-dset imagefolder --data-root DIR``: any ImageFolder tree (train/ and test/) as a downstream task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from applications.bissl.augment import train_transform
from applications.bissl.cli import build_parser, config_from_args
from applications.bissl.splits import task_split
from applications.bissl.tasks import build_task, task_classes


def _tree(root, mode: str, per_class: int = 6):
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c, name in enumerate(("cat", "dog", "owl")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                shape = (12, 12, 3) if mode == "RGB" else (12, 12)
                arr = (rng.integers(0, 80, size=shape) + 60 * c).astype(np.uint8)
                Image.fromarray(arr, mode=mode).save(d / f"{i}.png")
    return root


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_imagefolder_task_from_disk(tmp_path, mode):
    root = str(_tree(tmp_path / "data", mode))
    assert task_classes("imagefolder", root) == 3
    for channels in (1, 3):  # grayscale or colour files, either model
        ds = build_task("imagefolder", root, "train", train_transform(8, channels), image_size=8)
        x, y = ds[0]
        assert x.shape == (channels, 8, 8) and x.dtype == torch.float32 and y == 0
        assert len(ds) == 18 and ds.targets.bincount().tolist() == [6, 6, 6]
    assert len(build_task("imagefolder", root, "test", None)) == 6


def test_imagefolder_flags_reach_the_stage_config_and_split(tmp_path):
    root = str(_tree(tmp_path / "data", "L"))
    args = build_parser().parse_args(
        ["bissl", "--preset", "tiny", "--d-dset", "imagefolder", "--data-root", root, "--out-dir", str(tmp_path)]
    )
    cfg = config_from_args(args)
    assert cfg.bissl.downstream == "imagefolder" and cfg.data_root == root
    train, val = task_split(cfg, "imagefolder", None)
    assert len(train) + len(val) == 18 and not set(train.indices.tolist()) & set(val.indices.tolist())


def test_imagefolder_without_a_tree_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected <root>/<split>/<class>"):
        task_classes("imagefolder", str(tmp_path))


def test_bissl_stage_runs_on_an_imagefolder_task(tmp_path):
    import dataclasses

    import applications.bissl.stage_bissl as stage
    from applications.bissl.config import get_preset
    from applications.bissl.pretrain import build_pretrain_model

    root = str(_tree(tmp_path / "data", "RGB"))
    cfg = get_preset("tiny")
    cfg.out_dir, cfg.data_root = str(tmp_path / "out"), root
    cfg.bissl = dataclasses.replace(
        cfg.bissl, downstream="imagefolder", alternations=1, lower_steps=1, upper_steps=1, downstream_batch=8
    )
    torch.save(build_pretrain_model(cfg).checkpoint_state(), tmp_path / "pre.pt")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = torch.load(stage.run_bissl(cfg, str(tmp_path / "pre.pt")), weights_only=True)
    finally:
        torch.set_num_threads(n)
    assert any(v.shape[:1] == (3,) for v in out["head"].values())  # a 3-class head for the 3 folders
