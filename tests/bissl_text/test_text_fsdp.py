"""``--fsdp`` for the text BiSSL stage: the tiny GPT on 2 gloo ranks with sharded backbones against the same 2 ranks without.

Both runs use the same per-rank batches and exact Hessian-vector products (rev_rev_cached without
``--fsdp``; hypergrad's "exact_gathered" route on the sharded backbones with it); they differ only in
how the backbones are held (sharded vs replicated) and so in the order of floating-point sums.
"""

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

GPT = dict(n_layer=2, n_embd=16, n_head=2, n_positions=32)  # two blocks: two fully_shard-ed groups below the root


def _cfg(out, fsdp: bool):
    cfg = get_text_preset("tiny")
    cfg.out_dir = str(out)
    cfg.max_train_samples = 32
    cfg.bissl = dataclasses.replace(
        cfg.bissl,
        alternations=2,
        lower_steps=1,
        upper_steps=1,
        pretext_batch=8,
        downstream_batch=8,
        lower_lr=1e-3,
        head_warmup_epochs=1,
        fsdp=fsdp,
    )
    return cfg


def _ranks(rank, world, model_dir, tmp):
    torch.set_num_threads(1)
    for fsdp in (False, True):  # one spawn for both runs
        out = f"{tmp}/fsdp_{fsdp}"
        bissl_text(_cfg(out, fsdp), model_dir, "election_tweets", out_dir=out, resume=False)


def _gap(a: dict, b: dict, ref: dict, keys: list) -> tuple[float, float]:
    va, vb, vr = (torch.cat([s[k].double().reshape(-1) for k in keys]) for s in (a, b, ref))
    return float((va - vb).norm() / va.norm()), float((va - vb).norm() / (va - vr).norm())


@pytest.mark.distributed
def test_text_fsdp_stage_on_two_ranks_matches_the_data_parallel_stage(tmp_path):
    model_dir = str(tmp_path / "model")
    build_gpt(29, **GPT).save_pretrained(model_dir)
    CharTokenizer().save(model_dir)
    run_gloo(_ranks, model_dir, str(tmp_path), world=2)
    out = {fsdp: load_checkpoint(str(tmp_path / f"fsdp_{fsdp}" / "lower_backbone.pt")) for fsdp in (False, True)}
    ref = {f"body.{k}": v for k, v in build_gpt(29, **GPT).transformer.state_dict().items()}
    params = [k for k, v in ref.items() if v.is_floating_point() and "attn.bias" not in k]
    gaps = {part: _gap(out[False][part], out[True][part], ref, params) for part in ("backbone", "upper_backbone")}
    small = {
        part: max(float((out[False][part][k] - out[True][part][k]).abs().max()) for k in out[False][part])
        for part in ("lm_head", "head")
    }
    print(gaps, small)
    # float32 rounding only (measured: backbone rel 9.6e-10, gap/moved 6.2e-8; upper rel 1.1e-8, gap/moved 7.6e-7;
    # LM head equal, head 1.5e-8)
    for part, (rel, per_moved) in gaps.items():  # float32 rounding only
        assert rel <= 1e-6 and per_moved <= 1e-4, (part, gaps)
    assert max(small.values()) <= 1e-5, small
    for part in ("backbone", "upper_backbone"):  # full (gathered) tensors with the global shapes; they moved
        assert set(out[True][part]) == set(out[False][part])
        assert all(
            type(out[True][part][k]) is torch.Tensor and out[True][part][k].shape == ref[k].shape for k in params
        )
        assert max(float((out[True][part][k] - ref[k]).abs().max()) for k in params) > 1e-4


def _main(*argv: str) -> int:
    from applications.bissl.cli import main

    return main(list(argv))


def test_text_fsdp_flag_sets_the_config_and_refuses_what_it_cannot_do(tmp_path, capsys):
    from applications.bissl.text.cli import build_parser, config_from_args

    args = build_parser().parse_args(["bissl", "--preset", "tiny", "--fsdp"])
    assert config_from_args(args).bissl.fsdp is True
    assert config_from_args(build_parser().parse_args(["bissl", "--preset", "tiny"])).bissl.fsdp is False
    base = ("bissl", "--modality", "text", "--preset", "tiny", "--out-dir", str(tmp_path), "--fsdp")
    cases = {
        (): "launch the stage with torchrun",  # no process group here
        ("--hvp-mode", "fwd_rev"): "--fsdp needs --hvp-mode one of",
    }
    for extra, message in cases.items():
        assert _main(*base, *extra) == 2
        assert message in capsys.readouterr().err


def test_text_fsdp_refuses_lora():
    from applications.bissl.text.fsdp import check_text_fsdp

    cfg = get_text_preset("tiny")
    check_text_fsdp(cfg)  # full-parameter: accepted
    cfg.model.lora_rank = 2
    with pytest.raises(ValueError, match="--fsdp with --lora-rank 2 is not supported.*drop --lora-rank"):
        check_text_fsdp(cfg)
