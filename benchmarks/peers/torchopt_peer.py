"""TorchOpt: implicit differentiation with ``torchopt.diff.implicit.custom_root``.

The optimality condition is the inner gradient :math:`\\nabla_\\theta G(\\theta, \\lambda) = 0`
(``torch.func.grad``, as a TorchOpt user writes it); the decorated solver returns the same
precomputed :math:`\\theta^*` that hypergrad receives, so only the backward pass (TorchOpt's linear
solve on reverse-over-reverse HVPs, plus the cross term) is timed. Solvers: ``solve_cg``,
``solve_normal_cg`` (TorchOpt's default, which squares the condition number) and ``solve_inv``
with ``ns=True`` (Neumann series, step ``alpha = 1 / lambda_max``), tolerances off.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torchopt

from ..measure import synchronize
from ..problems import ProblemCase
from . import PeerRun

LIBRARY = "torchopt"


def _build(case: ProblemCase, solve: Callable) -> PeerRun:
    if case.kind != "implicit":
        raise NotImplementedError("torchopt adapter: implicit (toy) problems only")
    prob = case.problem
    theta_star = {k: v.detach().clone() for k, v in case.params.items()}
    keys, pkeys = list(case.hparams), list(case.params)

    # TorchOpt wants tensors or tuples of tensors (not dicts) as solver inputs and outputs.
    def optimality(params: tuple, hparams: tuple) -> tuple:
        g = torch.func.grad(prob.inner_loss)(dict(zip(pkeys, params)), dict(zip(keys, hparams)))
        return tuple(g[k] for k in pkeys)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def inner_solver(params: tuple, hparams: tuple) -> tuple:
        return tuple(theta_star[k].clone() for k in pkeys)

    def run() -> Any:
        hp = {k: v.detach().clone().requires_grad_(True) for k, v in case.hparams.items()}
        theta = dict(zip(pkeys, inner_solver(tuple(theta_star[k] for k in pkeys), tuple(hp[k] for k in keys))))
        loss = prob.outer_loss(theta, hp)
        grads = torch.autograd.grad(loss, [hp[k] for k in keys])
        synchronize(case.device)
        return grads

    return PeerRun(run, lambda out: dict(zip(keys, out)), 0)


def _cg(case: ProblemCase, k: int) -> PeerRun:
    run = _build(case, torchopt.linear_solve.solve_cg(maxiter=k, rtol=0.0, atol=0.0))
    run.num_hvps = k + 1  # TorchOpt evaluates A x0 even for x0 = 0
    return run


def _normal_cg(case: ProblemCase, k: int) -> PeerRun:
    run = _build(case, torchopt.linear_solve.solve_normal_cg(maxiter=k, rtol=0.0, atol=0.0))
    run.num_hvps = 2 * k + 2  # A^T A per step (A symmetric here: two HVPs), plus A^T b and A x0
    return run


def _neumann(case: ProblemCase, k: int) -> PeerRun:
    run = _build(case, torchopt.linear_solve.solve_inv(ns=True, maxiter=k, alpha=1.0 / case.lambda_max))
    run.num_hvps = k
    return run


METHODS = {"torchopt_cg": _cg, "torchopt_normal_cg": _normal_cg, "torchopt_neumann": _neumann}
