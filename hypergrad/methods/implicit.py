"""Implicit differentiation through the inner stationarity condition."""

from __future__ import annotations

from dataclasses import dataclass, field

from .._assembly import implicit_assembly
from ..operators import HVPMode
from ..solvers import CG, AbstractLinearSolver
from ._base import FailurePolicy, MethodOutput, _LinearSolveMethod, reduced_outer_grads

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
        reuse_operator: keep the Hessian operator object and serve it again while the caller's token
            is unchanged (:class:`~hypergrad.BilevelProblem` changes it with the inner and outer
            parameters and the Hessian batch). A frozen mode keeps its one-off work with it (the
            gradient graph of ``"rev_rev_cached"``, what ``"auto"`` picks when it fits, or the
            linearisation of ``"fwd_rev_linearized"``); with any mode the solver receives the same
            matvec object, so :class:`~hypergrad.RecycledLanczos` and :class:`~hypergrad.PCG` build
            their basis or preconditioner once per token (with ``"rev_rev"``: no graph kept between
            products, the reference's memory plus the solver's stored vectors).
        on_failure: what :class:`~hypergrad.BilevelProblem` does with a failed (finite) solve:
            ``"warn"`` (default: apply it with a :class:`~hypergrad.SolveFailedWarning`, counted in
            the record), ``"skip"`` (skip the outer step), ``"raise"``
            (:class:`~hypergrad.SolverError`), ``"apply"`` (apply it quietly). A non-finite solve is
            never applied (``on_nonfinite`` of the problem).

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
    on_failure: FailurePolicy = "warn"

    def __post_init__(self) -> None:
        self._check_settings("Implicit")

    def hypergradient(self, inner_fn, outer_fn, params, hparams, state, reduce, operator_key) -> MethodOutput:
        value, g_theta, g_lam = reduced_outer_grads(outer_fn, params, hparams, reduce)
        op, reused = self._operator(lambda th: inner_fn(th, hparams), params, state, operator_key)
        grad, solution = implicit_assembly(
            inner_fn,
            params,
            hparams,
            g_theta,
            g_lam,
            solver=self.solver,
            hvp_mode=self.hvp_mode,
            damping=self.damping,
            operator=op,
            reduce=reduce,
            x0=self._x0(state, g_theta),
            on_solution=self._on_solution(state, "implicit hypergradient"),
            memo=self._memo(state),
        )
        return MethodOutput(grad, value, solution, solution.num_matvecs + 1, reused)
