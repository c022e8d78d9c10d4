"""The deviations from the authors' BiSSL fixed (issue 10), each tested against its description.

Warm-up mode and transform; LARS groups; the layer-wise CG against a reference written from its
description; no replay of pretraining views and one resolution; the label leak (the stage's upper
level never sees fine-tuning's validation images); adaptive damping; the demo is a transfer
experiment.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import applications.bissl.finetune as ft_mod
import applications.bissl.stage_bissl as stage
from applications.bissl.augment import eval_transform, train_transform
from applications.bissl.config import BiSSLConfig, get_preset
from applications.bissl.diagnostics import adaptive_damping, lanczos_extremes, proximal_share, target_lam
from applications.bissl.optim import LARS
from applications.bissl.pretrain import build_pretrain_model, pretext_dataset
from applications.bissl.solvers import LayerwiseCG
from applications.bissl.splits import split_path, task_split
from hypergrad import CG, Status

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path, **bissl):
    cfg = get_preset("tiny")
    cfg.out_dir = str(tmp_path)
    cfg.bissl = dataclasses.replace(cfg.bissl, **bissl)
    return cfg


# --- 1. head warm-up -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_head_warmup_mode_transform_and_copy(tmp_path, monkeypatch, mode):
    cfg = _cfg(tmp_path, head_warmup_mode=mode)
    backbone = build_pretrain_model(cfg).backbone
    head = nn.Linear(backbone(torch.zeros(2, 1, 8, 8)).shape[1], 10)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    seen = {}
    real = stage.supervised_epoch

    def spy(model, loader, *a, **kw):
        seen.update(
            training=model[0].training,
            copy=model[0] is not backbone,
            frozen=not any(p.requires_grad for p in model[0].parameters()),
            transform=repr(loader.dataset.transform),
            indices=set(loader.dataset.indices.tolist()),
        )
        return real(model, loader, *a, **kw)

    monkeypatch.setattr(stage, "supervised_epoch", spy)
    stage._warmup_head(cfg, backbone, head, "digits", 0.03, 1e-3)
    want = (train_transform if mode == "train" else eval_transform)(cfg.model.image_size, 1)
    assert seen["training"] is (mode == "train") and seen["copy"] and seen["frozen"]
    assert seen["transform"] == repr(want)
    assert seen["indices"] == set(task_split(cfg, "digits", None)[0].indices.tolist())  # train part only
    for k, v in backbone.state_dict().items():  # the real backbone (running stats included) untouched
        assert torch.equal(v, before[k]), k


# --- 2. LARS ---------------------------------------------------------------------------------


def test_lars_default_scales_and_decays_one_d_tensors():
    bn_w = nn.Parameter(torch.tensor([1.0, 2.0, 2.0]))
    g = torch.tensor([0.5, -1.0, 0.25])
    lr, wd, eta = 0.5, 0.1, 0.01
    opt = LARS([bn_w], lr=lr, weight_decay=wd, momentum=0.0, eta=eta)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["exclude_bias_and_norm"] is False
    bn_w.grad = g.clone()
    p0 = bn_w.detach().clone()
    opt.step()
    d = g + wd * p0
    expect = p0 - lr * eta * p0.norm() / d.norm() * d
    assert torch.allclose(bn_w.detach(), expect)
    excl = nn.Parameter(p0.clone())
    opt2 = LARS([excl], lr=lr, weight_decay=wd, momentum=0.0, eta=eta, exclude_bias_and_norm=True)
    excl.grad = g.clone()
    opt2.step()
    assert torch.allclose(excl.detach(), p0 - lr * g)  # raw step: no decay, no trust ratio


def test_stage_lars_is_one_unfiltered_group_by_default(tmp_path, monkeypatch):
    made = []
    real = stage.LARS

    def spy(params, **kw):
        made.append(kw)
        return real(params, **kw)

    monkeypatch.setattr(stage, "LARS", spy)
    cfg = _cfg(tmp_path)
    assert BiSSLConfig().lars_exclude_1d is False and cfg.pretrain.lars_exclude_1d is False
    torch.save(build_pretrain_model(cfg).checkpoint_state(), tmp_path / "pre.pt")
    monkeypatch.setattr(stage, "_warmup_head", lambda *a, **k: 0.0)
    cfg.bissl = dataclasses.replace(cfg.bissl, alternations=1, lower_steps=1, upper_steps=1)
    stage.run_bissl(cfg, str(tmp_path / "pre.pt"))
    assert made and made[0]["exclude_bias_and_norm"] is False


# --- 3. layer-wise CG -----------------------------------------------------------------------


def _reference_layerwise(A, b, steps, eps=1e-12):
    """Written from the description: per-tensor alpha/beta, coupled matvec, eps, nan_to_num."""
    sizes = [v.numel() for v in b.values()]
    keys = list(b)

    def mv(tree):
        out = A @ torch.cat([tree[k] for k in keys])
        return dict(zip(keys, torch.split(out, sizes)))

    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = {k: v.clone() for k, v in b.items()}
    p = {k: v.clone() for k, v in b.items()}
    for _ in range(steps):
        q = mv(p)
        for k in keys:
            rr = r[k] @ r[k]
            alpha = rr / (p[k] @ q[k] + eps)
            x[k] = x[k] + alpha * p[k]
            r_new = r[k] - alpha * q[k]
            beta = (r_new @ r_new) / (rr + eps)
            p[k] = r_new + beta * p[k]
            r[k] = r_new
    return {k: torch.nan_to_num(v) for k, v in x.items()}


def _spd(n, seed, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T / n + shift * torch.eye(n, dtype=torch.float64)


def test_layerwise_cg_equals_reference_and_differs_from_cg_across_tensors():
    A = _spd(7, 0)
    g = torch.Generator().manual_seed(1)
    b = {"w": torch.randn(4, generator=g, dtype=torch.float64), "b": torch.randn(3, generator=g, dtype=torch.float64)}
    split = lambda v: {"w": v[:4], "b": v[4:]}
    mv = lambda t: split(A @ torch.cat([t["w"], t["b"]]))
    sol = LayerwiseCG(max_steps=3)(mv, b)
    ref = _reference_layerwise(A, b, 3)
    for k in b:
        assert torch.allclose(sol.x[k], ref[k], rtol=1e-12, atol=1e-14)
    assert sol.num_matvecs == 3 and sol.status is Status.FIXED_BUDGET
    cg = CG(max_steps=3)(mv, b)
    assert max(float((sol.x[k] - cg.x[k]).abs().max()) for k in b) > 1e-6  # not CG on A with two tensors


def test_layerwise_cg_equals_textbook_cg_on_one_tensor():
    A = _spd(6, 2)
    b = {"w": torch.linspace(-1, 1, 6, dtype=torch.float64)}
    mv = lambda t: {"w": A @ t["w"]}
    for steps in (1, 3, 6):
        lw, cg = LayerwiseCG(max_steps=steps)(mv, b), CG(max_steps=steps)(mv, b)
        assert torch.allclose(lw.x["w"], cg.x["w"], rtol=1e-9, atol=1e-12), steps
    assert torch.allclose(A @ LayerwiseCG(max_steps=6)(mv, b).x["w"], b["w"], atol=1e-8)


def test_layerwise_cg_reports_negative_curvature_and_nonfinite_instead_of_hiding_them():
    A = torch.diag(torch.tensor([1.0, -3.0, 2.0], dtype=torch.float64))
    sol = LayerwiseCG(max_steps=2)(lambda v: A @ v, torch.ones(3, dtype=torch.float64))
    assert sol.status is Status.NEGATIVE_CURVATURE and sol.stats["min_curvature"] <= 0
    nan = LayerwiseCG(max_steps=1)(lambda v: v * float("nan"), torch.ones(2))
    assert nan.status is Status.NONFINITE and torch.isfinite(nan.x).all()  # nan_to_num, but reported


# --- 4 and 6. failed solves, adaptive damping, proximal share --------------------------------


def test_adaptive_damping_makes_the_damped_system_positive_definite():
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    H = q @ torch.diag(torch.linspace(-40.0, 200.0, 12, dtype=torch.float64)) @ q.T
    lam = 1e-3
    assert torch.linalg.eigvalsh(torch.eye(12, dtype=torch.float64) + H / (lam + 10.0)).min() < 0  # paper: indefinite
    lo, hi = lanczos_extremes(lambda v: H @ v, torch.ones(12, dtype=torch.float64), 12)
    assert lo == pytest.approx(-40.0) and hi == pytest.approx(200.0)
    d = adaptive_damping(lo, lam, 10.0, 2.0)
    assert torch.linalg.eigvalsh(torch.eye(12, dtype=torch.float64) + H / (lam + d)).min() >= 0.5 - 1e-9
    assert adaptive_damping(5.0, lam, 10.0, 2.0) == 10.0  # positive definite already: paper value kept


def test_target_lam_reaches_the_share():
    lam = target_lam(0.05, grad_norm=3.0, distance=0.5, lo=1e-3, hi=10.0)
    assert proximal_share(lam, 0.5, 3.0) == pytest.approx(0.05)


# --- 7. pretext stream and resolution --------------------------------------------------------


def test_stage_continues_the_pretraining_stream_and_uses_one_resolution(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, alternations=1, lower_steps=2, upper_steps=1)
    cfg.pretrain = dataclasses.replace(cfg.pretrain, epochs=3)
    state = build_pretrain_model(cfg).checkpoint_state()
    state["pretrain_config"] = dataclasses.asdict(cfg.pretrain)
    torch.save(state, tmp_path / "pre.pt")
    epochs = []
    real = stage.epoch_batches

    def spy(n, b, epoch, seed, *a):
        if seed == cfg.seed:  # the pretext stream (the downstream stream uses seed + 1)
            epochs.append(epoch)
        return real(n, b, epoch, seed, *a)

    monkeypatch.setattr(stage, "epoch_batches", spy)
    monkeypatch.setattr(stage, "_warmup_head", lambda *a, **k: 0.0)
    stage.run_bissl(cfg, str(tmp_path / "pre.pt"))
    assert epochs and min(epochs) >= 3  # pretraining used epochs 0..2: nothing replayed
    ds = pretext_dataset(cfg)
    assert ds.dataset.image(0).size == (cfg.model.image_size,) * 2  # pretraining and stage: one resolution


# --- 5. the label leak -----------------------------------------------------------------------


def test_no_image_of_the_stage_upper_level_is_in_finetuning_validation(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, alternations=1, lower_steps=1, upper_steps=2)
    cfg.max_train_samples = 200
    torch.save(build_pretrain_model(cfg).checkpoint_state(), tmp_path / "pre.pt")
    used = set()
    real_batches = stage._batches

    def spy(ds, *a, **kw):
        if not hasattr(ds, "set_epoch"):  # the labelled (upper-level) stream
            used.update(ds.indices.tolist())
        return real_batches(ds, *a, **kw)

    monkeypatch.setattr(stage, "_batches", spy)
    out = stage.run_bissl(cfg, str(tmp_path / "pre.pt"))
    val_seen = set()
    real_split = ft_mod.task_split

    def split_spy(*a, **kw):
        tr, va = real_split(*a, **kw)
        val_seen.update(va.indices.tolist())
        return tr, va

    class Chance(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 10)

    monkeypatch.setattr(ft_mod, "task_split", split_spy)
    monkeypatch.setattr(ft_mod, "train_classifier", lambda *a, **k: Chance())
    ft_mod.finetune(cfg, "digits", "bissl", out)
    assert used and val_seen
    assert not used & val_seen
    assert (tmp_path / "tiny" / "splits" / "digits.json").exists() and split_path(cfg, "digits").endswith("digits.json")
    summary = (tmp_path / "tiny" / "bissl" / "digits" / "summary.json").read_text()
    assert '"solves_failed_frac"' in summary and '"final_proximal_share"' in summary


def test_a_changed_split_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    task_split(cfg, "digits", None)
    cfg.finetune = dataclasses.replace(cfg.finetune, val_fraction=0.3)
    with pytest.raises(ValueError, match="split"):
        task_split(cfg, "digits", None)


# --- 8. the demo is a transfer experiment ----------------------------------------------------


@pytest.mark.parametrize("fm", [True, False])
def test_demo_pretext_differs_from_its_downstream_data(monkeypatch, fm):
    import applications.bissl.config as config

    monkeypatch.setattr(config, "fashion_mnist_available", lambda *a, **k: fm)
    cfg = config.get_preset("demo")
    from applications.bissl.tasks import parse_task

    downstream = {parse_task(t).dataset for t in cfg.downstream} | {parse_task(cfg.bissl.downstream).dataset}
    assert cfg.pretrain.dataset not in downstream
    assert cfg.pretrain.dataset == ("fashion_mnist" if fm else "photo_patches")


# --- issue 9: a stage whose every upper step was skipped fails with the reason ---------------


def test_stage_with_every_upper_step_skipped_fails_with_the_reason(tmp_path, monkeypatch):
    import applications.bissl.bilevel as bilevel
    from applications.bissl.cli import main

    real = bilevel.make_outer_loss

    def nan_loss(gamma):
        f = real(gamma)
        return lambda inner, outer, batch: f(inner, outer, batch) * float("nan")

    monkeypatch.setattr(bilevel, "make_outer_loss", nan_loss)
    cfg = _cfg(tmp_path, alternations=1, lower_steps=1, upper_steps=2)
    torch.save(build_pretrain_model(cfg).checkpoint_state(), tmp_path / "pre.pt")
    monkeypatch.setattr(stage, "_warmup_head", lambda *a, **k: 0.0)
    with pytest.raises(RuntimeError, match="every one of the 2 upper steps"):
        stage.run_bissl(cfg, str(tmp_path / "pre.pt"), resume=False)
    argv = ["bissl", "--preset", "tiny", "--out-dir", str(tmp_path), "--pretrained", str(tmp_path / "pre.pt")]
    assert main([*argv, "--alternations", "1", "--upper-steps", "2", "--no-resume"]) == 1
    with pytest.raises(ValueError, match="gamma"):
        real(float("nan"))
