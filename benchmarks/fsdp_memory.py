"""Peak memory per rank of one implicit hypergradient: FSDP2-sharded vs replicated (DDP-style), 1/2/4 ranks.

Run (CPU, gloo; every configuration in fresh processes so the peaks do not mix)::

    python -m benchmarks.fsdp_memory --world 1 2 4 --width 2048 --depth 6   # from the repository root

Model: an MLP of ``depth`` square ``width x width`` layers (``--width 2048 --depth 6``: 25.2M
parameters, 101 MB in float32), a per-input-feature scale as the outer parameter, batch of 8 per
rank, ``CG(max_steps=3)`` with damping 1. Strategies:

* ``fsdp/finite_diff``: ``fully_shard`` per layer, built on the meta device and materialised shard by
  shard (no rank ever holds the full model), :func:`hypergrad.sharded_implicit_grad` with
  ``mode="finite_diff"``.
* ``fsdp/exact``: the same with ``mode="exact"`` (double backward through DTensor).
* ``replicated``: every rank holds the full model (what DDP does) and runs hypergrad's ordinary
  route: :class:`hypergrad.HessianOperator` (forward-over-reverse) whose products are averaged over
  ranks with :func:`hypergrad.distributed.all_reduce_mean`, :class:`hypergrad.CG`, then
  :func:`hypergrad.mixed_hvp`.

Measured: the peak resident set size of each rank (``resource.getrusage(RUSAGE_SELF).ru_maxrss``,
which counts every tensor allocation made by PyTorch's CPU allocator) minus the resident set size
right before the model is built (after imports and process-group start), with glibc's mmap threshold fixed
at 128 KiB so that freed tensors leave the resident set at once. Printed as a Markdown
table (the maximum over ranks) and as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hypergrad


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _mlp(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers)


def _loss(module, h, x, y):
    return ((module(x * h["scale"]) - y) ** 2).mean()


def _worker(rank: int, world: int, init: str, strategy: str, width: int, depth: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(8, width, generator=g), torch.randn(8, width, generator=g)
    hparams = {"scale": torch.ones(width)}
    base = _rss_mb()
    t0 = time.perf_counter()
    if strategy.startswith("fsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        with torch.device("meta"):
            net = _mlp(width, depth)
            template = _mlp(width, depth)
        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        net.to_empty(device="cpu")
        with torch.no_grad():
            for p in net.parameters():
                p.to_local().normal_(0.0, width**-0.5, generator=g)  # type: ignore[attr-defined]
        res = hypergrad.sharded_implicit_grad(
            net, _loss, _loss, hparams, inner_batch=(x, y), outer_batch=(x, y),
            solver=hypergrad.CG(max_steps=3), mode=strategy.split("/")[1], damping=1.0, dense_module=template,
        )  # fmt: skip
        grad = res.grad
        local_params = sum(p.to_local().numel() for p in net.parameters())  # type: ignore[attr-defined]
    else:
        net = _mlp(width, depth)
        params = {k: v.detach() for k, v in net.named_parameters()}

        def inner(p, h):
            return _loss(lambda z: torch.func.functional_call(net, p, (z,)), h, x, y)

        gp, gh = torch.func.grad(inner, argnums=(0, 1))(params, hparams)
        gp, gh = hypergrad.distributed.all_reduce_mean(gp), hypergrad.distributed.all_reduce_mean(gh)
        op = hypergrad.HessianOperator(lambda p: inner(p, hparams), params, mode="fwd_rev")
        sol = hypergrad.CG(max_steps=3)(
            hypergrad.Damped(lambda v: hypergrad.distributed.all_reduce_mean(op(v)), 1.0), gp
        )
        cross = hypergrad.distributed.all_reduce_mean(hypergrad.mixed_hvp(inner, params, hparams, sol.x))
        grad = hypergrad.tree_sub(gh, cross)
        local_params = sum(p.numel() for p in params.values())
    seconds = time.perf_counter() - t0
    assert all(bool(torch.isfinite(v).all()) for v in grad.values())
    row = {"strategy": strategy, "world": world, "rank": rank, "peak_mb": _peak_mb() - base, "base_mb": base,
           "local_params": local_params, "seconds": seconds}  # fmt: skip
    with open(os.path.join(out, f"{strategy.replace('/', '_')}_{world}_{rank}.json"), "w") as f:
        json.dump(row, f)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--strategies", nargs="+", default=["replicated", "fsdp/finite_diff", "fsdp/exact"])
    args = ap.parse_args(argv)
    # Make glibc return every freed tensor of 128 KiB or more to the OS at once (a fixed mmap threshold instead
    # of the dynamic one, which grows and leaves freed blocks in the heap): the resident set then follows the
    # live tensors, and its peak is the peak of tensor memory plus the fixed process overhead. Inherited by the
    # spawned ranks, which read it at start-up.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    n = args.depth * (args.width**2 + args.width)
    print(f"MLP {args.depth} x {args.width}: {n / 1e6:.1f}M parameters ({4 * n / 2**20:.0f} MiB float32)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for world in args.world:
            for strategy in args.strategies:
                init = "file://" + os.path.join(out, f"init_{strategy.replace('/', '_')}_{world}")
                mp.start_processes(
                    _worker,
                    args=(world, init, strategy, args.width, args.depth, out),
                    nprocs=world,
                    start_method="spawn",
                )
                ranks = [
                    json.load(open(os.path.join(out, f"{strategy.replace('/', '_')}_{world}_{r}.json")))
                    for r in range(world)
                ]
                row = max(ranks, key=lambda r: r["peak_mb"])
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| strategy | ranks | parameters per rank | peak memory per rank (MiB) | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['strategy']} | {r['world']} | {r['local_params'] / 1e6:.1f}M | {r['peak_mb']:.0f} | {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
