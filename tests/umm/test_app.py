"""The UMM application end to end (tiny preset) and its refusals of bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch

from applications.umm.cli import main
from applications.umm.config import METHODS, UMMConfig, get_preset
from applications.umm.diagnose import METRICS, resolve_checkpoints
from applications.umm.model import TAPS, load_pretrained, split_backbone
from applications.umm.probes import knn_accuracy, linear_probe
from hypergrad import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> str:
    run_dir = str(tmp_path_factory.mktemp("umm_tiny"))
    assert main(["run", "--preset", "tiny", "--run-dir", run_dir, "--no-progress"]) == 0
    return run_dir


def test_tiny_preset_runs_end_to_end(tiny_run: str) -> None:
    cfg = get_preset("tiny")
    ckpts = sorted(os.listdir(os.path.join(tiny_run, "pretrain", "checkpoints")))
    assert ckpts == [f"epoch_{e:04d}.pt" for e in range(cfg.epochs + 1)]
    with open(os.path.join(tiny_run, "diagnose", "diagnose.json")) as f:
        rows = json.load(f)["rows"]
    assert len(rows) == len(ckpts) * len(TAPS)
    for r in rows:
        assert all(torch.isfinite(torch.tensor(r[m])) for m in METRICS)
        assert 0.0 <= r["probe"] <= 1.0 and r["dr_class"] >= 0.0 and r["dr_views_seen"] >= 0.0
    for name in ("diagnose.md", "diagnose.csv", "diagnose.png"):
        assert os.path.getsize(os.path.join(tiny_run, "diagnose", name)) > 0
    with open(os.path.join(tiny_run, "finetune", "table.json")) as f:
        table = json.load(f)["rows"]
    assert [r["method"] for r in table] == ["pretrained (before)", *METHODS]
    assert all(r["seeds"] == cfg.seeds for r in table[1:])
    with open(os.path.join(tiny_run, "finetune", "results.jsonl")) as f:
        results = [json.loads(line) for line in f]
    assert len(results) == len(METHODS) * cfg.seeds
    umm = [r for r in results if r["method"] == "umm"]
    fo = [r for r in results if r["method"] == "umm_fo"]
    assert all(r["hvps"] == cfg.alternations * cfg.upper_steps * cfg.cg_steps for r in umm)
    assert all(r["hvps"] == 0 for r in fo)
    assert "linear probe" in open(os.path.join(tiny_run, "finetune", "table.md")).read()
    assert os.path.exists(os.path.join(tiny_run, "finetune", "logs", "umm_s0", "metrics.csv"))


def test_finetune_resume_skips_finished_runs(tiny_run: str) -> None:
    path = os.path.join(tiny_run, "finetune", "results.jsonl")
    before = open(path).read()
    assert main(["finetune", "--preset", "tiny", "--run-dir", tiny_run, "--no-progress"]) == 0
    assert open(path).read() == before  # nothing re-run, nothing appended
    with pytest.raises(ValueError, match="other settings"):
        main(["--debug", "finetune", "--preset", "tiny", "--run-dir", tiny_run, "--lam", "2.0", "--no-progress"])


def test_checkpoint_of_another_architecture_is_refused(tiny_run: str) -> None:
    path = resolve_checkpoints([os.path.join(tiny_run, "pretrain")])[-1]
    with pytest.raises(ValueError, match=r"`checkpoint`.*another architecture.*width: 4 \(file\) vs 8"):
        load_pretrained(path, get_preset("tiny").replace(width=8))
    state = load_checkpoint(path)
    del state["model"], state["config"]  # no recorded architecture: the state-dict shapes decide
    other = os.path.join(tiny_run, "bare.pt")
    save_checkpoint(state, other)  # the proper save path: valid checksums, so the architecture check fires
    with pytest.raises(ValueError, match=r"`checkpoint`.*does not fit"):
        load_pretrained(other, get_preset("tiny").replace(proj_dims=8))
    with pytest.raises(FileNotFoundError, match="`checkpoint`"):
        load_pretrained(os.path.join(tiny_run, "missing.pt"), get_preset("tiny"))
    save_checkpoint({"weights": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="no 'backbone'"):
        load_pretrained(other, get_preset("tiny"))


def test_checkpoint_edited_after_saving_is_refused(tiny_run: str) -> None:
    """A pretraining checkpoint whose weights changed after saving fails its checksum and is never loaded."""
    path = resolve_checkpoints([os.path.join(tiny_run, "pretrain")])[-1]
    raw = torch.load(path, weights_only=True)  # bypasses the verification: an edit on disk
    key = next(iter(raw["backbone"]))
    raw["backbone"][key] = raw["backbone"][key] + 1.0
    edited = os.path.join(tiny_run, "edited.pt")
    torch.save(raw, edited)
    with pytest.raises(ValueError, match=r"`checkpoint`.*edited\.pt.*(checksum|corrupted)"):
        load_pretrained(edited, get_preset("tiny"))


def test_pretrain_resume_refuses_other_settings(tiny_run: str) -> None:
    with pytest.raises(ValueError, match="other settings"):
        main(["--debug", "pretrain", "--preset", "tiny", "--run-dir", tiny_run, "--lr", "0.5", "--no-progress"])


def test_config_and_split_errors() -> None:
    with pytest.raises(ValueError, match="num_early"):
        UMMConfig(num_early=5)
    with pytest.raises(ValueError, match="eps2"):
        UMMConfig(eps2=0.0)
    with pytest.raises(ValueError, match="methods"):
        UMMConfig(methods=("umm", "bogus"))
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")
    with pytest.raises(ValueError, match="num_early"):
        split_backbone(torch.nn.Module(), 0)
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        resolve_checkpoints(["/nonexistent/umm"])


def test_probes_separate_separable_data() -> None:
    x = torch.randn(400, 4)
    y = (x[:, 0] + x[:, 1] > 0).long()
    assert linear_probe(x[:200], y[:200], x[200:], y[200:]) >= 0.9
    assert knn_accuracy(x[:200], y[:200], x[200:], y[200:], k=5) >= 0.8
    assert knn_accuracy(x, y, x, y, k=1) == 1.0
