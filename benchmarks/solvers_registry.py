r"""The method registry: every hypergrad hypergradient method the benchmarks time.

A :class:`Method` turns a :class:`~benchmarks.problems.ProblemCase` and an iteration budget
:math:`K` into a zero-argument callable that computes the hypergradient, so that the timed call
contains only the hypergradient (the inner solution is computed once, outside the timer). Every
solver in the library's registry (:func:`hypergrad.registered_solvers`) appears here automatically,
configured by its registry factory for the case's spectrum and budget (``tests/test_registry.py``
checks that a new registry line reaches this table).

Budgets: ``K`` is the solver's ``max_steps`` (one HVP per step for CG/Neumann, one VJP of the
inner step for FixedPoint, one differentiated inner step for unrolling). Tolerances are off
(``rtol = atol = 0``): fixed budgets, no host sync inside the loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

import hypergrad

from .problems import ProblemCase

__all__ = ["Method", "METHODS", "RunResult", "methods_for"]


@dataclass
class RunResult:
    """What one hypergradient call returned, normalised for the benchmarks."""

    grad: dict[str, Tensor]
    num_hvps: int
    num_steps: int
    residual_norm: float | None
    status: str
    x: Any = None
    setup_matvecs: int = 0


@dataclass(frozen=True)
class Method:
    """A hypergradient method and how to build it for a problem and a budget.

    Attributes:
        name: registry key (``"cg"``, ``"neumann"``, ...).
        kind: ``"implicit"`` (a linear solver in :func:`hypergrad.implicit_grad` /
            :func:`hypergrad.proximal_grad`), ``"fixed_point"`` or ``"unrolled"``.
        solver: ``solver(K, case) -> AbstractLinearSolver`` for implicit and fixed-point kinds.
        hvp_mode: passed as ``hvp_mode``.
        uses_budget: False for methods whose cost does not depend on ``K`` (Dense, Identity).
        solver_class: the hypergrad solver class this entry covers (for the coverage check).
    """

    name: str
    kind: str
    solver: Callable[[int, ProblemCase], hypergrad.AbstractLinearSolver] | None = None
    hvp_mode: str = "auto"
    uses_budget: bool = True
    solver_class: type | None = None

    def applies_to(self, kind: str) -> bool:
        """Whether the method makes sense for a case of ``kind`` (proximal systems have no inner step)."""
        return kind == "implicit" or self.kind == "implicit"

    def build(self, case: ProblemCase, budget: int, x0: Any = None) -> Callable[[], RunResult]:
        """A zero-argument callable computing the hypergradient of ``case`` with budget ``budget``."""
        if not self.applies_to(case.kind):
            raise ValueError(f"method {self.name!r} ({self.kind}) does not apply to {case.kind} case {case.name!r}.")
        if self.kind == "unrolled":
            return _unrolled(case, budget)
        solver = self.solver(budget, case)
        if self.kind == "fixed_point":
            return _fixed_point(case, solver, x0)
        if case.kind == "proximal":
            return _proximal(case, solver, self.hvp_mode, x0)
        return _implicit(case, solver, self.hvp_mode, x0)


def _result(grad: dict[str, Tensor], sol: hypergrad.Solution) -> RunResult:
    setup = int(sol.stats.get("setup_matvecs", 0))
    return RunResult(grad, sol.num_matvecs, sol.num_steps, sol.residual_norm, sol.status.value, sol.x, setup)


def _implicit(case: ProblemCase, solver: Any, mode: str, x0: Any) -> Callable[[], RunResult]:
    prob = case.problem

    def run() -> RunResult:
        g, sol = hypergrad.implicit_grad(
            prob.inner_loss,
            prob.outer_loss,
            case.params,
            case.hparams,
            solver=solver,
            hvp_mode=mode,
            x0=x0,
            validate=False,
        )
        return _result(g, sol)

    return run


def _proximal(case: ProblemCase, solver: Any, mode: str, x0: Any) -> Callable[[], RunResult]:
    def run() -> RunResult:
        g, sol = hypergrad.proximal_grad(
            case.loss, case.params, case.outer_grad, lam=case.lam, solver=solver, hvp_mode=mode, x0=x0
        )
        return _result(g, sol)

    return run


def _fixed_point(case: ProblemCase, solver: Any, x0: Any) -> Callable[[], RunResult]:
    prob, lr = case.problem, 1.0 / case.lambda_max

    def phi(p: dict[str, Tensor], h: dict[str, Tensor]) -> dict[str, Tensor]:
        return prob.inner_step(p, h, lr)

    def run() -> RunResult:
        g, sol = hypergrad.fixed_point_grad(
            phi, prob.outer_loss, case.params, case.hparams, solver=solver, symmetric=True, x0=x0
        )
        return _result(g, sol)

    return run


def _unrolled(case: ProblemCase, budget: int) -> Callable[[], RunResult]:
    prob, lr = case.problem, 1.0 / case.lambda_max
    theta0 = prob.init_params()

    def run() -> RunResult:
        g, _ = hypergrad.unrolled_grad(
            lambda p, h: prob.inner_step(p, h, lr), prob.outer_loss, theta0, case.hparams, num_steps=budget
        )
        return RunResult(g, budget, budget, None, "fixed_budget")

    return run


def _snake(name: str) -> str:
    """``FixedPoint`` -> ``fixed_point``, ``MINRES`` -> ``minres``, ``RecycledLanczos`` -> ``recycled_lanczos``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _registered(spec: hypergrad.SolverSpec) -> Method:
    """The benchmark entry of a registered solver: built through its registry factory."""

    def solver(k: int, case: ProblemCase) -> hypergrad.AbstractLinearSolver:
        info = hypergrad.SystemInfo(case.lambda_min, case.lambda_max, case.num_params, rtol=0.0, max_steps=k)
        return spec.build(info)

    kind = "fixed_point" if "unit_step" in spec.tags else "implicit"
    return Method(_snake(spec.name), kind, solver, uses_budget="iterative" in spec.tags, solver_class=spec.load())


# Every registered solver (hypergrad.registered_solvers(): the library's one registry), plus the
# benchmark-only variants: CG on the cached reverse graph, and unrolled differentiation.
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        *(_registered(spec) for spec in hypergrad.registered_solvers()),
        Method(
            "cg_cached",
            "implicit",
            lambda k, c: hypergrad.CG(max_steps=k),
            hvp_mode="rev_rev_cached",
            solver_class=hypergrad.CG,
        ),
        Method("unrolled", "unrolled"),
    ]
}


def methods_for(kind: str) -> list[str]:
    """Names of the methods that apply to problems of ``kind`` (``"implicit"`` or ``"proximal"``)."""
    return [name for name, m in METHODS.items() if m.applies_to(kind)]
