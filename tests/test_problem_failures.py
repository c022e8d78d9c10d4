"""BilevelProblem acts on every failed linear solve: counted always, never applied silently."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import hypergrad

A = torch.diag(torch.tensor([1.0, -2.0], dtype=torch.float64))  # an indefinite inner Hessian


def _problem(on_failure: str | None, solver: hypergrad.AbstractLinearSolver | None = None, hessian=A):
    """G(w, lam) = w^T H w / 2 - lam.w, F(w, lam) = sum(w) + |lam|^2 / 2 (closed forms below)."""
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    lam = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt_o = torch.optim.SGD([lam], lr=0.1, momentum=0.9)
    kw = {} if on_failure is None else {"on_failure": on_failure}
    method = hypergrad.Implicit(solver=solver or hypergrad.CG(max_steps=5), warm_start=True, **kw)
    problem = hypergrad.BilevelProblem(
        hypergrad.Level({"w": w}, torch.optim.SGD([w], lr=0.1)),
        hypergrad.Level({"lam": lam}, opt_o, scheduler=torch.optim.lr_scheduler.StepLR(opt_o, 1, 0.5)),
        lambda i, o, b: 0.5 * i.w @ hessian @ i.w - o.lam @ i.w,
        lambda i, o, b: i.w.sum() + 0.5 * (o.lam**2).sum(),
        method,
    )
    return problem, w, lam


def _outer_state(problem, lam) -> list:
    opt = problem.outer.optimizer
    return [
        lam.detach().clone(),
        copy.deepcopy(opt.state_dict()["state"]),
        problem.outer.scheduler.state_dict(),
        problem.outer_steps,
        problem.method_state.x0,
    ]


def _same(a: list, b: list) -> bool:
    return torch.equal(a[0], b[0]) and str(a[1]) == str(b[1]) and a[2] == b[2] and a[3] == b[3] and a[4] is b[4]


@pytest.mark.parametrize("on_failure", [None, "warn"])
def test_default_policy_warns_counts_and_applies(on_failure) -> None:
    problem, w, lam = _problem(on_failure)
    problem.inner_step(None)
    with pytest.warns(hypergrad.SolveFailedWarning, match=r"status 'negative_curvature' .* applied anyway"):
        record = problem.step([None], None)
    assert record.solve.status == "negative_curvature" and record.solve_failed and not record.skipped
    assert problem.failed_solves == record.failed_solves == 1 and problem.outer_steps == 1
    assert record.scalars()["failed_solves"] == 1.0
    assert not torch.equal(lam.detach(), torch.ones(2, dtype=torch.float64))  # it was applied


def test_skip_policy_skips_the_outer_step_and_leaves_no_trace() -> None:
    problem, w, lam = _problem("skip")
    problem.inner_step(None)
    before = _outer_state(problem, lam)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the skip is the report
        record = problem.hypergradient(None)
        assert record.skipped and "negative_curvature" in record.reason and record.solve_failed
        assert lam.grad is None
        out = problem.outer_step()
    assert out.skipped and "negative_curvature" in out.reason
    assert _same(before, _outer_state(problem, lam))  # parameters, momentum, scheduler, counter, warm start
    assert problem.failed_solves == 1 and problem.outer_skipped == 1


def test_raise_policy_raises_solver_error_and_restores_state() -> None:
    problem, w, lam = _problem("raise")
    problem.inner_step(None)
    before = _outer_state(problem, lam)
    with pytest.raises(hypergrad.SolverError, match=r"CG failed with status 'negative_curvature'"):
        problem.step([None], None)
    assert _same(before, _outer_state(problem, lam))
    assert lam.grad is None and problem.failed_solves == 1  # counted even when raising
    assert problem.inner_steps == 2  # the inner step of the step() call stays applied (the error says so)


def test_apply_policy_is_quiet_but_counted() -> None:
    problem, w, lam = _problem("apply")
    problem.inner_step(None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record = problem.step([None], None)
    assert record.solve_failed and not record.skipped and problem.failed_solves == 1 and problem.outer_steps == 1


def test_missed_tolerance_is_a_failure_and_a_plain_fixed_budget_is_not() -> None:
    spd = torch.diag(torch.tensor([1.0, 9.0], dtype=torch.float64))
    problem, w, lam = _problem("skip", solver=hypergrad.CG(max_steps=1, rtol=1e-12), hessian=spd)
    problem.inner_step(None)
    record = problem.step([None], None)
    assert record.solve.status == "max_steps_reached" and record.skipped and problem.failed_solves == 1
    problem, w, lam = _problem("skip", solver=hypergrad.CG(max_steps=1), hessian=spd)
    problem.inner_step(None)
    record = problem.step([None], None)
    assert record.solve.status == "fixed_budget" and not record.solve_failed and not record.skipped
    # with enough steps the hypergradient is the closed form: d/dlam [sum(w*) + |lam|^2/2], w* = H^-1 lam
    problem, w, lam = _problem("raise", solver=hypergrad.CG(max_steps=10, rtol=1e-14), hessian=spd)
    problem.inner_step(None)
    problem.hypergradient(None)
    expected = torch.linalg.solve(spd, torch.ones(2, dtype=torch.float64)) + lam.detach()
    assert torch.allclose(lam.grad, expected, rtol=1e-12, atol=0)


def test_skip_inside_a_meta_batch_poisons_the_accumulated_gradient() -> None:
    problem, w, lam = _problem("skip", solver=hypergrad.CG(max_steps=5))
    problem.inner_step(None)
    lam.grad = torch.ones(2, dtype=torch.float64)  # accumulated from earlier tasks
    record = problem.hypergradient(None, accumulate=True)
    assert record.skipped and lam.grad is None and problem.outer_step().skipped
