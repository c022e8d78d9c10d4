"""A failed linear solve is never applied silently: functional API, bridge and BilevelProblem methods."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergrad
from hypergrad.methods import MethodState

F64 = torch.float64


def _indefinite() -> tuple:
    """G = 1/2 w^T D w - lam . w with D = diag(2, -1): CG meets negative curvature."""
    D = torch.tensor([2.0, -1.0], dtype=F64)
    G = lambda p, h: 0.5 * (D * p["w"] ** 2).sum() - (h["lam"] * p["w"]).sum()
    F = lambda p, h: 0.5 * (p["w"] ** 2).sum()
    return G, F, {"w": torch.tensor([0.5, -1.0], dtype=F64)}, {"lam": torch.tensor([1.0, 1.0], dtype=F64)}


def test_negative_curvature_warns_by_default_raises_on_request_and_applies_only_when_asked() -> None:
    G, F, p, h = _indefinite()
    solver = hypergrad.CG(max_steps=5)
    with pytest.warns(hypergrad.SolveFailedWarning, match="negative_curvature"):
        res = hypergrad.implicit_grad(G, F, p, h, solver=solver)
    assert res.solution.status is hypergrad.Status.NEGATIVE_CURVATURE
    with pytest.raises(hypergrad.SolverError, match="negative_curvature"):
        hypergrad.implicit_grad(G, F, p, h, solver=solver, on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = hypergrad.implicit_grad(G, F, p, h, solver=solver, on_failure="apply")
    assert quiet.solution.failed
    with pytest.raises(ValueError, match=r"`on_failure` must be one of \['warn', 'raise', 'apply'\]"):
        hypergrad.implicit_grad(G, F, p, h, solver=solver, on_failure="ignore")


def test_missed_tolerance_warns_by_default() -> None:
    G, F, p, h = _indefinite()
    G2 = lambda p_, h_: G(p_, h_) + 2.0 * (p_["w"] ** 2).sum()
    with pytest.warns(hypergrad.SolveFailedWarning, match="max_steps_reached"):
        res = hypergrad.implicit_grad(G2, F, p, h, solver=hypergrad.Neumann(max_steps=1, alpha=0.1, rtol=1e-12))
    assert res.solution.status is hypergrad.Status.MAX_STEPS_REACHED


def test_nonfinite_solution_is_never_returned_under_warn() -> None:
    G, F, p, h = _indefinite()
    with pytest.raises(hypergrad.SolverError, match="nonfinite"):
        hypergrad.proximal_grad(
            lambda q: G(q, h) * float("nan"), p, {"w": torch.ones(2, dtype=F64)}, lam=1.0, solver=hypergrad.CG()
        )


@pytest.mark.parametrize("method_cls", [hypergrad.Implicit, hypergrad.Proximal])
def test_methods_validate_on_failure_and_return_failed_solutions_for_the_problem(method_cls) -> None:
    extra = {"coupling": {"": ""}} if method_cls is hypergrad.Proximal else {}
    with pytest.raises(ValueError, match=r"`on_failure` must be one of \['warn', 'skip', 'raise', 'apply'\]"):
        method_cls(on_failure="ignore", **extra)
    assert method_cls(**extra).on_failure == "warn"


def test_bilevel_problem_default_warns_and_counts_and_skip_leaves_outer_unchanged() -> None:
    D = torch.tensor([2.0, -1.0], dtype=F64)

    def build(on_failure: str) -> tuple:
        w = torch.nn.Parameter(torch.tensor([0.5, -1.0], dtype=F64))
        lam = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=F64))
        level = lambda t: hypergrad.Level({"t": t}, torch.optim.SGD([t], lr=0.1))
        problem = hypergrad.BilevelProblem(
            level(w),
            level(lam),
            lambda i, o, b: 0.5 * (D * i.t**2).sum() - (o.t * i.t).sum(),
            lambda i, o, b: 0.5 * (i.t**2).sum(),
            hypergrad.Implicit(solver=hypergrad.CG(max_steps=5), on_failure=on_failure),
        )
        return problem, lam

    problem, lam = build("warn")
    with pytest.warns(hypergrad.SolveFailedWarning):
        record = problem.hypergradient(None, hessian_batch=0)
    assert record.solve_failed and record.solve.status == "negative_curvature" and problem.failed_solves == 1

    problem, lam = build("skip")
    before = lam.detach().clone()
    record = problem.step([0], None)
    assert record.skipped and record.solve_failed
    assert torch.equal(lam.detach(), before)  # the failed hypergradient was not applied


def test_method_returns_failed_solution_and_raises_only_for_nonfinite() -> None:
    G, F, p, h = _indefinite()
    out = hypergrad.Implicit(solver=hypergrad.CG(max_steps=5)).hypergradient(
        G, F, p, h, MethodState(), lambda t: t, None
    )
    assert out.solution is not None and out.solution.status is hypergrad.Status.NEGATIVE_CURVATURE
    with pytest.raises(hypergrad.NonFiniteError):
        hypergrad.Implicit(solver=hypergrad.CG(max_steps=5)).hypergradient(
            lambda q, k: G(q, k) * float("nan"), F, p, h, MethodState(), lambda t: t, None
        )
