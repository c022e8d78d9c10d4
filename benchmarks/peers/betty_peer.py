"""Betty (betty-ml): its Neumann and CG hypergradient functions from ``betty.hypergradient``.

Betty runs these inside its ``Engine``/``Problem`` machinery; here they are called directly with a
minimal stand-in for the two ``Problem`` objects (the attributes the functions read:
``config``, ``paths``, ``cur_batch``, ``training_step_exec``, ``trainable_parameters``,
``parameters``), so that the timed work is Betty's own hypergradient code: one double-backward
graph of :math:`\\nabla_\\theta G`, ``K`` HVPs through it, and the cross term. The outer gradient
:math:`\\nabla_\\theta F` and :math:`\\partial_\\lambda F` are computed as Betty's ``get_grads``
does. Settings: Neumann step ``alpha = 1 / lambda_max``; CG with ``cg_alpha = 1``.

Betty's ``cg`` updates the search direction with the old residual (``p_new = r + beta p`` with
``r`` from before the step), so it is not the conjugate gradient method and does not converge to
the solution; the benchmark reports what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from betty.hypergradient import cg as betty_cg
from betty.hypergradient import neumann as betty_neumann

from ..measure import synchronize
from ..problems import ProblemCase
from . import PeerRun

LIBRARY = "betty-ml"


@dataclass
class _Config:
    cg_iterations: int = 10
    cg_alpha: float = 1.0
    neumann_iterations: int = 10
    neumann_alpha: float = 1.0


class _Level:
    """The slice of ``betty.problems.Problem`` that Betty's hypergradient functions use."""

    def __init__(self, params: list[torch.Tensor], loss: Callable[[], torch.Tensor] | None, config: _Config):
        self._params, self._loss, self.config = params, loss, config
        self.paths: list = []
        self.cur_batch = None

    def training_step_exec(self, batch: Any) -> torch.Tensor:
        return self._loss()

    def trainable_parameters(self) -> list[torch.Tensor]:
        return self._params

    def parameters(self) -> list[torch.Tensor]:
        return self._params


def _build(case: ProblemCase, fn: Callable, config: _Config) -> PeerRun:
    if case.kind != "implicit":
        raise NotImplementedError("betty adapter: implicit (toy) problems only")
    prob = case.problem
    pkeys, hkeys = list(case.params), list(case.hparams)

    def run() -> Any:
        theta = {k: case.params[k].detach().clone().requires_grad_(True) for k in pkeys}
        hp = {k: case.hparams[k].detach().clone().requires_grad_(True) for k in hkeys}
        inner = _Level([theta[k] for k in pkeys], lambda: prob.inner_loss(theta, hp), config)
        outer = _Level([hp[k] for k in hkeys], None, config)
        f = prob.outer_loss(theta, hp)
        grads = torch.autograd.grad(f, [theta[k] for k in pkeys] + [hp[k] for k in hkeys], allow_unused=True)
        vector = [g if g is not None else torch.zeros_like(theta[k]) for g, k in zip(grads[: len(pkeys)], pkeys)]
        direct = [g if g is not None else torch.zeros_like(hp[k]) for g, k in zip(grads[len(pkeys) :], hkeys)]
        implicit = fn(vector, inner, outer, False)
        out = [d + (i if i is not None else 0.0) for d, i in zip(direct, implicit)]
        synchronize(case.device)
        return out

    return PeerRun(run, lambda out: dict(zip(hkeys, out)), 0)


def _neumann(case: ProblemCase, k: int) -> PeerRun:
    run = _build(case, betty_neumann, _Config(neumann_iterations=k, neumann_alpha=1.0 / case.lambda_max))
    run.num_hvps = k
    return run


def _cg(case: ProblemCase, k: int) -> PeerRun:
    run = _build(case, betty_cg, _Config(cg_iterations=k, cg_alpha=1.0))
    run.num_hvps = k
    return run


METHODS = {"betty_cg": _cg, "betty_neumann": _neumann}
