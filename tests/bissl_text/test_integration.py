"""The text path on the image path's extension points: `--modality` hook, flag tables, splits, refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from applications.bissl import cli as image_cli
from applications.bissl.cli import main
from applications.bissl.text import stage
from applications.bissl.text.config import get_text_preset
from applications.bissl.text.finetune import hpo_split
from applications.bissl.text.model import build_gpt
from applications.bissl.text.setup import load_lm, task_tensors
from applications.bissl.text.tokenizer import CharTokenizer


def test_modality_option_is_registered_on_the_image_commands(capsys):
    from applications.bissl.text.cli import TEXT_COMMANDS, add_modality_option

    assert add_modality_option in image_cli.EXTENSIONS
    sub = image_cli.build_parser()._subparsers._group_actions[0]  # the sub-parsers action
    for name in TEXT_COMMANDS:
        assert "--modality" in sub.choices[name].format_help(), name
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0 and "--modality {image,text}" in capsys.readouterr().out


def test_text_parser_uses_the_image_flag_tables_minus_image_only_flags(capsys):
    from applications.bissl.text.cli import IMAGE_ONLY_FLAGS, build_parser

    help_ = build_parser()._subparsers._group_actions[0].choices["bissl"].format_help()
    for flag in image_cli.FLAG_TABLES["bissl"]:
        assert (flag in help_) == (flag not in IMAGE_ONLY_FLAGS), flag
    with pytest.raises(SystemExit) as exc:
        main(["bissl", "--modality", "text", "--damping-mode", "adaptive"])
    assert exc.value.code == 2 and "unrecognized arguments: --damping-mode" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bissl", "--modality", "text", "--lam", "nan"])  # the image path's finite_float type
    assert exc.value.code == 2 and "'nan' is not a finite number" in capsys.readouterr().err


def test_lars_flag_is_refused_with_one_line(tmp_path, capsys):
    assert (
        main(["bissl", "--modality", "text", "--preset", "tiny", "--out-dir", str(tmp_path), "--lars-exclude-1d"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lars-exclude-1d" in err and "AdamW" in err


def test_stage_refuses_settings_it_does_not_implement(tmp_path):
    cfg = get_text_preset("tiny")
    for change, flag in (
        ({"damping_mode": "adaptive"}, "--damping-mode"),
        ({"lam_mode": "target_share"}, "--lam-mode"),
        ({"head_warmup_mode": "train"}, "--head-warmup-mode"),
    ):
        cfg.bissl = dataclasses.replace(get_text_preset("tiny").bissl, **change)
        with pytest.raises(ValueError, match=f"drop {flag}"):
            stage.bissl_text(cfg, str(tmp_path), "election_tweets", out_dir=str(tmp_path / "out"))


@pytest.mark.parametrize("upper_split", ["train", "all"])
def test_upper_level_sees_only_the_train_part_of_the_hpo_split(tmp_path, monkeypatch, upper_split):
    model_dir = str(tmp_path / "model")
    build_gpt(29, n_layer=1, n_embd=8, n_head=2, n_positions=32).save_pretrained(model_dir)
    CharTokenizer().save(model_dir)
    cfg = get_text_preset("tiny")
    cfg.max_train_samples = 20
    cfg.bissl = dataclasses.replace(cfg.bissl, upper_split=upper_split)
    seen = {}

    class Stop(Exception):
        pass

    def spy(backbone, head, x, y, **kw):
        seen["x"], seen["y"] = x, y
        raise Stop

    monkeypatch.setattr(stage, "warmup_head", spy)
    monkeypatch.setattr(stage, "bits_per_token", lambda *a: 0.0)
    with pytest.raises(Stop):
        stage.bissl_text(cfg, model_dir, "election_tweets", out_dir=str(tmp_path / "out"), resume=False)
    data = task_tensors(cfg, "election_tweets", load_lm(cfg, model_dir)[2])
    tr, val = hpo_split(len(data.y_train), cfg.finetune)
    assert len(val) == 5 and not set(tr.tolist()) & set(val.tolist())
    idx = tr if upper_split == "train" else torch.arange(len(data.y_train))
    assert torch.equal(seen["x"], data.x_train[idx]) and torch.equal(seen["y"], data.y_train[idx])
