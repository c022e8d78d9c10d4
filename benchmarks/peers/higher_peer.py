"""higher: unrolled differentiation through ``K`` differentiable SGD steps (``innerloop_ctx``).

The inner parameters are wrapped in an ``nn.Module`` whose forward returns them, higher patches
it into a functional model, and ``diffopt.step`` runs ``K`` steps of SGD with learning rate
``1 / lambda_max`` from :math:`\\theta_0 = 0` (the same map and start as
:func:`hypergrad.unrolled_grad` in the registry), then the outer loss is back-propagated to
:math:`\\lambda` through all steps.
"""

from __future__ import annotations

from typing import Any

import higher
import torch
from torch import nn

from ..measure import synchronize
from ..problems import ProblemCase
from . import PeerRun

LIBRARY = "higher"


class _Params(nn.Module):
    def __init__(self, init: dict[str, torch.Tensor]):
        super().__init__()
        self.keys = list(init)
        for i, k in enumerate(self.keys):
            self.register_parameter(f"p{i}", nn.Parameter(init[k].clone()))

    def forward(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, f"p{i}") for i, k in enumerate(self.keys)}


def _unrolled(case: ProblemCase, k: int) -> PeerRun:
    if case.kind != "implicit":
        raise NotImplementedError("higher adapter: implicit (toy) problems only")
    prob = case.problem
    hkeys = list(case.hparams)
    module = _Params(prob.init_params())
    opt = torch.optim.SGD(module.parameters(), lr=1.0 / case.lambda_max)

    def run() -> Any:
        hp = {h: case.hparams[h].detach().clone().requires_grad_(True) for h in hkeys}
        with higher.innerloop_ctx(module, opt, copy_initial_weights=True) as (fmodel, diffopt):
            for _ in range(k):
                diffopt.step(prob.inner_loss(fmodel(), hp))
            loss = prob.outer_loss(fmodel(), hp)
            grads = torch.autograd.grad(loss, [hp[h] for h in hkeys])
        synchronize(case.device)
        return grads

    return PeerRun(run, lambda out: dict(zip(hkeys, out)), k)


METHODS = {"higher_unrolled": _unrolled}
