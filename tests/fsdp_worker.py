"""Worker for tests/test_fsdp.py: runs on every rank of a gloo process group (spawned by pytest).

``run(rank, world, port, outdir)`` computes, on FSDP2-sharded models, the implicit and proximal
hypergradients by every sharded HVP route and compares them with a dense float64 reference computed
by the ordinary single-process API on the concatenated batch; then saves a sharded checkpoint with
torch.distributed.checkpoint, takes the next step, and resumes from the checkpoint on the same ranks.
Rank 0 writes ``result.json`` (and ``expected.pt`` for the 1-rank resume done by the test itself).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.func import functional_call

import hypergrad
from hypergrad.fsdp import (
    sharded_implicit_grad,
    sharded_proximal_grad,
    sharded_value_and_grad,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fsdp_models import TinyTransformer, data, inner_loss, mlp, outer_loss

F64 = torch.float64
DAMPING, LAM = 5.0, 5.0


def build(kind: str, mesh: Any, dtype: torch.dtype = F64, seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module]:
    """``(sharded, dense, template)``: the same initial weights, sharded and not; template on meta."""
    factory = mlp if kind == "mlp" else TinyTransformer
    torch.manual_seed(seed)
    dense = factory().to(dtype)
    sharded = factory().to(dtype)
    sharded.load_state_dict(dense.state_dict())
    blocks = list(sharded) if kind == "mlp" else [sharded.qkv, sharded.ff]
    for b in blocks:
        if any(True for _ in b.parameters()):
            fully_shard(b, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    with torch.device("meta"):
        template = factory().to(dtype)
    return sharded, dense, template


def local(t: Tensor, rank: int, world: int) -> Tensor:
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def bound(dense: nn.Module, p: dict) -> Any:
    return lambda x: functional_call(dense, p, (x,))


def rel(a: dict, b: dict) -> float:
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b)
    den = sum(float((b[k] ** 2).sum()) for k in b)
    return (num / den) ** 0.5


def full(tree: dict) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach() for k, v in tree.items()}


def hypergrad_case(kind: str, method: str, mode: str, rank: int, world: int, mesh: Any) -> dict:
    sharded, dense, template = build(kind, mesh)
    xi, yi = data(1, 8, kind, F64)
    xo, yo = data(2, 8, kind, F64)
    params = {k: v.detach() for k, v in dense.named_parameters()}
    hparams = {"scale": torch.linspace(0.8, 1.2, 5, dtype=F64)}
    exact = mode == "exact"
    solver = hypergrad.CG(max_steps=300, rtol=1e-13 if exact else 1e-9)
    batch_i, batch_o = (
        (local(xi, rank, world), local(yi, rank, world)),
        (local(xo, rank, world), local(yo, rank, world)),
    )
    if method == "implicit":
        ref = hypergrad.implicit_grad(
            lambda p, h: inner_loss(bound(dense, p), h, xi, yi),
            lambda p, h: outer_loss(bound(dense, p), h, xo, yo),
            params,
            hparams,
            solver=hypergrad.Dense(),
            damping=DAMPING,
            hvp_mode="rev_rev",
        ).grad
        res = sharded_implicit_grad(
            sharded, inner_loss, outer_loss, hparams, inner_batch=batch_i, outer_batch=batch_o,
            solver=solver, mode=mode, damping=DAMPING, dense_module=template,
        )  # fmt: skip
        got = res.grad
    else:
        g = torch.func.grad(lambda p: outer_loss(bound(dense, p), {}, xo, yo))(params)
        ref = hypergrad.proximal_grad(
            lambda p: inner_loss(bound(dense, p), {}, xi, yi), params, g, lam=LAM, solver=hypergrad.Dense()
        ).grad
        _, g_sh, _ = sharded_value_and_grad(sharded, outer_loss, batch_o)
        res = sharded_proximal_grad(
            sharded, inner_loss, g_sh, inner_batch=batch_i, lam=LAM, solver=solver, mode=mode, dense_module=template
        )
        got = full(res.grad)
    return {
        "rel_err": rel(got, ref),
        "status": res.solution.status.value,
        "steps": res.solution.num_steps,
        "backward": res.operator.num_backward,
    }


# ----- checkpoint / resume ------------------------------------------------------------------------


def bilevel_step(
    model: nn.Module, opt: Any, template: nn.Module, hparams: dict, x0: Any, step: int, rank: int, world: int
):
    """Two inner SGD-momentum steps, then a warm-started implicit hypergradient and an outer SGD step."""
    x, y = data(100 + step, 8, "mlp", F64)
    x, y = local(x, rank, world), local(y, rank, world)
    for _ in range(2):
        opt.zero_grad()
        inner_loss(model, hparams, x, y).backward()
        opt.step()
    res = sharded_implicit_grad(
        model, inner_loss, outer_loss, hparams, inner_batch=(x, y), outer_batch=(y[:, :1].repeat(1, 5), y),
        solver=hypergrad.CG(max_steps=100, rtol=1e-12), mode="exact", damping=DAMPING, x0=x0,
        dense_module=template, throw=True,
    )  # fmt: skip
    return {k: v - 0.1 * res.grad[k] for k, v in hparams.items()}, res.solution.x


def fresh(mesh: Any, seed: int) -> tuple[nn.Module, Any, nn.Module]:
    model, _, template = build("mlp", mesh, seed=seed)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), template


def load_and_step(path: str, mesh: Any, rank: int, world: int) -> dict:
    """Resume from the checkpoint in ``path`` into freshly (differently) initialised objects, take step 2."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt, template = fresh(mesh, seed=123)
    msd, osd = get_state_dict(model, opt)
    zeros = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    state = {"model": msd, "optim": osd, "hparams": {"scale": torch.zeros(5, dtype=F64)}, "x0": zeros}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    hparams, x = bilevel_step(model, opt, template, state["hparams"], state["x0"], 2, rank, world)
    return {"params": full(dict(model.named_parameters())), "hparams": hparams, "x": full(x)}


def checkpoint_case(outdir: str, mesh: Any, rank: int, world: int) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt, template = fresh(mesh, seed=0)
    hparams = {"scale": torch.linspace(0.8, 1.2, 5, dtype=F64)}
    hparams, x = bilevel_step(model, opt, template, hparams, None, 1, rank, world)
    msd, osd = get_state_dict(model, opt)
    path = os.path.join(outdir, "ckpt")
    dcp.save({"model": msd, "optim": osd, "hparams": hparams, "x0": x}, checkpoint_id=path)
    hparams, x = bilevel_step(model, opt, template, hparams, x, 2, rank, world)
    expected = {"params": full(dict(model.named_parameters())), "hparams": hparams, "x": full(x)}
    if rank == 0:
        torch.save(expected, os.path.join(outdir, "expected.pt"))
    got = load_and_step(path, mesh, rank, world)
    return {part: rel(got[part], expected[part]) for part in expected}


#: (model, method, HVP route) run by the pytest test; ``python tests/fsdp_worker.py OUT --all`` runs every case.
QUICK_CASES = (
    ("mlp", "implicit", "exact"),
    ("mlp", "implicit", "finite_diff"),
    ("mlp", "proximal", "finite_diff_cached"),
    ("transformer", "implicit", "exact"),
    ("transformer", "proximal", "finite_diff"),
)
ALL_CASES = tuple(
    (k, m, r)
    for k in ("mlp", "transformer")
    for m in ("implicit", "proximal")
    for r in ("exact", "finite_diff", "finite_diff_cached")
)


def run(rank: int, world: int, outdir: str, cases: tuple = QUICK_CASES) -> None:
    torch.set_num_threads(1)
    init = "file://" + os.path.join(os.path.abspath(outdir), "init")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        out: dict = {"hypergrad": {}}
        for kind, method, mode in cases:
            t0 = time.perf_counter()
            case = hypergrad_case(kind, method, mode, rank, world, mesh)
            out["hypergrad"][f"{kind}/{method}/{mode}"] = {**case, "seconds": time.perf_counter() - t0}
        t0 = time.perf_counter()
        out["checkpoint"] = checkpoint_case(outdir, mesh, rank, world)
        out["checkpoint_seconds"] = time.perf_counter() - t0
        if rank == 0:
            with open(os.path.join(outdir, "result.json"), "w") as f:
                json.dump(out, f, indent=1)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # manual run: python tests/fsdp_worker.py OUTDIR
    import torch.multiprocessing as mp

    mp.spawn(run, args=(2, sys.argv[1], ALL_CASES if "--all" in sys.argv else QUICK_CASES), nprocs=2)
