"""Accuracy of the FSDP2 finite-difference HVPs on BiSSL's pretext Hessian (tiny preset), ReLU against GELU.

Run from the repository root (one process, a one-rank gloo mesh; a minute on 2 CPU cores)::

    python -m benchmarks.fsdp_bissl_hvp_error

The SSL model of the ``tiny`` preset (SimCLR; ResNet-18 of width 4 with BatchNorm, 8x8 grayscale
inputs, projector with BatchNorm), in train mode, batch of 16 random two-view pairs; the Hessian is
:math:`\\nabla^2_{\\theta_P} L_P` over the backbone, as in the ``--fsdp`` stage. The reference is
``hypergrad.hvp`` (reverse-over-reverse) in float64 at the same (rounded) weights; the sharded
routes run on the ``fully_shard``-ed backbone (the stage's wrapping); ``"exact_gathered"`` (the
``--fsdp`` stage's default) differentiates twice on the gathered weights. Rows: the model as it is
(ReLU) and the same model with every ReLU replaced by GELU (smooth). Printed: the relative error
``||Hv - Hv_ref|| / ||Hv_ref||``, median and maximum over 5 random directions, as a Markdown table.

ReLU makes the gradient discontinuous: a finite difference whose step moves a unit across its kink
picks up a jump that the (almost-everywhere) Hessian does not have, whatever the step. GELU has no
kink, so only truncation and rounding remain.
"""

from __future__ import annotations

import copy
import statistics

import torch
import torch.distributed as dist
from torch import nn

import hypergrad
from applications.bissl.bilevel import PretextBatch, inner_loss, local_negatives
from applications.bissl.config import get_preset
from applications.bissl.fsdp import shard_backbone
from applications.bissl.pretrain import build_pretrain_model

DIRECTIONS = 5
MODES = ("finite_diff", "finite_diff_cached", "exact_gathered")


def _model(activation: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = build_pretrain_model(get_preset("tiny"))
    if activation == "gelu":
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.ReLU):
                    setattr(parent, name, nn.GELU())
    return model.to(dtype).train()


def _rel(a: dict, b: dict) -> float:
    num = sum(float(((a[k].double() - b[k]) ** 2).sum()) for k in b)
    return (num / sum(float((b[k] ** 2).sum()) for k in b)) ** 0.5


def measure(activation: str, dtype: torch.dtype, mesh) -> dict:
    model = _model(activation, dtype)
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(16, 1, 8, 8, generator=g) for _ in range(2))
    ref_model = copy.deepcopy(model).double()
    keys = ["backbone." + k for k, _ in ref_model.backbone.named_parameters()]
    f = hypergrad.stateless(ref_model)

    def fn(p: dict) -> torch.Tensor:
        with local_negatives(ref_model):
            return f(p, x1.double(), x2.double())

    theta = {k: p.detach() for k, p in ref_model.named_parameters() if k in keys}
    shard_backbone(model.backbone, mesh)

    def loss(m: nn.Module, h: dict, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return inner_loss(m, None, PretextBatch(a, b, True))

    with torch.device("meta"):
        twin = _model(activation, dtype)
    out = {}
    for mode in MODES:
        op = hypergrad.ShardedHessianOperator(
            model, loss, (x1.to(dtype), x2.to(dtype)), mode=mode, keys=keys, dense_module=twin
        )
        errs = []
        for i in range(DIRECTIONS):
            gv = torch.Generator().manual_seed(100 + i)
            v = {k: torch.randn(t.shape, generator=gv, dtype=torch.float64) for k, t in theta.items()}
            ref = hypergrad.hvp(fn, theta, v, mode="rev_rev")
            hv = op.matvec(hypergrad.shard_like({k: t.to(dtype) for k, t in v.items()}, dict(model.named_parameters())))
            errs.append(_rel({k: t.full_tensor() for k, t in hv.items()}, ref))
        out[mode] = (statistics.median(errs), max(errs))
    return out


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        print("| activation | dtype | " + " | ".join(f"`{m}` median (max)" for m in MODES) + " |")
        print("|---|---|" + "---|" * len(MODES))
        for activation in ("relu", "gelu"):
            for dtype in (torch.float32, torch.float64):
                r = measure(activation, dtype, mesh)
                cells = " | ".join(f"{r[m][0]:.1e} ({r[m][1]:.1e})" for m in MODES)
                print(f"| {activation} | {str(dtype).replace('torch.', '')} | {cells} |", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
