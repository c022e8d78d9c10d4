"""One assembly underneath everything: the functional API, the methods and the autograd bridge agree.

On every reference problem (float64) the three entry points give the same hypergradient to 1e-12
(they run the same assembly, :func:`hypergrad._assembly.root_vjp`), and each matches the closed
form / dense formula of the problem to 1e-8.
"""

from __future__ import annotations

import pytest
import torch

import hypergrad
from hypergrad.methods import MethodState
from hypergrad.testing import LogisticProblem, QuadraticProblem, RidgeProblem

F64 = torch.float64
PROBLEMS = {"quadratic": QuadraticProblem, "ridge": RidgeProblem, "logistic": LogisticProblem}


def _rel(a: dict, b: dict) -> float:
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b) ** 0.5
    return num / max(sum(float((b[k] ** 2).sum()) for k in b) ** 0.5, 1e-300)


def _identity(tree: dict) -> dict:
    return tree


def _solver() -> hypergrad.CG:
    return hypergrad.CG(max_steps=200, rtol=1e-14)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_functional_method_and_bridge_agree_and_match_closed_form(name: str) -> None:
    prob = PROBLEMS[name]()
    lam = prob.init_hparams()
    theta = prob.inner_solution(lam)
    exact = prob.exact_hypergradient(lam)

    functional = hypergrad.implicit_grad(prob.inner_loss, prob.outer_loss, theta, lam, solver=_solver())
    method = hypergrad.Implicit(solver=_solver())
    out = method.hypergradient(prob.inner_loss, prob.outer_loss, theta, lam, MethodState(), _identity, None)

    assert functional.solution.converged and out.solution is not None and out.solution.converged
    assert _rel(functional.grad, exact) <= 1e-8
    assert _rel(out.grad, functional.grad) <= 1e-12
    bridge = _bridge_hypergradient(prob, lam, theta)
    assert _rel(bridge, exact) <= 1e-8
    assert _rel(bridge, functional.grad) <= 1e-12


def _bridge_hypergradient(prob, lam: dict, theta: dict) -> dict:
    """``custom_root`` around the problem's own inner solver, then ``.backward()``."""

    def optimality(params: dict, hparams: dict) -> dict:
        return torch.func.grad(prob.inner_loss)(params, hparams)

    @hypergrad.custom_root(optimality, solver=_solver(), symmetric=True)
    def inner(hparams: dict) -> dict:
        return theta  # the inner solution, computed beforehand (any solver would do)

    h = {k: v.clone().requires_grad_(True) for k, v in lam.items()}
    params = inner(h)
    prob.outer_loss(params, h).backward()
    assert inner.last_solution is not None and inner.last_solution.converged
    return {k: v.grad for k, v in h.items()}


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_proximal_functional_and_method_agree(name: str) -> None:
    """Proximal: hypergrad.proximal_grad and hypergrad.Proximal run one assembly (1e-12), dense formula (1e-8)."""
    prob = PROBLEMS[name]()
    lam = prob.init_hparams()
    theta = prob.inner_solution(lam)
    g = {k: torch.randn(v.shape, dtype=F64) for k, v in theta.items()}
    lam_p, damping = 0.7, 0.3
    L = lambda p: prob.inner_loss(p, lam)
    functional = hypergrad.proximal_grad(L, theta, g, lam=lam_p + damping, solver=_solver())
    method = hypergrad.Proximal(lam=lam_p, damping=damping, coupling={"": ""}, solver=_solver())
    outer_params = {k: v.clone() for k, v in theta.items()}

    def outer_fn(p: dict, h: dict) -> torch.Tensor:
        return sum((p[k] * g[k]).sum() for k in p)  # grad_theta F = g, no direct outer term

    out = method.hypergradient(lambda p, h: L(p), outer_fn, theta, outer_params, MethodState(), _identity, None)
    assert _rel(out.grad, functional.grad) <= 1e-12
    H = prob.inner_hessian(theta, lam)
    flat_g = torch.cat([g[k].reshape(-1) for k in theta])
    n = flat_g.numel()
    expected = (lam_p + damping) * torch.linalg.solve(H + (lam_p + damping) * torch.eye(n, dtype=F64), flat_g)
    got = torch.cat([functional.grad[k].reshape(-1) for k in theta])
    assert float((got - expected).norm()) <= 1e-8 * float(expected.norm())
