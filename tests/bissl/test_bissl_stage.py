"""The BiSSL stage end to end (tiny preset): outputs, exact resume after an interruption, BYOL."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import applications.bissl.stage_bissl as stage
import hypergrad
from applications.bissl.config import get_preset
from applications.bissl.pretrain import build_pretrain_model


def _pretrained(cfg, path):
    torch.manual_seed(0)
    model = build_pretrain_model(cfg)
    if model.target is not None:  # a stale target in the checkpoint: the stage must re-create it
        with torch.no_grad():
            for p in model.target.parameters():
                p.add_(1.0)
    torch.save(model.checkpoint_state(), path)
    return model.checkpoint_state()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(tmp_path, **bissl):
    cfg = get_preset("tiny")
    cfg.out_dir = str(tmp_path)
    cfg.bissl = dataclasses.replace(cfg.bissl, **bissl)
    return cfg


def test_stage_outputs_and_bit_exact_resume(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path / "a", alternations=2, warm_start=True)
    pre = _pretrained(cfg, tmp_path / "pre.pt")
    full = hypergrad.load_checkpoint(stage.run_bissl(cfg, str(tmp_path / "pre.pt")))  # verified, record stripped
    assert set(full) == {"backbone", "upper_backbone", "head"}
    floats = [k for k, v in pre["backbone"].items() if v.is_floating_point()]
    assert any(not torch.equal(full["backbone"][k], pre["backbone"][k]) for k in floats)  # theta_P trained
    assert any(not torch.equal(full["backbone"][k], full["upper_backbone"][k]) for k in floats)  # theta_P != theta_D
    log = (tmp_path / "a" / "tiny" / "logs" / "bissl" / "digits" / "metrics.csv").read_text().splitlines()
    assert log[0].startswith("step,") and len(log) == 1 + cfg.bissl.alternations
    hvps = log[0].split(",").index("hvps")
    assert all(float(row.split(",")[hvps]) > 0 for row in log[1:])

    cfg_b = _cfg(tmp_path / "b", alternations=2, warm_start=True)
    real_save = stage.save_checkpoint
    saves = []

    def save_then_die(state, path):
        real_save(state, path)
        saves.append(path)
        if len(saves) == 1:
            raise KeyboardInterrupt  # killed right after the first alternation's checkpoint

    monkeypatch.setattr(stage, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        stage.run_bissl(cfg_b, str(tmp_path / "pre.pt"))
    monkeypatch.setattr(stage, "save_checkpoint", real_save)
    resumed = hypergrad.load_checkpoint(stage.run_bissl(cfg_b, str(tmp_path / "pre.pt")))
    for part in ("backbone", "upper_backbone", "head"):
        for k in full[part]:
            assert torch.equal(full[part][k], resumed[part][k]), f"{part}.{k}"


def test_byol_stage_runs_and_recreates_the_target(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, alternations=1)
    cfg.pretrain = dataclasses.replace(cfg.pretrain, pretext_type="byol")
    pre = _pretrained(cfg, tmp_path / "pre.pt")
    seen = {}
    real_build = stage.build_problem

    def spy(ssl, *a, **kw):
        seen["target"] = {k: v.detach().clone() for k, v in ssl.target.state_dict().items()}
        seen["online"] = {
            **{"0." + k: v.clone() for k, v in ssl.backbone.state_dict().items()},
            **{"1." + k: v.clone() for k, v in ssl.projector.state_dict().items()},
        }
        return real_build(ssl, *a, **kw)

    monkeypatch.setattr(stage, "build_problem", spy)
    stage.run_bissl(cfg, str(tmp_path / "pre.pt"))
    for k, v in seen["target"].items():  # a fresh copy of the online network ...
        assert torch.equal(v, seen["online"][k])
    assert any(not torch.equal(v, pre["target"][k]) for k, v in seen["target"].items())  # ... not the stale one


def _ddp_stage(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    cfg = _cfg(tmp, alternations=1)
    seen = {}
    real_build = stage.build_problem

    def spy(ssl, upper, head, *a, **kw):
        seen.update(ssl=ssl, upper=upper, head=head)
        return real_build(ssl, upper, head, *a, **kw)

    stage.build_problem = spy
    out = stage.run_bissl(cfg, f"{tmp}/pre.pt")
    vec = torch.cat([p.detach().reshape(-1) for m in ("ssl", "upper", "head") for p in seen[m].parameters()])
    vecs = [torch.zeros_like(vec) for _ in range(world)]
    dist.all_gather(vecs, vec)
    assert torch.equal(vecs[0], vecs[1]), "ranks diverged: gradients or HVPs were not averaged"
    if rank == 0:
        saved = torch.load(out, weights_only=True)["backbone"]
        for k, p in seen["ssl"].backbone.state_dict().items():
            assert torch.equal(saved[k], p)


@pytest.mark.distributed
def test_stage_under_two_gloo_ranks_keeps_ranks_identical(tmp_path):
    from .conftest import run_gloo

    cfg = _cfg(tmp_path, alternations=1)
    _pretrained(cfg, tmp_path / "pre.pt")
    run_gloo(_ddp_stage, str(tmp_path))
