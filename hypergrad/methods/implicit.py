"""Implicit differentiation through the inner stationarity condition."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..operators import Damped, HVPMode, mixed_hvp
from ..solvers import CG, AbstractLinearSolver
from ..tree import tree_sub
from ._base import MethodOutput, _check_common, _LinearSolveMethod, check_solution, reduced_outer_grads

__all__ = ["Implicit"]


@dataclass(frozen=True)
class Implicit(_LinearSolveMethod):
    r"""Implicit differentiation: one linear solve with the inner Hessian, then the mixed product.

    .. math::

        (\nabla^2_\theta G + \mu I)\, v = \nabla_\theta F,\qquad
        \nabla_\lambda F \leftarrow \partial_\lambda F - (\partial^2_{\lambda\theta} G)\, v

    with :math:`G` on the Hessian batch and :math:`F` on the outer batch, at the current inner
    parameters (the inner steps should bring them close to :math:`\theta^*`).

    Args:
        solver: a :mod:`hypergrad.solvers` object, e.g. ``CG(max_steps=10)``.
        hvp_mode: HVP mode (:data:`hypergrad.HVP_MODES`).
        damping: :math:`\mu \ge 0` added to the Hessian.
        warm_start: start each solve from the previous outer step's :math:`v` (kept in
            ``state_dict()``).
        reuse_operator: keep the Hessian's gradient graph (mode ``"rev_rev_cached"``) while the
            inner and outer parameters and the Hessian batch are unchanged (e.g. several
            hypergradients at one point).

    Example:
        >>> import hypergrad
        >>> hypergrad.Implicit(solver=hypergrad.CG(max_steps=5), damping=0.1).damping
        0.1
    """

    solver: AbstractLinearSolver = field(default_factory=lambda: CG(max_steps=10))
    hvp_mode: HVPMode = "auto"
    damping: float = 0.0
    warm_start: bool = False
    reuse_operator: bool = False

    def __post_init__(self) -> None:
        _check_common("Implicit", self.solver, self.hvp_mode, self.damping, self.warm_start, self.reuse_operator)

    def hypergradient(self, inner_fn, outer_fn, params, hparams, state, reduce, operator_key) -> MethodOutput:
        value, g_theta, g_lam = reduced_outer_grads(outer_fn, params, hparams, reduce)
        op, reused = self._operator(lambda th: inner_fn(th, hparams), params, state, operator_key)
        matvec: Any = lambda v: reduce(op(v))
        if self.damping > 0:
            matvec = Damped(matvec, self.damping)
        solution = self.solver(matvec, g_theta, self._x0(state, g_theta))
        check_solution(solution, "implicit hypergradient")
        self._store_x0(state, solution)
        cross_mode = "rev_rev" if op.mode in ("rev_rev", "rev_rev_cached") else self.hvp_mode
        cross = reduce(mixed_hvp(inner_fn, params, hparams, solution.x, mode=cross_mode))
        return MethodOutput(tree_sub(g_lam, cross), value, solution, solution.num_matvecs + 1, reused)
