"""``--fsdp`` for the BiSSL stage: the tiny preset on 2 gloo ranks with sharded backbones against the same 2 ranks without.

Both runs use per-rank data and per-rank BatchNorm statistics (the data-parallel stage's semantics);
they differ only in how the backbones are held (sharded vs replicated) and in the Hessian-vector
products (finite differences of backward passes vs exact double backward).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import applications.bissl.stage_bissl as stage
import hypergrad
from applications.bissl.config import get_preset
from applications.bissl.pretrain import build_pretrain_model

pytestmark = pytest.mark.distributed


#: one lower and one upper step; hypergrad.Identity as the solver (x = g, no Hessian product): the comparison
#: then checks everything the sharded stage does except the finite-difference HVPs (see the module docstring)
SETTINGS = dict(lower_steps=1, upper_steps=1, head_warmup_epochs=0, method=None)


def _cfg(out: str, fsdp: bool, **bissl):
    cfg = get_preset("tiny")
    cfg.out_dir = out
    bissl = dict(bissl)
    if "method" in bissl:
        bissl["method"] = dataclasses.replace(cfg.bissl.method, solver=hypergrad.Identity())
    cfg.bissl = dataclasses.replace(cfg.bissl, fsdp=fsdp, **bissl)
    return cfg


def _stages(rank: int, world: int, tmp: str, kind: str) -> None:
    import time

    for fsdp in (False, True):
        t0 = time.perf_counter()
        cfg = _cfg(f"{tmp}/fsdp_{fsdp}", fsdp, **SETTINGS)
        cfg.pretrain = dataclasses.replace(cfg.pretrain, pretext_type=kind)
        stage.run_bissl(cfg, f"{tmp}/pre.pt")
        print(f"rank {rank} fsdp={fsdp}: {time.perf_counter() - t0:.1f} s")


def _pretrained(cfg, path) -> dict:
    torch.manual_seed(0)
    model = build_pretrain_model(cfg)
    torch.save(model.checkpoint_state(), path)
    return model.checkpoint_state()


def _gap(a: dict, b: dict, ref: dict, keys: list) -> tuple[float, float]:
    va, vb, vr = (torch.cat([s[k].double().reshape(-1) for k in keys]) for s in (a, b, ref))
    return float((va - vb).norm() / va.norm()), float((va - vb).norm() / (va - vr).norm())


def test_fsdp_stage_on_two_ranks_matches_the_data_parallel_stage(tmp_path):
    from .conftest import run_gloo

    cfg = _cfg(str(tmp_path), False)
    pre = _pretrained(cfg, tmp_path / "pre.pt")
    run_gloo(_stages, str(tmp_path), "simclr")
    out = {}
    for fsdp in (False, True):
        (path,) = (tmp_path / f"fsdp_{fsdp}").rglob("lower_backbone.pt")
        out[fsdp] = hypergrad.load_checkpoint(str(path))
    params = [k for k, v in pre["backbone"].items() if v.is_floating_point() and "running" not in k]
    for part in ("backbone", "upper_backbone"):
        rel, moved = _gap(out[False][part], out[True][part], pre["backbone"], params)
        print(f"{part}: rel={rel:.3e} gap/moved={moved:.3e}")
    print("head", float((out[False]["head"]["weight"] - out[True]["head"]["weight"]).norm()))
