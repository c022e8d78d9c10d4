"""``BilevelProblem`` on FSDP2 (``fully_shard``) levels: two gloo ranks against one process on the concatenated batch.

The two-rank run is one spawned job (tests/fsdp_problem_worker.py) shared by the tests that read its
result; the one-process float64 references (``Dense`` solves, ``rev_rev`` HVPs), the one-rank resume and
the construction errors run here, in a world-size-1 gloo group.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import hypergrad
from tests import fsdp_problem_worker
from tests.fsdp_models import inner_loss, mlp, sharded_mlp
from tests.fsdp_problem_cases import CASES, CLIP, MIXED_CASES, TRANSFORMER_CASES, resume_then_step, run_case

pytestmark = pytest.mark.distributed

#: documented accuracy (docs/fsdp.md) of each route in float64, relative to the dense reference
TOL = {"exact": 1e-8, "exact_gathered": 1e-8, "finite_diff": 1e-6}


def rel(a: dict, b: dict) -> float:
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b)
    den = sum(float((b[k] ** 2).sum()) for k in b)
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("fsdp2_problem")
    # spawn, not fork: a parent that already ran autograd (another test module) cannot fork safely
    ctx = mp.start_processes(fsdp_problem_worker.run, args=(2, str(out)), nprocs=2, join=False, start_method="spawn")
    deadline, start = 240.0, time.monotonic()  # seconds; the job takes a few seconds on an idle machine
    while not ctx.join(timeout=2):
        if time.monotonic() - start > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2-rank FSDP2 problem worker did not finish within {deadline} s")
    return torch.load(out / "result.pt"), out


@pytest.mark.parametrize("case", CASES + TRANSFORMER_CASES + MIXED_CASES)
def test_problem_step_on_two_sharded_ranks_matches_one_process(two_ranks: tuple, case: str) -> None:
    got, ref = two_ranks[0][case], run_case(case, None)
    assert got["status"] == "success", got
    tol = TOL[case.split("/")[1]]
    # the outer step applied by step() and the hypergradient of the next call
    assert rel(got["after_step"], ref["after_step"]) <= tol
    assert rel(got["grad"], ref["grad"]) <= tol, f"{case}: {rel(got['grad'], ref['grad']):.2e}"
    assert abs(got["outer_loss"] - ref["outer_loss"]) <= tol * abs(ref["outer_loss"])  # after one outer step
    assert got["inner_losses"] == pytest.approx(ref["inner_losses"], rel=1e-12)


def test_mixed_cases_clip_both_levels() -> None:
    # the mixed cases run with max_grad_norm=CLIP on both levels: it must bind, or they would not test clipping
    for case in MIXED_CASES:
        problem_ref = run_case(case, None)
        assert problem_ref["first_hypergrad_norm"] > 2 * CLIP, case
        assert problem_ref["first_inner_grad_norm"] > 2 * CLIP, case


def test_mixed_tree_norm_and_clipping_equal_the_dense_ones(two_ranks: tuple) -> None:
    got = two_ranks[0]["mixed_norms"]
    full = got["full"]
    assert got["sharded"] and len(got["sharded"]) < len(full)  # a mixed tree: sharded and plain leaves
    dense = float(torch.sqrt(sum((g**2).sum() for g in full.values())))
    for key in ("grad_norm64", "tree_norm"):  # the plain head counted once, not world-size times
        assert got[key] == pytest.approx(dense, rel=1e-12), key
    assert got["tree_vdot"] == pytest.approx(2 * dense**2, rel=1e-12)
    params = [nn.Parameter(torch.zeros_like(g)) for g in full.values()]
    for p, g in zip(params, full.values()):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert dense > 2.0  # the clipping binds
    assert rel(got["clipped"], dict(zip(full, (p.grad for p in params)))) <= 1e-12


#: documented bound (docs/fsdp.md) of the bf16-compute hypergradient relative to the float32 one
BF16_TOL = 2e-2


def test_bf16_mixed_precision_hypergradient_within_documented_bound_of_float32(two_ranks: tuple) -> None:
    fp32, bf16 = two_ranks[0]["implicit/finite_diff/fp32"], two_ranks[0]["implicit/finite_diff/bf16"]
    ref = run_case("implicit/finite_diff", None)  # float64, one process
    ref32 = {k: v.float() for k, v in ref["grad"].items()}
    assert rel(fp32["grad"], ref32) <= 1e-4  # float32 storage and compute: finite differences in float32
    err = rel(bf16["grad"], fp32["grad"])
    assert err <= BF16_TOL, f"bf16 policy vs float32: {err:.2e}"
    assert err > 1e-6  # the policy took effect: bf16 arithmetic is visible
    assert all(v.dtype == torch.float32 for v in bf16["grad"].values())  # reduced and stored in float32


def test_checkpoint_saved_by_two_ranks_resumes_on_two_ranks(two_ranks: tuple) -> None:
    result = two_ranks[0]
    expected, resumed = result["expected"], result["resumed"]
    for part in ("inner", "outer"):
        assert rel(resumed[part], expected[part]) <= 1e-12, part
        assert rel(resumed["before_load"][part], expected[part]) > 1e-3  # the load did the work


def test_checkpoint_saved_by_two_ranks_resumes_on_one_rank(two_ranks: tuple, mesh: Any) -> None:
    expected = two_ranks[0]["expected"]
    resumed = resume_then_step(str(two_ranks[1] / "ckpt"), mesh, 0, 1)
    for part in ("inner", "outer"):
        assert rel(resumed[part], expected[part]) <= 1e-10, part  # only the order of floating-point sums differs
        assert rel(resumed["before_load"][part], expected[part]) > 1e-3


# ----- construction errors: each names the argument, the value and the fix -------------------------------
def _problem(inner: nn.Module, outer: Any, method: Any, **kw: Any) -> hypergrad.BilevelProblem:
    params = outer.values() if isinstance(outer, dict) else outer.parameters()
    return hypergrad.BilevelProblem(
        hypergrad.Level(inner, torch.optim.SGD(inner.parameters(), lr=0.1)),
        hypergrad.Level(outer, torch.optim.SGD(params, lr=0.1)),
        lambda i, o, b: inner_loss(i, {}, *b),
        lambda i, o, b: inner_loss(i, {}, *b),
        method,
        **kw,
    )


def _scale() -> dict:
    return {"scale": nn.Parameter(torch.ones(5, dtype=torch.float64))}


def test_error_unsupported_hvp_mode_under_fsdp(mesh: Any) -> None:
    for mode in ("fwd_rev", "rev_rev", "rev_rev_cached"):
        with pytest.raises(ValueError, match=rf"`hvp_mode` of Implicit is '{mode}'.*hvp_mode='auto'.*'finite_diff'"):
            _problem(sharded_mlp(mesh), _scale(), hypergrad.Implicit(hvp_mode=mode))


def test_error_unsupported_method_and_unused_dense_inner(mesh: Any) -> None:
    with pytest.raises(ValueError, match=r"`solver` Dense of Implicit materialises .* use hypergrad.CG"):
        _problem(sharded_mlp(mesh), _scale(), hypergrad.Implicit(solver=hypergrad.Dense()))
    with pytest.raises(TypeError, match=r"Unrolled is not supported .* use hypergrad.Implicit or hypergrad.Proximal"):
        _problem(sharded_mlp(mesh), _scale(), hypergrad.Unrolled())
    with torch.device("meta"):
        twin = mlp().double()
    with pytest.raises(ValueError, match=r"`dense_inner` is given but .* 'finite_diff'"):
        _problem(sharded_mlp(mesh), _scale(), hypergrad.Implicit(hvp_mode="finite_diff"), dense_inner=twin)
    with pytest.raises(ValueError, match=r"`dense_inner` is only used when the inner level is wrapped"):
        _problem(mlp().double(), _scale(), hypergrad.Implicit(), dense_inner=twin)


def test_error_levels_sharded_inconsistently(mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    with pytest.raises(ValueError, match=r"outer level holds fully_shard-ed .* inner level does not"):
        _problem(mlp().double(), sharded_mlp(mesh), hypergrad.Proximal(coupling={"": ""}))
    with pytest.raises(ValueError, match=r"Implicit under FSDP2 needs the outer level replicated"):
        _problem(sharded_mlp(mesh), sharded_mlp(mesh), hypergrad.Implicit())
    with pytest.raises(ValueError, match=r"Proximal couples the sharded inner parameter '0.weight' to the plain"):
        _problem(sharded_mlp(mesh), mlp().double(), hypergrad.Proximal(coupling={"": ""}))
    late = sharded_mlp(mesh)
    late[2].register_parameter("extra", nn.Parameter(torch.ones(3, dtype=torch.float64)))  # after fully_shard
    with pytest.raises(
        ValueError, match=r"`inner.module` is wrapped inconsistently: parameters \['2.extra'\] are plain"
    ):
        _problem(late, _scale(), hypergrad.Implicit())
    from torch.distributed.tensor import Replicate, distribute_tensor

    foreign = mlp().double()
    fully_shard(foreign[0], mesh=mesh)
    foreign[2].weight = nn.Parameter(distribute_tensor(foreign[2].weight.detach(), mesh, [Replicate()]))
    with pytest.raises(ValueError, match=r"\['2.weight'\] are DTensors that no fully_shard-ed module manages"):
        _problem(foreign, _scale(), hypergrad.Implicit())
    with pytest.raises(ValueError, match=r"Proximal couples the replicated \(plain\) inner parameter 'head.weight'"):
        _problem(mixed(mesh), mixed(mesh), hypergrad.Proximal(coupling={"head": "head"}))


def mixed(mesh: Any) -> nn.Module:
    """A partly wrapped module: ``fully_shard`` on the first layer only, the last one plain (replicated)."""
    from torch.distributed.fsdp import fully_shard

    net = nn.ModuleDict({"backbone": mlp().double(), "head": nn.Linear(3, 3).double()})
    fully_shard(net["backbone"], mesh=mesh)
    return net


def test_partly_wrapped_level_is_a_mixed_level(mesh: Any) -> None:
    from torch.distributed.tensor import DTensor

    problem = _problem(mixed(mesh), _scale(), hypergrad.Implicit())
    assert problem._sharded is not None
    kinds = {k: isinstance(p, DTensor) for k, p in problem._sharded.params.items()}
    assert kinds == {"backbone.0.weight": True, "backbone.0.bias": True, "backbone.2.weight": True,
                     "backbone.2.bias": True, "head.weight": False, "head.bias": False}  # fmt: skip


def test_error_mixed_ddp_and_fsdp_levels(mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    net = mlp().double()
    fully_shard(net[0], mesh=mesh)
    fully_shard(net, mesh=mesh)
    mixed = nn.Sequential(net, nn.parallel.DistributedDataParallel(nn.Linear(3, 3).double()))
    with pytest.raises(TypeError, match=r"`inner.module` mixes DistributedDataParallel .* Remove the DDP wrapper"):
        _problem(mixed, _scale(), hypergrad.Implicit())


def test_operator_reuse_and_warm_start_on_a_sharded_level(mesh: Any) -> None:
    torch.manual_seed(0)
    inner, outer = sharded_mlp(mesh), sharded_mlp(mesh)
    method = hypergrad.Proximal(
        lam=1.0, damping=2.0, coupling={"": ""}, solver=hypergrad.CG(max_steps=50, rtol=1e-10),
        reuse_operator=True, warm_start=True,
    )  # fmt: skip
    problem = _problem(inner, outer, method)
    assert problem._sharded is not None and problem._sharded.mode == "finite_diff_cached"
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64))
    problem.new_hessian_batch(batch)
    first = problem.hypergradient(batch)
    grad = {k: p.grad.full_tensor().clone() for k, p in outer.named_parameters()}
    op = problem.method_state.operator
    second = problem.hypergradient(batch)
    assert (first.operator_reused, second.operator_reused) == (False, True)
    assert problem.method_state.operator is op and op.num_backward == 1 + first.num_hvps + second.num_hvps
    assert first.solve is not None and second.solve is not None
    assert second.solve.num_steps < first.solve.num_steps  # warm-started at the previous solution
    assert rel({k: p.grad.full_tensor() for k, p in outer.named_parameters()}, grad) <= 1e-8
    problem.inner_step(batch)  # new inner parameters: a new operator
    assert problem.hypergradient(batch).operator_reused is False and problem.method_state.operator is not op


def test_exact_gathered_products_equal_the_dense_hessian_on_a_mixed_module(mesh: Any) -> None:
    from tests.fsdp_problem_cases import mixed_level

    level = nn.ModuleDict(mixed_level(torch.float64, mesh, seed=3))
    dense = nn.ModuleDict(mixed_level(torch.float64, None, seed=3))
    with torch.device("meta"):
        twin = nn.ModuleDict({"backbone": mlp(), "head": nn.Linear(3, 3)}).double()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)

    def loss(m: nn.Module, h: dict, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((m["head"](m["backbone"](a)) - b) ** 2).mean()

    params = {k: p.detach() for k, p in dense.named_parameters()}
    v = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in params.items()}

    def dense_loss(p: dict) -> torch.Tensor:
        out = torch.func.functional_call(dense["head"], {k[5:]: t for k, t in p.items() if k.startswith("head.")}, (
            torch.func.functional_call(dense["backbone"], {k[9:]: t for k, t in p.items() if k.startswith("backbone.")}, (x,)),
        ))  # fmt: skip
        return ((out - y) ** 2).mean()

    ref = hypergrad.hvp(dense_loss, params, v, mode="rev_rev")
    op = hypergrad.ShardedHessianOperator(level, loss, (x, y), mode="exact_gathered", dense_module=twin)
    got = op.matvec(hypergrad.shard_like(v, level))
    full = {k: t.full_tensor() if hasattr(t, "full_tensor") else t for k, t in got.items()}
    assert rel(full, ref) <= 1e-12
    assert any(hasattr(t, "full_tensor") for t in got.values()) and any(
        not hasattr(t, "full_tensor") for t in got.values()
    )


class _Attention(nn.Module):
    """One causal self-attention layer on ``F.scaled_dot_product_attention`` (fused flash kernel on CPU)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).flatten(-2))


def test_exact_gathered_products_through_causal_attention_select_the_math_backend(mesh: Any) -> None:
    """float32 attention dispatches to the CPU flash kernel, which has no double backward: the sharded
    operator must run its passes on the MATH backend itself (as the dense operators do), and agree with them."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(5)
    dense = _Attention()
    level = _Attention()
    level.load_state_dict(dense.state_dict())
    fully_shard(level, mesh=mesh)
    with torch.device("meta"):
        twin = _Attention()
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)

    def loss(m: nn.Module, h: dict, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((m(a) - b) ** 2).mean()

    params = {k: p.detach() for k, p in dense.named_parameters()}
    v = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}
    ref = hypergrad.hvp(
        lambda p: ((torch.func.functional_call(dense, p, (x,)) - y) ** 2).mean(), params, v, mode="rev_rev"
    )
    op = hypergrad.ShardedHessianOperator(level, loss, (x, y), mode="exact_gathered", dense_module=twin)
    got = op.matvec(hypergrad.shard_like(v, level))
    assert rel({k: t.full_tensor() for k, t in got.items()}, ref) <= 1e-5
