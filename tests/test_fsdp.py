"""FSDP2 (``fully_shard``) hypergradients: two gloo ranks against a dense float64 reference on one process.

The two-rank run is one spawned job (tests/fsdp_worker.py) shared by the tests that read its
result; the one-rank resume, the cross-rank inner product and the error messages run here, in a
world-size-1 gloo group.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hypergrad
from hypergrad.fsdp import ShardedHessianOperator, shard_like, sharded_implicit_grad, sharded_vdot
from tests import fsdp_worker
from tests.fsdp_models import inner_loss, mlp, sharded_mlp

pytestmark = pytest.mark.distributed

#: documented accuracy (docs/fsdp.md) of each route in float64, relative to the dense reference
TOL = {"exact": 1e-8, "finite_diff": 1e-6, "finite_diff_cached": 1e-5}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("fsdp2")
    method = "fork" if "fork" in mp.get_all_start_methods() and not dist.is_initialized() else "spawn"
    ctx = mp.start_processes(fsdp_worker.run, args=(2, str(out)), nprocs=2, join=False, start_method=method)
    deadline = 240.0  # seconds; the whole job takes well under a minute on an idle 2-core machine
    import time

    start = time.monotonic()
    while not ctx.join(timeout=5):
        if time.monotonic() - start > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2-rank FSDP2 worker did not finish within {deadline} s")
    return json.loads((out / "result.json").read_text()), out


@pytest.mark.parametrize("case", [f"{k}/{m}/{r}" for k, m, r in fsdp_worker.QUICK_CASES])
def test_two_ranks_match_dense_reference_on_the_concatenated_batch(two_ranks: tuple, case: str) -> None:
    result = two_ranks[0]["hypergrad"][case]
    route = case.split("/")[-1]
    assert result["status"] == "success", result
    assert result["rel_err"] <= TOL[route], f"{case}: relative error {result['rel_err']:.2e} > {TOL[route]:.0e}"
    # one backward per product, two for central differences (+ the cached/exact first-order pass, + mixed product)
    per = 2 if route == "finite_diff" else 1
    assert result["backward"] >= per * result["steps"]


def test_checkpoint_saved_by_two_ranks_resumes_on_two_ranks(two_ranks: tuple) -> None:
    errs = two_ranks[0]["checkpoint"]
    assert errs == {"params": 0.0, "hparams": 0.0, "x": 0.0}, errs


def test_checkpoint_saved_by_two_ranks_resumes_on_one_rank(two_ranks: tuple, mesh: Any) -> None:
    out = two_ranks[1]
    expected = torch.load(out / "expected.pt")
    got = fsdp_worker.load_and_step(str(out / "ckpt"), mesh, 0, 1)
    for part in expected:
        err = fsdp_worker.rel(got[part], expected[part])
        assert err <= 1e-10, f"{part}: {err:.2e}"  # only the order of floating-point sums differs
    assert fsdp_worker.rel(got["params"], {k: v + 1 for k, v in expected["params"].items()}) > 1e-3


def test_sharded_vdot_uses_one_all_reduce_for_any_number_of_leaves(mesh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    net = sharded_mlp(mesh)
    a = {k: torch.randn_like(p) for k, p in net.named_parameters()}
    b = {k: torch.randn_like(p) for k, p in net.named_parameters()}
    calls = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    got = hypergrad.tree_vdot(a, b)  # dispatches to sharded_vdot for DTensor leaves
    assert len(calls) == 1 and len(a) == 4
    ref = sum(float((a[k].full_tensor() * b[k].full_tensor()).sum()) for k in a)
    assert abs(float(got) - ref) <= 1e-12 * max(1.0, abs(ref))
    assert not isinstance(got, type(a["0.weight"]))  # a plain scalar, identical on every rank


def test_cg_on_sharded_vectors_matches_dense_solve(mesh: Any) -> None:
    net = sharded_mlp(mesh)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    op = ShardedHessianOperator(net, inner_loss, (x, y), mode="finite_diff")
    b = {k: torch.randn_like(p) for k, p in net.named_parameters()}
    sol = hypergrad.CG(max_steps=200, rtol=1e-10)(hypergrad.Damped(op, 3.0), b)
    assert sol.converged
    dense = mlp().double()
    dense.load_state_dict({k: v.full_tensor() for k, v in net.state_dict().items()})
    params = {k: v.detach() for k, v in dense.named_parameters()}
    f = lambda p: inner_loss(lambda z: torch.func.functional_call(dense, p, (z,)), {}, x, y)
    flat, unravel = hypergrad.tree_ravel(params)
    H = torch.func.hessian(lambda v: f(unravel(v)))(flat)
    rhs = hypergrad.tree_ravel({k: b[k].full_tensor() for k in params})[0]
    ref = torch.linalg.solve(H + 3.0 * torch.eye(len(flat), dtype=H.dtype), rhs)
    got = hypergrad.tree_ravel({k: sol.x[k].full_tensor() for k in params})[0]
    assert float((got - ref).norm() / ref.norm()) <= 1e-6


# ----- errors: each names the problem and the fix ----------------------------------------------


def test_error_module_not_wrapped() -> None:
    with pytest.raises(TypeError, match=r"not wrapped with torch.distributed.fsdp.fully_shard.*fully_shard\(module\)"):
        ShardedHessianOperator(mlp(), inner_loss, (torch.ones(2, 5), torch.ones(2, 3)))


def test_error_module_wrapped_inconsistently(mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    net = mlp()
    fully_shard(net[0], mesh=mesh)
    fully_shard(net, mesh=mesh)
    net[2].register_parameter("extra", torch.nn.Parameter(torch.ones(3)))  # after fully_shard: never sharded
    with pytest.raises(ValueError, match=r"wrapped inconsistently.*plain tensors inside a fully_shard-ed module.*last"):
        ShardedHessianOperator(net, inner_loss, (torch.ones(2, 5), torch.ones(2, 3)))


def test_error_mixed_ddp_and_fsdp(mesh: Any) -> None:
    ddp = nn.parallel.DistributedDataParallel(mlp())
    with pytest.raises(TypeError, match=r"mixes DistributedDataParallel.*Remove the DDP wrapper"):
        ShardedHessianOperator(nn.Sequential(ddp), inner_loss, (torch.ones(2, 5), torch.ones(2, 3)))


def test_error_solver_vector_not_sharded_like_parameters(mesh: Any) -> None:
    net = sharded_mlp(mesh)
    batch = (torch.ones(2, 5, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64))
    plain = {k: torch.zeros(p.shape, dtype=p.dtype) for k, p in net.named_parameters()}
    with pytest.raises(ValueError, match=r"`x0\['0.weight'\]` is a plain Tensor .* hypergrad.fsdp.shard_like"):
        sharded_implicit_grad(
            net, inner_loss, inner_loss, {}, inner_batch=batch, outer_batch=batch, solver=hypergrad.CG(), x0=plain
        )
    # the suggested fix works
    res = sharded_implicit_grad(
        net, inner_loss, inner_loss, {}, inner_batch=batch, outer_batch=batch,
        solver=hypergrad.CG(max_steps=2), damping=1.0, x0=shard_like(plain, net),
    )  # fmt: skip
    assert set(res.solution.x) == set(plain)
    with pytest.raises(ValueError, match="mix DTensor and plain-tensor leaves"):
        sharded_vdot(shard_like(plain, net), plain)


def test_error_unsupported_hvp_mode_and_solver(mesh: Any) -> None:
    net = sharded_mlp(mesh)
    batch = (torch.ones(2, 5, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64))
    for mode in ("fwd_rev", "rev_rev", "auto"):
        with pytest.raises(ValueError, match=rf"`mode` must be one of .* got '{mode}'.*mode='exact'"):
            ShardedHessianOperator(net, inner_loss, batch, mode=mode)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"mode='exact' needs `dense_module`"):
        ShardedHessianOperator(net, inner_loss, batch, mode="exact")
    with torch.device("meta"):
        wrong = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"`dense_module` does not match .* '0.weight'"):
        ShardedHessianOperator(net, inner_loss, batch, mode="exact", dense_module=wrong)
    with pytest.raises(ValueError, match="Dense materialises the whole Hessian"):
        sharded_implicit_grad(
            net, inner_loss, inner_loss, {}, inner_batch=batch, outer_batch=batch, solver=hypergrad.Dense()
        )


class _CubeOnce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


def test_exact_route_refuses_once_differentiable_instead_of_a_zero_hessian(mesh: Any) -> None:
    net = sharded_mlp(mesh)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)

    def cube_loss(module: nn.Module, h: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (_CubeOnce.apply(module(x)) - y).pow(2).mean()

    dense = mlp().double().to("meta")
    with pytest.raises(RuntimeError, match="once_differentiable.*finite_diff"):
        ShardedHessianOperator(net, cube_loss, (x, y), mode="exact", dense_module=dense)
