"""One FSDP2 hypergradient against one FSDP2 training step of the same model: time and peak memory per rank.

Run under ``torchrun`` (NCCL on CUDA, gloo on the CPU), from the repository root::

    torchrun --nproc-per-node 1 -m benchmarks.fsdp_step_time --device cuda --width 4096 --depth 8

Model: an MLP of ``depth`` square ``width x width`` layers with tanh, every linear layer and the whole
model wrapped by ``fully_shard`` on a one-dimensional mesh over all ranks, a per-input-feature scale
as the outer parameter, a batch of ``--batch`` rows per rank. Rows, each timed side by side in one
process (median of ``--reps`` after one warm-up; CUDA: synchronised; peak: ``max_memory_allocated``
above what was allocated before, the maximum over ranks):

* ``train step``: forward, backward and ``torch.optim.SGD.step`` of the sharded model (the unit);
* ``hypergradient[mode]``: :func:`hypergrad.sharded_implicit_grad` with ``CG(max_steps=--cg)`` and
  damping 1 for each HVP route of :data:`hypergrad.fsdp.SHARDED_HVP_MODES` asked for (``--modes``);
  its result is checked finite, and every route is compared with ``exact_gathered`` (relative error).

The ratio ``time / train step`` is what one hypergradient costs in training steps of the same model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hypergrad
from benchmarks.measure import rel_error, synchronize


def _mlp(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers)


def _loss(module: Any, h: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((module(x * h["scale"]) - y) ** 2).mean()


def _timed(call: Callable[[], Any], reps: int, dev: torch.device) -> tuple[float, int, Any]:
    """``(median s, peak bytes above the start, last result)``: one warm-up, then ``reps`` timed calls."""
    out = call()
    synchronize(dev)
    if dev.type == "cuda":
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        out = call()
        synchronize(dev)
        ts.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(dev) - base if dev.type == "cuda" else 0
    return statistics.median(ts), peak, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cg", type=int, default=5, help="CG steps of the hypergradient")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=list(hypergrad.fsdp.SHARDED_HVP_MODES))
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dev.type, (world,))
    torch.manual_seed(0)  # the same model on every rank before sharding
    net, template = _mlp(args.width, args.depth).to(dev), _mlp(args.width, args.depth).to(dev)
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.width, generator=g).to(dev)
    y = torch.randn(args.batch, args.width, generator=g).to(dev)
    hparams = {"scale": torch.ones(args.width, device=dev)}
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: every row sees the same weights

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        _loss(net, hparams, x, y).backward()
        opt.step()

    rows = []
    t_train, m_train, _ = _timed(train_step, args.reps, dev)
    opt.zero_grad(set_to_none=True)
    rows.append(("train step", t_train, m_train, float("nan")))
    results = {}
    for mode in args.modes:

        def hypergradient(mode: str = mode) -> dict:
            res = hypergrad.sharded_implicit_grad(
                net, _loss, _loss, hparams, inner_batch=(x, y), outer_batch=(x, y),
                solver=hypergrad.CG(max_steps=args.cg), mode=mode, damping=1.0, dense_module=template,
            )  # fmt: skip
            return res.grad

        try:
            t, m, grad = _timed(hypergradient, args.reps, dev)
        except Exception as err:  # a route that fails here is reported, not dropped
            rows.append((f"hypergradient[{mode}] FAILED: {type(err).__name__}: {str(err)[:120]}", 0.0, 0, 0.0))
            continue
        if not all(bool(torch.isfinite(v).all()) for v in grad.values()):
            raise SystemExit(f"hypergradient[{mode}] is not finite")
        results[mode] = grad
        rows.append((f"hypergradient[{mode}]", t, m, 0.0))
    ref = results.get("exact_gathered")
    n = args.depth * (args.width**2 + args.width)
    if rank == 0:
        where = torch.cuda.get_device_name(dev) if cuda else f"cpu, threads {torch.get_num_threads()}"
        print(
            f"\nFSDP2 on {world} rank(s), {'nccl' if cuda else 'gloo'}, {where}, torch {torch.__version__}; MLP "
            f"{args.depth} x {args.width} ({n / 1e6:.1f}M parameters), batch {args.batch}/rank, CG({args.cg}), "
            f"median of {args.reps}"
        )
        print("| row | ms | time / train step | peak MiB | rel. err vs exact_gathered |\n|---|---|---|---|---|")
        for name, t, m, _ in rows:
            mode = name[len("hypergradient[") : -1] if name.startswith("hypergradient[") else None
            err = rel_error(results[mode], ref) if mode in results and ref is not None else float("nan")
            print(f"| {name} | {1e3 * t:.2f} | {t / t_train:.2f} | {m / 2**20:.0f} | {err:.1e} |", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
