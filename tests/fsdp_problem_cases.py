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
#: mixed levels, BiSSL's shape: ``{"backbone": fully_shard-ed MLP, "head": plain Linear}`` (the head replicated),
#: with gradient-norm clipping on both levels (``max_grad_norm`` small enough that it clips)
MIXED_CASES = (
    "implicit/exact/mixed",
    "implicit/finite_diff/mixed",
    "implicit/exact_gathered/mixed",
    "proximal/exact/mixed",
    "proximal/finite_diff/mixed",
    "proximal/exact_gathered/mixed",
)
#: max_grad_norm of both levels in the mixed cases
CLIP = 0.05


def _inner_implicit(i: nn.Module, o: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return ((i(x * o.scale) - y) ** 2).mean()


def _outer_implicit(i: nn.Module, o: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.smooth_l1_loss(i(x * o.scale), y) + 0.1 * (o.scale**2).sum()


def _net(m: Any, x: Tensor) -> Tensor:
    """The level's network: ``head(backbone(x))`` for a mixed (dict) level, else the module itself."""
    return m["head"](m["backbone"](x)) if isinstance(m, (dict, nn.ModuleDict)) or hasattr(m, "head") else m(x)


def _inner_mixed(i: nn.Module, o: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return ((_net(i, x * o.scale) - y) ** 2).mean() if hasattr(o, "scale") else ((_net(i, x) - y) ** 2).mean()


def _outer_mixed(i: nn.Module, o: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    if hasattr(o, "scale"):  # Implicit: a mixed inner level, plain hyper-parameters
        return F.smooth_l1_loss(_net(i, x * o.scale), y) + 0.1 * (o.scale**2).sum()
    # BiSSL's upper loss: L_D(theta_P, phi) + gamma L_D(theta_D, phi), phi = the outer (plain) head
    return F.smooth_l1_loss(o["head"](i["backbone"](x)), y) + 0.5 * F.smooth_l1_loss(o["head"](o["backbone"](x)), y)


def mixed_level(dtype: torch.dtype, mesh: Optional[Any], seed: int = 0) -> dict:
    """``{"backbone": mlp (fully_shard-ed on ``mesh``), "head": Linear(3, 3)}`` (plain), seeded."""
    torch.manual_seed(seed)
    backbone, head = mlp().to(dtype), nn.Linear(3, 3).to(dtype)
    return {"backbone": backbone if mesh is None else _shard(backbone, mesh), "head": head}


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


def _build_mixed(name: str, mesh: Optional[Any]) -> hypergrad.BilevelProblem:
    method_name, route = name.split("/")[:2]
    sharded = mesh is not None
    if sharded:
        solver: Any = hypergrad.CG(max_steps=300, rtol=1e-9 if route == "finite_diff" else 1e-13)
        # "exact_gathered": hvp_mode "rev_rev" with the twin (reverse over reverse on the gathered weights)
        hvp = {"finite_diff": "finite_diff", "exact": "auto", "exact_gathered": "rev_rev"}[route]
    else:
        solver, hvp = hypergrad.Dense(), "rev_rev"
    inner = mixed_level(F64, mesh, seed=0)
    if method_name == "implicit":
        outer: Any = {"scale": nn.Parameter(torch.linspace(0.8, 1.2, 5, dtype=F64))}
        method: Any = hypergrad.Implicit(solver=solver, damping=5.0, hvp_mode=hvp, warm_start=True)
    else:
        outer = mixed_level(F64, mesh, seed=1)
        method = hypergrad.Proximal(
            lam=2.0, damping=3.0, coupling={"backbone": "backbone"}, solver=solver, hvp_mode=hvp
        )
    dense_inner = None
    if sharded and route in ("exact", "exact_gathered"):
        with torch.device("meta"):
            dense_inner = nn.ModuleDict({"backbone": mlp(), "head": nn.Linear(3, 3)}).to(F64)

    def params(level: dict) -> list:
        return [p for v in level.values() for p in ([v] if isinstance(v, nn.Parameter) else v.parameters())]

    return hypergrad.BilevelProblem(
        hypergrad.Level(inner, torch.optim.SGD(params(inner), lr=0.1, momentum=0.9), max_grad_norm=CLIP),
        hypergrad.Level(outer, torch.optim.SGD(params(outer), lr=0.5), max_grad_norm=CLIP),
        _inner_mixed,
        _outer_mixed,
        method=method,
        dense_inner=dense_inner,
    )


def build(name: str, mesh: Optional[Any]) -> hypergrad.BilevelProblem:
    if name.endswith("/mixed"):
        return _build_mixed(name, mesh)
    method_name, route = name.split("/")[:2]
    dtype, bf16 = _dtype(name), name.endswith("/bf16")
    factory = TinyTransformer if _kind(name) == "transformer" else mlp
    torch.manual_seed(0)
    inner = factory().to(dtype)
    sharded = mesh is not None
    hvp = "finite_diff" if route == "finite_diff" else "auto"
    if sharded:
        solver: Any = hypergrad.CG(max_steps=300, rtol=1e-9 if route == "finite_diff" else 1e-13)
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


def _inner_grad_norm(problem: hypergrad.BilevelProblem, batch: Any) -> float:
    """The unclipped norm of the first inner gradient (one process; the inner level is unchanged)."""
    params = problem._inner_params
    loss = problem.inner_loss(problem.inner.module, problem.outer.module, batch)
    penalty = problem.method.inner_penalty(params, problem._outer_params)
    grads = torch.autograd.grad(loss if penalty is None else loss + penalty, list(params.values()), allow_unused=True)
    return float(torch.sqrt(sum((g**2).sum() for g in grads if g is not None)))


def run_case(name: str, mesh: Optional[Any], rank: int = 0, world: int = 1, outdir: str = "") -> dict:
    problem = build(name, mesh)
    bi, bo = batches(0, rank, world, _dtype(name), _kind(name))
    inner_norm = _inner_grad_norm(problem, bi) if mesh is None else float("nan")
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
        "first_hypergrad_norm": record.hypergrad_norm,
        "first_inner_grad_norm": inner_norm,
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


# ----- the gradient norm and clipping over a mixed sharded/replicated tree ---------------------------------
def mixed_norms(mesh: Any) -> dict:
    """Norms of seeded gradients on a mixed level (sharded backbone, plain head), and the clipped gradients.

    Every rank sets the same full gradients (each keeps its shard of the sharded ones), so the norm
    must be that of the full tree: the shards summed over ranks once, the plain leaves counted once.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    from hypergrad.fsdp.clip import grad_norm64

    level = mixed_level(F64, mesh, seed=2)
    named = {f"{n}.{k}": p for n, m in level.items() for k, p in m.named_parameters()}
    g = torch.Generator().manual_seed(5)
    full_grads = {k: torch.randn(p.shape, generator=g, dtype=F64) for k, p in named.items()}
    for k, p in named.items():
        p.grad = (
            distribute_tensor(full_grads[k], p.device_mesh, p.placements)
            if isinstance(p, DTensor)
            else full_grads[k].clone()
        )
    grads = {k: p.grad for k, p in named.items()}
    out = {
        "full": full_grads,
        "sharded": sorted(k for k, p in named.items() if isinstance(p, DTensor)),
        "grad_norm64": grad_norm64(list(named.values())),
        "tree_norm": float(hypergrad.tree_norm(grads)),
        "tree_vdot": float(hypergrad.tree_vdot(grads, {k: 2 * v for k, v in grads.items()})),
    }
    hypergrad.sharded_clip_grad_norm_(list(named.values()), 1.0)
    out["clipped"] = {k: full(p.grad) for k, p in named.items()}
    return out
