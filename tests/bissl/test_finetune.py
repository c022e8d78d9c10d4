"""Fine-tuning protocol: log-uniform random search, best-validation selection, resumable runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from applications.bissl.config import get_preset
from applications.bissl.finetune import finetune, random_search, sample_trials


def test_trials_are_log_uniform_in_range_and_seeded():
    t = sample_trials(2000, (1e-4, 1.0), (1e-5, 1e-2), seed=3)
    lrs = torch.tensor([x.lr for x in t]).log10()
    wds = torch.tensor([x.weight_decay for x in t]).log10()
    assert lrs.min() >= -4 and lrs.max() <= 0 and wds.min() >= -5 and wds.max() <= -2
    # log-uniform: each decade gets about a quarter of the lr draws (4 decades)
    counts = torch.histc(lrs, bins=4, min=-4, max=0) / len(t)
    assert torch.all((counts - 0.25).abs() < 0.04)
    assert sample_trials(5, (1e-4, 1.0), (1e-5, 1e-2), seed=3) == t[:5]
    assert sample_trials(5, (1e-4, 1.0), (1e-5, 1e-2), seed=4) != t[:5]


def test_random_search_picks_best_validation_trial():
    trials = sample_trials(12, (1e-4, 1.0), (1e-5, 1e-2), seed=0)
    score = lambda lr, wd: -abs(math.log10(lr) + 1.5) - abs(math.log10(wd) + 3.5)
    best, scored = random_search(score, trials)
    assert len(scored) == 12 and best == max(scored, key=lambda t: t.score)
    assert best.score == max(score(t.lr, t.weight_decay) for t in trials)
    # NaN scores (diverged trials) never win; ties go to the earlier trial.
    best2, _ = random_search(lambda lr, wd: float("nan") if lr == trials[0].lr else 1.0, trials)
    assert best2.lr == trials[1].lr
    # resumption: already-scored trials are not re-run
    calls = []
    _, scored2 = random_search(lambda lr, wd: calls.append(lr) or 0.0, trials, done=scored[:5])
    assert len(calls) == 7 and scored2[:5] == scored[:5]
    with pytest.raises(RuntimeError, match="lr_range"):
        random_search(lambda lr, wd: float("nan"), trials[:2])


def test_finetune_end_to_end_deterministic_and_resumable(tmp_path):
    from applications.bissl.pretrain import build_pretrain_model

    cfg = get_preset("tiny")
    cfg.out_dir = str(tmp_path)
    torch.manual_seed(0)
    path = tmp_path / "pre.pt"
    torch.save(build_pretrain_model(cfg).checkpoint_state(), path)
    torch.set_num_threads(1)
    r1 = finetune(cfg, "digits", "pretext", str(path), out_dir=str(tmp_path / "a"))
    assert len(r1["trials"]) == cfg.finetune.hpo_trials and len(r1["test_top1"]) == cfg.finetune.num_runs
    best = max(r1["trials"], key=lambda t: t["score"])
    assert (r1["lr"], r1["weight_decay"]) == (best["lr"], best["weight_decay"])
    assert all(0.0 <= a <= 100.0 for a in r1["test_top1"])
    # same seeds, same answer
    r2 = finetune(cfg, "digits", "pretext", str(path), out_dir=str(tmp_path / "b"))
    assert r2["trials"] == r1["trials"] and r2["test_top1"] == r1["test_top1"]
    # resume: drop the last run from the state file; only it is recomputed, with the same result
    state_path = tmp_path / "b" / "state.json"
    state = json.loads(state_path.read_text())
    state["runs"] = state["runs"][:-1]
    state_path.write_text(json.dumps(state))
    r3 = finetune(cfg, "digits", "pretext", str(path), out_dir=str(tmp_path / "b"))
    assert r3["test_top1"] == r1["test_top1"]
    with pytest.raises(ValueError, match="origin"):
        finetune(cfg, "digits", "scratch", str(path))
    with pytest.raises(FileNotFoundError, match="pretrain"):
        finetune(cfg, "digits", "pretext", str(tmp_path / "missing.pt"))
