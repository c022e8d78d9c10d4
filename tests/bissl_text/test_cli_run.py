"""`python -m applications.bissl run --modality text --preset tiny` end to end, and the stage outputs."""

from __future__ import annotations

import json
import os

import torch

from applications.bissl.cli import main
from applications.bissl.text.finetune import STATE_KIND
from hypergrad import load_checkpoint


def test_tiny_preset_runs_end_to_end(tmp_path, capsys):
    assert main(["run", "--modality", "text", "--preset", "tiny", "--out-dir", str(tmp_path)]) == 0
    run = tmp_path / "text-tiny"
    md = (run / "results.md").read_text()
    for needle in ("reuters_r8", "election_tweets", "Welch p", "bits per character", "after BiSSL (reuters_r8)"):
        assert needle in md
    data = json.loads((run / "results.json").read_text())
    assert {r["task"] for r in data["rows"]} == {"reuters_r8", "election_tweets"}
    assert all(len(r["test_top1"]) == 2 for r in data["results"])
    bpc = data["meta"]["bpc"]
    assert bpc["pretrained"] < bpc["random init"]  # pretraining learned something
    assert abs(bpc["random init"] - torch.log2(torch.tensor(29.0)).item()) < 0.2  # ~ uniform over 29 tokens
    state = load_checkpoint(run / "bissl" / "reuters_r8" / "lower_backbone.pt", expected_kind=STATE_KIND)
    assert set(state) == {"backbone", "lm_head", "upper_backbone", "head"}
    stage = json.loads((run / "bissl" / "reuters_r8" / "stage.json").read_text())
    assert stage["inner_skipped"] == 0 and stage["outer_skipped"] == 0
    assert stage["solves"] == 2 * 2 and 0 <= stage["solves_failed"] <= stage["solves"]  # tiny: 2 x 2 upper steps
    assert stage["bpc_before"] == bpc["pretrained"] or abs(stage["bpc_before"] - bpc["pretrained"]) < 1e-6
    # theta_P moved away from the pretrained weights, theta_D too, and differently
    lower, upper = state["backbone"], state["upper_backbone"]
    assert any(not torch.equal(lower[k], upper[k]) for k in lower)
    assert os.path.exists(run / "logs" / "bissl" / "reuters_r8" / "metrics.csv")
    # finetune re-runs one stage from the saved outputs through the CLI
    assert (
        main(
            [
                "finetune",
                "--modality",
                "text",
                "--preset",
                "tiny",
                "--out-dir",
                str(tmp_path),
                "--dset",
                "election_tweets",
                "--backbone-origin",
                "bissl",
                "--use-hpo",
                "0",
                "--num-runs",
                "1",
            ]
        )
        == 0
    )
    assert "election_tweets / bissl: top-1" in capsys.readouterr().out


def test_lora_stage_couples_and_trains_adapters_only(tmp_path):
    out = str(tmp_path)
    assert main(["pretrain", "--modality", "text", "--preset", "tiny", "--out-dir", out, "--pretrain-steps", "2"]) == 0
    args = [
        "bissl",
        "--modality",
        "text",
        "--preset",
        "tiny",
        "--out-dir",
        out,
        "--d-dset",
        "election_tweets",
        "--lora-rank",
        "2",
        "--alternations",
        "1",
    ]
    assert main(args) == 0
    state = load_checkpoint(
        tmp_path / "text-tiny" / "lora2" / "bissl" / "election_tweets" / "lower_backbone.pt", expected_kind=STATE_KIND
    )
    from safetensors.torch import load_file

    base = load_file(str(tmp_path / "text-tiny" / "pretrain" / "model" / "model.safetensors"))
    lower = state["backbone"]
    lora = [k for k in lower if "lora_" in k]
    assert lora and any(lower[k].abs().sum() > 0 for k in lora if "lora_B" in k)  # adapters trained
    for k, v in lower.items():  # the base weights are frozen: equal to the pretrained ones
        if "lora_" not in k:
            name = "transformer." + k.removeprefix("body.").replace(".base_layer", "")
            assert torch.equal(v, base[name]), k
    assert torch.equal(state["lm_head"]["weight"], base["lm_head.weight"])
