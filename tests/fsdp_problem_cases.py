"""Bilevel problems on FSDP2 levels and their one-process float64 references (tests/test_fsdp_problem.py).

``run_case(name, mesh, rank, world)`` builds the problem (sharded when ``mesh`` is given, dense
otherwise), takes one ``step()`` on each rank's slice of the batches, then one more inner step and
hypergradient, and returns the full hypergradient of that second call and the outer parameters
after the first step.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad
from tests.fsdp_models import TinyTransformer, data, mlp

F64 = torch.float64
#: name -> (method, route); route "exact" passes ``dense_inner``
CASES = ("implicit/exact", "implicit/finite_diff", "proximal/exact", "proximal/finite_diff")
#: float32 parameters, without and with ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``
PRECISION_CASES = ("implicit/finite_diff/fp32", "implicit/finite_diff/bf16")
#: a one-block pre-norm transformer (attention, LayerNorm, GELU MLP), float64
TRANSFORMER_CASES = ("implicit/finite_diff/transformer", "proximal/finite_diff/transformer")


def _inner_implicit(i: nn.Module, o: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return ((i(x * o.scale) - y) ** 2).mean()


def _outer_implicit(i: nn.Module, o: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.smooth_l1_loss(i(x * o.scale), y) + 0.1 * (o.scale**2).sum()


def _inner_proximal(i: nn.Module, o: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return ((i(x) - y) ** 2).mean()


def _outer_proximal(i: nn.Module, o: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.smooth_l1_loss(i(x), y) + 0.05 * (o(x) ** 2).mean()  # a direct term through the outer module


def full(t: Tensor) -> Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _shard(net: nn.Module, mesh: Any, bf16: bool = False) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if bf16 else {}
    for block in [net.qkv, net.ff] if isinstance(net, TinyTransformer) else [net[0]]:
        fully_shard(block, mesh=mesh, **kw)
    fully_shard(net, mesh=mesh, **kw)
    return net


def _dtype(name: str) -> torch.dtype:
    return torch.float32 if name.endswith(("/fp32", "/bf16")) else F64


def _kind(name: str) -> str:
    return "transformer" if name.endswith("/transformer") else "mlp"


def build(name: str, mesh: Optional[Any]) -> hypergrad.BilevelProblem:
    method_name, route = name.split("/")[:2]
    dtype, bf16 = _dtype(name), name.endswith("/bf16")
    factory = TinyTransformer if _kind(name) == "transformer" else mlp
    torch.manual_seed(0)
    inner = factory().to(dtype)
    sharded = mesh is not None
    hvp = "finite_diff" if route == "finite_diff" else "auto"
    if sharded:
        solver: Any = hypergrad.CG(max_steps=300, rtol=1e-13 if route == "exact" else 1e-9)
    else:
        solver, hvp = hypergrad.Dense(), "rev_rev"
    if method_name == "implicit":
        outer: Any = {"scale": nn.Parameter(torch.linspace(0.8, 1.2, 5, dtype=dtype))}
        method: Any = hypergrad.Implicit(solver=solver, damping=5.0, hvp_mode=hvp, warm_start=True)
        losses = (_inner_implicit, _outer_implicit)
    else:
        outer = factory().to(F64)
        outer.load_state_dict({k: v + 0.1 for k, v in inner.state_dict().items()})
        method = hypergrad.Proximal(lam=2.0, damping=3.0, coupling={"": ""}, solver=solver, hvp_mode=hvp)
        losses = (_inner_proximal, _outer_proximal)
        if sharded:
            outer = _shard(outer, mesh)
    if sharded:
        inner = _shard(inner, mesh, bf16)
    outer_level = hypergrad.Level(
        outer, torch.optim.SGD((outer.values() if isinstance(outer, dict) else outer.parameters()), lr=0.5)
    )
    dense_inner = None
    if sharded and route == "exact":
        with torch.device("meta"):
            dense_inner = factory().to(F64)
    return hypergrad.BilevelProblem(
        hypergrad.Level(inner, torch.optim.SGD(inner.parameters(), lr=0.1, momentum=0.9)),
        outer_level,
        *losses,
        method=method,
        dense_inner=dense_inner,
    )


def batches(step: int, rank: int, world: int, dtype: torch.dtype = F64, kind: str = "mlp") -> tuple[Any, Any]:
    """This rank's slice of the global inner and outer batches of ``step`` (8 samples each)."""

    def part(t: Tensor) -> Tensor:
        n = t.shape[0] // world
        return t[rank * n : (rank + 1) * n].to(dtype)

    xi, yi = data(10 + step, 8, kind, F64)
    xo, yo = data(20 + step, 8, kind, F64)
    return (part(xi), part(yi)), (part(xo), part(yo))


def run_case(name: str, mesh: Optional[Any], rank: int = 0, world: int = 1, outdir: str = "") -> dict:
    problem = build(name, mesh)
    bi, bo = batches(0, rank, world, _dtype(name), _kind(name))
    record = problem.step([bi], bo)
    after = {k: full(p) for k, p in problem._outer_params.items()}
    bi, bo = batches(1, rank, world, _dtype(name), _kind(name))
    problem.inner_step(bi)
    second = problem.hypergradient(bo)
    grad = {k: full(p.grad) for k, p in problem._outer_params.items()}
    return {
        "grad": grad,
        "after_step": after,
        "outer_loss": second.outer_loss,
        "inner_losses": record.inner_losses,
        "status": second.solve.status if second.solve else None,
        "steps": second.solve.num_steps if second.solve else None,
    }


# ----- checkpoint / resume through torch.distributed.checkpoint -----------------------------------
CKPT_CASE = "implicit/exact"


def _snapshot(problem: hypergrad.BilevelProblem) -> dict:
    return {
        "inner": {k: full(p) for k, p in problem._inner_params.items()},
        "outer": {k: full(p) for k, p in problem._outer_params.items()},
    }


def save_then_step(path: str, mesh: Any, rank: int, world: int) -> dict:
    """Step 0, save the problem's state with DCP to ``path``, then step 1: the parameters after step 1."""
    import torch.distributed.checkpoint as dcp

    problem = build(CKPT_CASE, mesh)
    problem.step([batches(0, rank, world)[0]], batches(0, rank, world)[1])
    dcp.save(problem.state_dict(), checkpoint_id=path)
    bi, bo = batches(1, rank, world)
    problem.step([bi], bo)
    return _snapshot(problem)


def resume_then_step(path: str, mesh: Any, rank: int, world: int) -> dict:
    """A fresh problem (moved away by a step on other data), loaded from ``path``, then step 1."""
    import torch.distributed.checkpoint as dcp

    problem = build(CKPT_CASE, mesh)
    bi, bo = batches(7, rank, world)  # fills the optimiser and warm-start state the load overwrites
    problem.step([bi], bo)
    before = _snapshot(problem)
    state = problem.state_dict()
    dcp.load(state, checkpoint_id=path)
    problem.load_state_dict(state)
    bi, bo = batches(1, rank, world)
    problem.step([bi], bo)
    return {**_snapshot(problem), "before_load": before}
