"""The BiSSL stage end to end (tiny preset): outputs, exact resume after an interruption, BYOL."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import applications.bissl.stage_bissl as stage
import applications.bissl.stage_run as stage_run
import hypergrad
from applications.bissl.config import get_preset
from applications.bissl.pretrain import build_pretrain_model
from tests.bissl.conftest import pop_method_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")


def _pretrained(cfg, path):
    torch.manual_seed(0)
    model = build_pretrain_model(cfg)
    if model.target is not None:  # a stale target in the checkpoint: the stage must re-create it
        with torch.no_grad():
            for p in model.target.parameters():
                p.add_(1.0)
    torch.save(model.checkpoint_state(), path)
    return model.checkpoint_state()


def _cfg(tmp_path, **bissl):
    """The tiny preset with ``bissl`` changes; fields of hypergrad.Proximal go to ``cfg.bissl.method``."""
    cfg = get_preset("tiny")
    cfg.out_dir = str(tmp_path)
    method = pop_method_kwargs(bissl)
    cfg.bissl = dataclasses.replace(cfg.bissl, **bissl, method=dataclasses.replace(cfg.bissl.method, **method))
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
    real_save = stage_run.save_checkpoint
    saves = []

    def save_then_die(state, path):
        real_save(state, path)
        saves.append(path)
        if len(saves) == 1:
            raise KeyboardInterrupt  # killed right after the first alternation's checkpoint

    monkeypatch.setattr(stage_run, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        stage.run_bissl(cfg_b, str(tmp_path / "pre.pt"))
    monkeypatch.setattr(stage_run, "save_checkpoint", real_save)
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


def _ddp_stage(rank: int, world: int, tmp: str, out_dir: str) -> None:
    """One stage under ``world`` ranks; every rank must end with the same parameters."""
    import torch.distributed as dist

    cfg = _cfg(out_dir, alternations=1)
    seen = {}
    real_build = stage.build_problem

    def spy(ssl, upper, head, *a, **kw):
        seen.update(ssl=ssl, upper=upper, head=head)
        return real_build(ssl, upper, head, *a, **kw)

    stage.build_problem = spy
    try:
        out = stage.run_bissl(cfg, f"{tmp}/pre.pt")
    finally:
        stage.build_problem = real_build
    vec = torch.cat([p.detach().reshape(-1) for m in ("ssl", "upper", "head") for p in seen[m].parameters()])
    vecs = [torch.zeros_like(vec) for _ in range(world)]
    dist.all_gather(vecs, vec)
    assert torch.equal(vecs[0], vecs[1]), "ranks diverged: gradients or HVPs were not averaged"
    if rank == 0:
        saved = torch.load(out, weights_only=True)["backbone"]
        for k, p in seen["ssl"].backbone.state_dict().items():
            assert torch.equal(saved[k], p)


def _fixed_bn_statistics() -> None:
    """Make every BatchNorm with running statistics normalise with them (a measurement device of the test only)."""
    import torch.nn.functional as F
    from torch.nn.modules.batchnorm import _BatchNorm

    batch_statistics = _BatchNorm.forward

    def forward(self, x):
        if self.running_mean is None:  # no running statistics (the projector's last BatchNorm): unchanged
            return batch_statistics(self, x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    _BatchNorm.forward = forward


def _ddp_stages(rank: int, world: int, tmp: str) -> None:
    """The stage as it is, then with BatchNorm on its running statistics (one spawn for both).

    Each run also checks that the ranks end identical (gradients and HVPs averaged).
    """
    for fixed_bn in (False, True):
        if fixed_bn:
            _fixed_bn_statistics()
        _ddp_stage(rank, world, tmp, f"{tmp}/bn_fixed_{fixed_bn}/two")


def _gap(a: dict, b: dict, ref: dict, keys: list[str]) -> tuple[float, float, float]:
    """Max |a - b| over ``keys``, ``||a - b|| / ||a||`` and ``||a - b|| / ||a - ref||`` (keys concatenated)."""
    va, vb, vr = (torch.cat([s[k].double().reshape(-1) for k in keys]) for s in (a, b, ref))
    diff = (va - vb).norm()
    return float((va - vb).abs().max()), float(diff / va.norm()), float(diff / (va - vr).norm())


@pytest.mark.distributed
def test_two_gloo_ranks_match_one_process_within_the_documented_bound(tmp_path, monkeypatch):
    """2 gloo ranks (each its half of every global batch) against one process on the whole batches.

    Inside the spawn, both ranks must end with bitwise equal parameters (`_ddp_stage`).

    Bound (docs/bissl.md, "Multi-process runs"): with the stage as it is, the lower backbone's
    parameters differ by at most 0.5 of their norm (measured 0.165) and 8.0 in one entry (measured
    2.57) after one alternation of the tiny preset - more than the run moved, all of it from
    per-rank BatchNorm statistics: with BatchNorm on its running statistics (patched here, in the
    test only) the same comparison agrees to float32 rounding (relative gap measured 8.6e-9, bound
    1e-6; gap / distance moved ~2e-6, bound 1e-4), which shows the rest of the lower level (gathered
    negatives, averaged gradients, LARS, clipping, batch sharding) equals one process. The upper
    backbone differs by at most 0.06 of its norm and 0.2 in one entry (measured 0.019-0.020 and 0.066,
    with or without the patch: per-rank Hessians, failed solves).
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    from .conftest import run_gloo

    pre = _pretrained(_cfg(tmp_path), tmp_path / "pre.pt")
    params = [k for k, v in pre["backbone"].items() if v.is_floating_point() and "running" not in k]
    run_gloo(_ddp_stages, str(tmp_path))
    gaps = {}
    for fixed_bn in (False, True):
        if fixed_bn:
            monkeypatch.setattr(_BatchNorm, "forward", _BatchNorm.forward)  # restored after the test
            _fixed_bn_statistics()
        out = tmp_path / f"bn_fixed_{fixed_bn}"
        one = hypergrad.load_checkpoint(stage.run_bissl(_cfg(out / "one", alternations=1), str(tmp_path / "pre.pt")))
        (path,) = (out / "two").rglob("lower_backbone.pt")
        two = hypergrad.load_checkpoint(str(path))
        for part in ("backbone", "upper_backbone"):
            gaps[part, fixed_bn] = _gap(one[part], two[part], pre["backbone"], params)
            print(f"{part} fixed_bn={fixed_bn}: max_abs=%.3e rel=%.3e gap/moved=%.3e" % gaps[part, fixed_bn])
    max_abs, rel, _ = gaps["backbone", False]
    assert max_abs <= 8.0 and rel <= 0.5, gaps  # the stated bound (3x the measured values)
    max_abs, rel, per_moved = gaps["backbone", True]
    assert rel <= 1e-6 and per_moved <= 1e-4, gaps  # everything but BatchNorm's statistics: float32 rounding
    for fixed_bn in (False, True):  # the upper backbone (Hessian batch, failed solves): measured <= 0.021, 0.066
        max_abs, rel, _ = gaps["upper_backbone", fixed_bn]
        assert max_abs <= 0.2 and rel <= 0.06, gaps
