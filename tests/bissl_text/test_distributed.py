"""The text BiSSL stage under 2 gloo processes equals one process (same global batches)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from applications.bissl.text.config import get_text_preset
from applications.bissl.text.model import build_gpt
from applications.bissl.text.stage import bissl_text
from applications.bissl.text.tokenizer import CharTokenizer
from hypergrad import load_checkpoint

from ..bissl.conftest import run_gloo


def _cfg(out):
    cfg = get_text_preset("tiny")
    cfg.out_dir = str(out)
    cfg.max_train_samples = 32
    cfg.bissl = dataclasses.replace(
        cfg.bissl, alternations=1, lower_steps=2, upper_steps=2, pretext_batch=8, downstream_batch=8, lower_lr=1e-5
    )
    return cfg


def _rank(rank, world, model_dir, out):
    torch.set_num_threads(1)
    bissl_text(_cfg(out), model_dir, "election_tweets", out_dir=str(out), resume=False)


@pytest.mark.distributed
def test_two_processes_equal_one(tmp_path):
    model_dir = str(tmp_path / "model")
    build_gpt(29, n_layer=1, n_embd=16, n_head=2, n_positions=32).save_pretrained(model_dir)
    CharTokenizer().save(model_dir)
    one = bissl_text(_cfg(tmp_path / "one"), model_dir, "election_tweets", out_dir=str(tmp_path / "one"), resume=False)
    run_gloo(_rank, model_dir, tmp_path / "two", world=2)
    a = load_checkpoint(one)
    b = load_checkpoint(tmp_path / "two" / "lower_backbone.pt")
    moved = 0.0
    for part in ("backbone", "upper_backbone", "head"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=1e-4, atol=1e-5, msg=f"{part}.{k}")
    pre = build_gpt(29, n_layer=1, n_embd=16, n_head=2, n_positions=32).transformer.state_dict()
    moved = max(float((a["upper_backbone"][f"body.{k}"] - v).abs().max()) for k, v in pre.items())
    assert moved > 1e-4  # the upper level took real steps (the comparison is not between untouched copies)
