"""Accuracy of each sharded HVP route per dtype, against a dense float64 Hessian-vector product.

Run from the repository root (2 gloo ranks on the CPU)::

    python -m benchmarks.fsdp_hvp_error

An MLP 10-32-32-4 (tanh) is built in float64, cast to the tested dtype and ``fully_shard``-ed over 2
ranks; each rank holds 16 of the 32 samples of a mean-squared-error loss. The reference is
``hypergrad.hvp`` (reverse-over-reverse) in float64 on one process, at the *rounded* weights and the
concatenated batch, so the error is the route's own (finite-difference truncation plus arithmetic
rounding), not the rounding of the weights. Two more rows keep float32 parameters under
``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``: the
finite-difference step from the compute dtype (what the operator does) and, for comparison, from
the stored float32 dtype. Printed: the relative error
``||Hv - Hv_ref|| / ||Hv_ref||`` (median over 5 random directions) as a Markdown table.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hypergrad

#: row name -> (stored parameter dtype, MixedPrecisionPolicy.param_dtype or None, step from the stored dtype)
DTYPES = {
    "float64": (torch.float64, None, False),
    "float32": (torch.float32, None, False),
    "bfloat16": (torch.bfloat16, None, False),
    "bf16 policy (fp32 params)": (torch.float32, torch.bfloat16, False),
    "bf16 policy, step from fp32": (torch.float32, torch.bfloat16, True),
}


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def _loss(module, h, x, y):
    return ((module(x) - y) ** 2).mean()


def _worker(rank: int, world: int, init: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 10, generator=g, dtype=torch.float64), torch.randn(32, 4, generator=g, dtype=torch.float64)
    n = 32 // world
    lines = []
    for name, (dtype, compute, old_step) in DTYPES.items():
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute else None
        kw = {"mp_policy": policy} if policy else {}
        torch.manual_seed(0)
        dense = _mlp().to(dtype)
        ref_net = _mlp().double()
        ref_net.load_state_dict({k: v.double() for k, v in dense.state_dict().items()})
        net = _mlp().to(dtype)
        net.load_state_dict(dense.state_dict())
        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh, **kw)
        fully_shard(net, mesh=mesh, **kw)
        with torch.device("meta"):
            template = _mlp().to(dtype)
        params = {k: v.detach() for k, v in ref_net.named_parameters()}

        def ref_loss(p):
            return _loss(lambda z: torch.func.functional_call(ref_net, p, (z,)), {}, x, y)

        batch = (x[rank * n : (rank + 1) * n].to(dtype), y[rank * n : (rank + 1) * n].to(dtype))
        for mode in hypergrad.SHARDED_HVP_MODES:
            if old_step and mode == "exact":
                continue
            op = hypergrad.ShardedHessianOperator(net, _loss, batch, mode=mode, dense_module=template)
            if old_step:
                op.compute_dtype = dtype  # the step from the stored dtype, as before the policy was read
            errs = []
            for seed in range(5):
                gv = torch.Generator().manual_seed(100 + seed)
                v = {k: torch.randn(p.shape, generator=gv, dtype=torch.float64) for k, p in params.items()}
                ref = hypergrad.hvp(ref_loss, params, v, mode="rev_rev")
                hv = op(hypergrad.shard_like({k: t.to(dtype) for k, t in v.items()}, net))
                full = {k: t.full_tensor().double() for k, t in hv.items()}
                num = sum(float(((full[k] - ref[k]) ** 2).sum()) for k in ref)
                den = sum(float((ref[k] ** 2).sum()) for k in ref)
                errs.append((num / den) ** 0.5)
            lines.append(f"| {name} | {mode} | {sorted(errs)[2]:.1e} | {op.num_backward} |")
    if rank == 0:
        with open(os.path.join(out, "table.md"), "w") as f:
            f.write("\n".join(lines))
    dist.destroy_process_group()


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _worker, args=(2, "file://" + os.path.join(out, "init"), out), nprocs=2, start_method="spawn"
        )
        print("| dtype | route | relative error (median of 5) | backward passes for 5 products |")
        print("|---|---|---|---|")
        print(open(os.path.join(out, "table.md")).read())


if __name__ == "__main__":
    sys.exit(main())
