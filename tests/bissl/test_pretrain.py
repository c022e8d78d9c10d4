"""Pretraining stage: a short run, kill-and-resume reproducing an uninterrupted run bitwise, DDP, CLI."""

from __future__ import annotations

import csv
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hypergrad
from applications.bissl.cli import build_parser, config_from_args
from applications.bissl.config import PipelineConfig, get_preset
from applications.bissl.models import Projector, build_backbone
from applications.bissl.pretrain import build_pretrain_model, epoch_batches, pretrain
from tests.bissl.conftest import run_gloo

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--preset", "tiny", "--max-samples", "64", "--batch-size", "16", "--epochs", "2"]


def _cfg(tmp_path: Path, kind: str = "simclr") -> PipelineConfig:
    """The ``tiny`` preset on 64 digits, batch 16, 2 epochs: 8 steps (matches ``SMALL``)."""
    cfg = get_preset("tiny")
    cfg.pretrain = dataclasses.replace(cfg.pretrain, pretext_type=kind, max_samples=64, batch_size=16, epochs=2)
    cfg.out_dir = str(tmp_path)
    return cfg


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_short_simclr_run_writes_a_loadable_checkpoint_and_metrics(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    torch.manual_seed(cfg.seed)
    init = build_pretrain_model(cfg).backbone.state_dict()
    path = pretrain(cfg, log_every=1, progress=False, tensorboard=True)
    assert path == os.path.join(cfg.run_dir, "pretrain", "pretrained.pt")
    state = torch.load(path, weights_only=True)
    assert state["pretext_type"] == "simclr" and state["steps"] == 8 and state["predictor"] is None
    m = cfg.model
    backbone, dim = build_backbone(m.arch, small_stem=m.small_stem, width=m.width, in_channels=m.in_channels)
    backbone.load_state_dict(state["backbone"])  # what the BiSSL stage does
    Projector(dim, hidden=m.proj_dims, out=m.proj_dims).load_state_dict(state["projector"])
    assert any(not torch.equal(init[k], v) for k, v in state["backbone"].items() if v.is_floating_point())
    rows = _rows(Path(cfg.run_dir) / "pretrain" / "logs" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert all(float(r["loss"]) > 0 for r in rows)
    lrs = [float(r["lr"]) for r in rows]  # no warm-up in `tiny`: cosine from 0.5 down to 0.5e-3 at step 8
    assert lrs[-1] == pytest.approx(0.5e-3) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert (Path(cfg.run_dir) / "pretrain" / "checkpoint.pt").is_file()
    assert list((Path(cfg.run_dir) / "pretrain" / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    jsonl = (Path(cfg.run_dir) / "pretrain" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(jsonl) == 8 and '"loss"' in jsonl[0]
    again = torch.load(pretrain(cfg, progress=False), weights_only=True)  # resumes a finished run
    assert again["steps"] == 8
    assert all(torch.equal(state["backbone"][k], v) for k, v in again["backbone"].items())
    assert len(_rows(Path(cfg.run_dir) / "pretrain" / "logs" / "metrics.csv")) == 8  # no extra steps
    cfg.pretrain = dataclasses.replace(cfg.pretrain, epochs=3)
    with pytest.raises(ValueError, match=r"other settings \(pretrain.epochs: 2 -> 3\)"):
        pretrain(cfg, progress=False)


_KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import applications.bissl.stage_run as stage_run
from applications.bissl.cli import main

real_save, saves = stage_run.save_checkpoint, []

def save_then_die(state, path):
    out = real_save(state, path)
    if os.path.basename(str(path)) == "checkpoint.pt":
        saves.append(state["step"])
        if len(saves) == 2:  # killed right after the step-4 checkpoint is on disk
            os.kill(os.getpid(), signal.SIGKILL)
    return out

stage_run.save_checkpoint = save_then_die  # every stage saves through its StageRun
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run_bitwise(tmp_path) -> None:
    cfg = _cfg(tmp_path, "byol")  # BYOL: model, predictor, EMA target, LARS momentum, scheduler
    reference = pretrain(cfg, str(tmp_path / "reference"), checkpoint_every=2, log_every=1, progress=False)

    script = tmp_path / "killer.py"
    script.write_text(_KILLER.format(repo=str(REPO)))
    stage = tmp_path / "interrupted"
    args = [
        *SMALL,
        "--pretext-type",
        "byol",
        "--stage-dir",
        str(stage),
        "--checkpoint-every",
        "2",
        "--log-every",
        "1",
        "--no-progress",
    ]
    proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(stage / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not (stage / "pretrained.pt").exists()

    resumed = pretrain(cfg, str(stage), checkpoint_every=2, log_every=1, progress=False)
    ref, got = torch.load(reference, weights_only=True), torch.load(resumed, weights_only=True)
    assert got["steps"] == ref["steps"] == 8
    for part in ("backbone", "projector", "predictor", "target"):
        assert ref[part].keys() == got[part].keys()
        for k in ref[part]:
            assert torch.equal(ref[part][k], got[part][k]), f"{part}.{k} differs after resume"
    ref_ckpt = torch.load(tmp_path / "reference" / "checkpoint.pt", weights_only=True)
    got_ckpt = torch.load(stage / "checkpoint.pt", weights_only=True)
    for i, s in ref_ckpt["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], got_ckpt["optimizer"]["state"][i]["momentum_buffer"])
    assert got_ckpt["scheduler"]["last_epoch"] == ref_ckpt["scheduler"]["last_epoch"] == 8
    rows = _rows(stage / "logs" / "metrics.csv")  # the log continues where the killed run stopped
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    ref_rows = _rows(tmp_path / "reference" / "logs" / "metrics.csv")
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


def test_epoch_batches_split_global_batches_over_ranks() -> None:
    full = epoch_batches(10, 4, epoch=3, seed=1)
    assert len(full) == 2 and all(len(b) == 4 for b in full) and len(set(sum(full, []))) == 8
    shards = [epoch_batches(10, 4, epoch=3, seed=1, rank=r, world=2) for r in range(2)]
    assert [a + b for a, b in zip(*shards)] == full
    assert epoch_batches(10, 4, epoch=4, seed=1) != full


def _ddp_rank(rank: int, world: int, out: str) -> None:
    from applications.bissl import distributed as du

    assert not du.is_distributed()
    cfg = _cfg(Path(out))
    cfg.pretrain = dataclasses.replace(cfg.pretrain, epochs=1, batch_size=32)  # 2 steps, 16 images per rank
    path = pretrain(cfg, progress=False, log_every=1)
    state = torch.load(path, weights_only=True)  # written by rank 0 before the final barrier
    seen = {"path": path, "steps": state["steps"], "rank": du.rank(), "world": hypergrad.distributed.world_size()}
    torch.save(seen, os.path.join(out, f"seen_by_{rank}.pt"))


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_gloo_ranks(tmp_path) -> None:
    run_gloo(_ddp_rank, str(tmp_path), init=False)  # pretrain initialises gloo from the torchrun variables
    rows = _rows(tmp_path / "tiny" / "pretrain" / "logs" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(float(r["loss"]) > 0 for r in rows)
    seen = [torch.load(tmp_path / f"seen_by_{r}.pt", weights_only=True) for r in range(2)]
    assert [s.pop("rank") for s in seen] == [0, 1] and all(s.pop("world") == 2 for s in seen)
    assert seen[0] == seen[1] and seen[0]["steps"] == 2
    ckpt = torch.load(tmp_path / "tiny" / "pretrain" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2


def test_cli_overrides_and_errors(tmp_path) -> None:
    parser = build_parser()  # the one CLI: `pretrain` is a sub-command like the others
    args = parser.parse_args(
        ["pretrain", *SMALL, "--pretext-type", "byol", "--lr", "0.2", "--out-dir", str(tmp_path), "--width", "8"]
    )
    cfg = config_from_args(args)
    assert (cfg.pretrain.pretext_type, cfg.pretrain.lr, cfg.pretrain.batch_size, cfg.model.width) == (
        "byol",
        0.2,
        16,
        8,
    )
    assert cfg.out_dir == str(tmp_path) and cfg.name == "tiny" and args.func.__name__ == "_cmd_pretrain"
    bad = parser.parse_args(["pretrain", "--preset", "tiny", "--pretext-type", "moco"])
    with pytest.raises(ValueError, match="pretext_type"):
        config_from_args(bad)


def test_batch_larger_than_data_is_a_clear_error(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    cfg.pretrain = dataclasses.replace(cfg.pretrain, batch_size=128)
    with pytest.raises(ValueError, match="exceeds the 64 pretext images"):
        pretrain(cfg, progress=False)
