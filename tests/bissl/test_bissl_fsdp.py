"""``--fsdp`` for the BiSSL stage: the tiny preset on 2 gloo ranks with sharded backbones against the same 2 ranks without.

Both runs use per-rank data and per-rank BatchNorm statistics (the data-parallel stage's semantics)
and exact Hessian-vector products; they differ only in how the backbones are held (sharded vs
replicated) and so in the order of floating-point sums.
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


#: one lower and one upper step with the tiny preset's method (CG, 2 steps): the Hessian products are exact on
#: both sides (rev_rev_cached without --fsdp; "exact_gathered" on the sharded backbone with --fsdp)
SETTINGS = dict(lower_steps=1, upper_steps=1, head_warmup_epochs=0)


#: SimCLR (negatives gathered over ranks in the lower steps) and BYOL (a sharded EMA target)
KINDS = ("simclr", "byol")


def _cfg(out: str, fsdp: bool, **bissl):
    cfg = get_preset("tiny")
    cfg.out_dir = out
    cfg.bissl = dataclasses.replace(cfg.bissl, fsdp=fsdp, **bissl)
    return cfg


def _stages(rank: int, world: int, tmp: str) -> None:
    for kind in KINDS:  # one spawn for all four runs
        for fsdp in (False, True):
            cfg = _cfg(f"{tmp}/{kind}/fsdp_{fsdp}", fsdp, **SETTINGS)
            cfg.pretrain = dataclasses.replace(cfg.pretrain, pretext_type=kind)
            stage.run_bissl(cfg, f"{tmp}/{kind}/pre.pt")
    for fsdp in (False, True):  # the control arm: continued pretraining, clipped over a mixed tree
        stage.run_bissl(_cfg(f"{tmp}/control/fsdp_{fsdp}", fsdp, **SETTINGS), f"{tmp}/simclr/pre.pt", arm="control")


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

    pre = {}
    for kind in KINDS:
        cfg = _cfg(str(tmp_path), False)
        cfg.pretrain = dataclasses.replace(cfg.pretrain, pretext_type=kind)
        (tmp_path / kind).mkdir()
        pre[kind] = _pretrained(cfg, tmp_path / kind / "pre.pt")
    run_gloo(_stages, str(tmp_path))
    for kind in KINDS:
        out = {}
        for fsdp in (False, True):
            (path,) = (tmp_path / kind / f"fsdp_{fsdp}").rglob("lower_backbone.pt")
            out[fsdp] = hypergrad.load_checkpoint(str(path))
        ref = pre[kind]["backbone"]
        params = [k for k, v in ref.items() if v.is_floating_point() and "running" not in k]
        gaps = {part: _gap(out[False][part], out[True][part], ref, params) for part in ("backbone", "upper_backbone")}
        head = max(float((out[False]["head"][k] - out[True]["head"][k]).abs().max()) for k in out[False]["head"])
        print(kind, gaps, head)
        # float32 rounding only (measured SimCLR rel 6.5e-9 / 1.1e-8, gap/moved 9.3e-8 / 1.0e-6, head 1.5e-8;
        # BYOL rel 4.1e-9 / 8.8e-9, gap/moved 1.0e-7 / 8.4e-7)
        for part, (rel, per_moved) in gaps.items():
            assert rel <= 1e-6 and per_moved <= 1e-4, (kind, part, gaps)
        assert head <= 1e-5, kind
        for part in ("backbone", "upper_backbone"):  # full (gathered) tensors with the global shapes; they moved
            assert all(type(out[True][part][k]) is torch.Tensor for k in params)
            assert all(out[True][part][k].shape == ref[k].shape for k in params)
            assert max(float((out[True][part][k] - ref[k]).abs().max()) for k in params) > 1e-4
    control = {}
    for fsdp in (False, True):
        (path,) = (tmp_path / "control" / f"fsdp_{fsdp}").rglob("lower_backbone.pt")
        control[fsdp] = hypergrad.load_checkpoint(str(path))["backbone"]
    ref = pre["simclr"]["backbone"]
    params = [k for k, v in ref.items() if v.is_floating_point() and "running" not in k]
    rel, per_moved = _gap(control[False], control[True], ref, params)
    assert rel <= 1e-6 and per_moved <= 1e-4, (rel, per_moved)  # measured 6.5e-9


def _main(*argv: str) -> int:
    from applications.bissl.cli import main

    return main(list(argv))


def test_fsdp_flag_sets_the_config_and_refuses_what_it_cannot_do(tmp_path, capsys):
    from applications.bissl.cli import build_parser, config_from_args

    args = build_parser().parse_args(["bissl", "--preset", "tiny", "--fsdp"])
    assert config_from_args(args).bissl.fsdp is True
    assert config_from_args(build_parser().parse_args(["bissl", "--preset", "tiny"])).bissl.fsdp is False
    base = ("bissl", "--preset", "tiny", "--out-dir", str(tmp_path), "--fsdp")
    cases = {
        (): "launch the stage with torchrun",  # no process group here
        ("--hvp-mode", "fwd_rev"): "--fsdp needs --hvp-mode one of",
        ("--damping-mode", "adaptive"): "--damping-mode adaptive is not supported",
    }
    for extra, message in cases.items():
        assert _main(*base, *extra) == 2
        assert message in capsys.readouterr().err


def test_kinked_backbone_below_float64_warns_about_finite_differences():
    from applications.bissl.fsdp import warn_kinked_fd
    from applications.bissl.models import MLP

    relu = MLP([4, 8, 2])  # Linear -> BatchNorm1d -> ReLU -> Linear
    with pytest.warns(UserWarning, match=r"ReLU kinks in float32.*Drop --hvp-mode finite_diff"):
        assert warn_kinked_fd(relu)
    smooth = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_kinked_fd(smooth) and not warn_kinked_fd(MLP([4, 8, 2]).double())


def _param_groups_check(rank: int, init: str) -> None:
    """Run in a fresh process: DTensor parameters left in the pytest process made later fork-based tests of the
    same process (tests/test_distributed.py) fail with autograd's fork error."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from applications.bissl.fsdp import param_groups

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=1)
    mesh = init_device_mesh("cpu", (1,))

    def params() -> list[torch.nn.Parameter]:
        g = torch.Generator().manual_seed(0)
        sharded = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3, generator=g), mesh, [Shard(0)]))
        plain = torch.nn.Parameter(torch.randn(2, 3, generator=g))
        sharded.grad = distribute_tensor(torch.randn(4, 3, generator=g), mesh, [Shard(0)])
        plain.grad = torch.randn(2, 3, generator=g)
        return [sharded, plain]

    def full(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    mixed = params()
    with pytest.raises(Exception, match="mixed torch.Tensor and DTensor"):  # the premise
        torch.optim.SGD(mixed, lr=0.1, momentum=0.9, foreach=True).step()
    grouped, loop = params(), params()
    groups = param_groups(grouped)
    assert [len(g["params"]) for g in groups] == [1, 1]
    torch.optim.SGD(groups, lr=0.1, momentum=0.9, foreach=True).step()
    torch.optim.SGD(loop, lr=0.1, momentum=0.9, foreach=False).step()
    for a, b, start in zip(grouped, loop, params()):
        torch.testing.assert_close(full(a), full(b), rtol=0, atol=0)
        assert not torch.equal(full(a), full(start))  # the step moved it
    dist.destroy_process_group()


def test_param_groups_keep_sharded_and_plain_tensors_apart_for_the_foreach_step(tmp_path) -> None:
    """torch's foreach optimiser step (CUDA's default) refuses a list mixing DTensors and plain tensors; the
    stage's optimisers get them in separate groups, and the step equals the per-tensor (for-loop) step."""
    import torch.multiprocessing as mp

    mp.start_processes(_param_groups_check, args=(f"file://{tmp_path}/init",), nprocs=1, start_method="spawn")
