"""The toy demo: a hypergradient check table and a small hyper-parameter optimisation run.

Used by ``python -m applications.toy``; every function here uses only public :mod:`hypergrad` names.
"""

from __future__ import annotations

import csv
import time
from typing import Callable, Iterable, NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

import hypergrad
from hypergrad.testing import ToyProblem

__all__ = ["CheckRow", "HPORecord", "check_hypergradients", "format_table", "run_hpo", "relative_error"]


class CheckRow(NamedTuple):
    """One line of the check table."""

    problem: str
    method: str
    rel_error: float
    num_matvecs: int | None
    status: str
    seconds: float


class HPORecord(NamedTuple):
    """One outer step of :func:`run_hpo`."""

    problem: str
    step: int
    outer_loss: float
    hypergrad_norm: float
    num_matvecs: int


def relative_error(approx: dict[str, Tensor], exact: dict[str, Tensor]) -> float:
    r""":math:`\|a - e\| / \max(\|e\|, 10^{-300})` over the whole tree."""
    diff = hypergrad.tree_norm(hypergrad.tree_sub(approx, exact))
    return float(diff) / max(float(hypergrad.tree_norm(exact)), 1e-300)


def _methods(problem: ToyProblem, lam: dict[str, Tensor], unroll_steps: int) -> dict[str, Callable]:
    """Each method maps ``(params, hparams) -> (grad, num_matvecs or None, status)``."""
    lo, hi = problem.hessian_bounds(lam)
    lr = 1.0 / hi
    steps = int(30 * hi / lo) + 10  # Richardson needs ~kappa * log(1/tol) steps
    n = problem.num_params
    G, F = problem.inner_loss, problem.outer_loss

    def phi(p: dict, h: dict) -> dict:
        return problem.inner_step(p, h, lr)

    def implicit(solver: hypergrad.AbstractLinearSolver) -> Callable:
        def run(p: dict, h: dict) -> tuple:
            g, sol = hypergrad.implicit_grad(G, F, p, h, solver=solver)
            return g, sol.num_matvecs, sol.status.value

        return run

    def fixed_point(p: dict, h: dict) -> tuple:
        g, sol = hypergrad.fixed_point_grad(phi, F, p, h, solver=hypergrad.FixedPoint(max_steps=steps, rtol=1e-12))
        return g, sol.num_matvecs, sol.status.value

    def unrolled(p: dict, h: dict) -> tuple:
        g, _ = hypergrad.unrolled_grad(phi, F, problem.init_params(), h, num_steps=unroll_steps)
        return g, None, f"{unroll_steps} steps"

    return {
        "CG": implicit(hypergrad.CG(max_steps=2 * n, rtol=1e-12)),
        "Neumann": implicit(hypergrad.Neumann(max_steps=steps, alpha=lr, rtol=1e-12)),
        "FixedPoint": fixed_point,
        "Dense": implicit(hypergrad.Dense()),
        "Identity": implicit(hypergrad.Identity()),
        "unrolled": unrolled,
    }


def check_hypergradients(problems: Iterable[ToyProblem], unroll_steps: int = 100) -> list[CheckRow]:
    """Every method on every problem against the problem's exact hypergradient."""
    rows = []
    for problem in problems:
        lam = problem.init_hparams()
        theta = problem.inner_solution(lam)
        exact = problem.exact_hypergradient(lam)
        for name, method in _methods(problem, lam, unroll_steps).items():
            start = time.perf_counter()
            g, matvecs, status = method(theta, lam)
            rows.append(
                CheckRow(
                    type(problem).__name__, name, relative_error(g, exact), matvecs, status, time.perf_counter() - start
                )
            )
    return rows


def format_table(rows: list[CheckRow]) -> str:
    """The check table as aligned text."""
    header = f"{'problem':<18}{'method':<12}{'rel. error':>12}{'matvecs':>9}  {'status':<20}{'ms':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        mv = "-" if r.num_matvecs is None else str(r.num_matvecs)
        lines.append(f"{r.problem:<18}{r.method:<12}{r.rel_error:>12.2e}{mv:>9}  {r.status:<20}{1e3 * r.seconds:>8.1f}")
    return "\n".join(lines)


def run_hpo(
    problem: ToyProblem,
    *,
    outer_steps: int,
    lr: float,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[HPORecord]:
    r"""Gradient descent on the hyper-parameters with :func:`hypergrad.implicit_grad`.

    Each outer step solves the inner problem (closed form / Newton), computes the hypergradient
    with CG warm-started from the previous step's solution, and takes a ``torch.optim.SGD`` step.
    Returns one record per step plus a final record of the loss after the last update; ``log``
    (default: ``tqdm.write``) receives one line per step.
    """
    log = log if log is not None else tqdm.write
    lam = {k: v.clone().requires_grad_(True) for k, v in problem.init_hparams().items()}
    opt = torch.optim.SGD(lam.values(), lr=lr)
    solver = hypergrad.CG(max_steps=2 * problem.num_params, rtol=1e-10)
    name = type(problem).__name__
    records: list[HPORecord] = []
    x0 = None
    bar = tqdm(range(outer_steps), desc=f"HPO {name}", disable=not progress, leave=False)
    for step in bar:
        h = {k: v.detach() for k, v in lam.items()}
        theta = problem.inner_solution(h)
        loss = float(problem.outer_loss(theta, h))
        g, sol = hypergrad.implicit_grad(
            problem.inner_loss, problem.outer_loss, theta, h, solver=solver, x0=x0, throw=True
        )
        x0 = sol.x
        records.append(HPORecord(name, step, loss, float(hypergrad.tree_norm(g)), sol.num_matvecs))
        bar.set_postfix(outer_loss=f"{loss:.5f}", matvecs=sol.num_matvecs)
        log(
            f"  {name:<16} step {step:>3}  validation loss {loss:.6f}  |hypergrad| "
            f"{records[-1].hypergrad_norm:.2e}  HVPs {sol.num_matvecs}"
        )
        opt.zero_grad()
        for k, v in lam.items():
            v.grad = g[k].to(v.dtype)
        opt.step()
    h = {k: v.detach() for k, v in lam.items()}
    final = float(problem.outer_loss(problem.inner_solution(h), h))
    records.append(HPORecord(name, outer_steps, final, float("nan"), 0))
    return records


def write_csv(path: str, records: list[HPORecord]) -> None:
    """Write HPO records as CSV (one row per outer step)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HPORecord._fields)
        writer.writerows(records)
