"""The linear-solver protocol: ``solver(matvec, b, x0=None) -> Solution``.

Every solver in :mod:`hypergrad.solvers` solves :math:`A x = b` for a linear map ``matvec``
(:math:`v \\mapsto A v`) on parameter trees, is a frozen dataclass whose fields are its settings
(validated at construction), and reports what happened in a :class:`Solution` instead of failing
silently. The caller decides whether a failure raises (:meth:`Solution.raise_if_failed`).
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from .._typing import MatVec, TreeOrTensor
from ..tree import tree_check_like, tree_sub, tree_zeros_like

__all__ = ["AbstractLinearSolver", "Solution", "Status", "SolverError", "check_solver"]


class Status(enum.Enum):
    """Outcome of a linear solve. ``failed`` statuses carry a remedy in :attr:`message`.

    ``SUCCESS``: the tolerance was reached. ``FIXED_BUDGET``: no tolerance was asked for and the
    budget was spent. The others (``MAX_STEPS_REACHED``, ``NONFINITE``, ``NEGATIVE_CURVATURE``,
    ``DIVERGED``, ``SINGULAR``) are failures.

    Example:
        >>> from hypergrad import Status
        >>> Status.FIXED_BUDGET.failed, Status.DIVERGED.failed
        (False, True)
        >>> Status.DIVERGED.message.startswith("The residual grew")
        True
    """

    SUCCESS = "success"
    FIXED_BUDGET = "fixed_budget"
    MAX_STEPS_REACHED = "max_steps_reached"
    NONFINITE = "nonfinite"
    NEGATIVE_CURVATURE = "negative_curvature"
    DIVERGED = "diverged"
    SINGULAR = "singular"

    @property
    def failed(self) -> bool:
        """``True`` for the statuses after which the solution should not be trusted.

        Returns:
            ``False`` for ``SUCCESS`` and ``FIXED_BUDGET``, ``True`` otherwise.
        """
        return self not in (Status.SUCCESS, Status.FIXED_BUDGET)

    @property
    def message(self) -> str:
        """What happened and how to fix it.

        Returns:
            One or two sentences, with a remedy for the failed statuses.
        """
        return _MESSAGES[self]


_MESSAGES = {
    Status.SUCCESS: "The requested tolerance was reached.",
    Status.FIXED_BUDGET: (
        "No tolerance was requested (rtol = atol = 0): the solver ran its fixed budget of "
        "`max_steps`; see `residual_norm` for the accuracy reached."
    ),
    Status.MAX_STEPS_REACHED: (
        "The tolerance was not reached within `max_steps`. Try increasing `max_steps`, loosening "
        "`rtol`/`atol`, adding damping with `hypergrad.Damped(operator, mu)`, or warm-starting with "
        "`x0`."
    ),
    Status.NONFINITE: (
        "A non-finite value (NaN or Inf) appeared in the solve. Check that the losses and the inner "
        "solution are finite, lower the learning rates, add damping with `hypergrad.Damped`, or run "
        "in float64 to rule out overflow."
    ),
    Status.NEGATIVE_CURVATURE: (
        "CG met a direction p with p^T A p <= 0: the operator is not positive definite here (the "
        "inner problem is not at a strict minimum, or is non-convex). Add damping with "
        "`hypergrad.Damped(operator, mu)`, run more inner steps, or use `Neumann`/`FixedPoint`."
    ),
    Status.DIVERGED: (
        "The residual grew instead of shrinking. For `Neumann` the step `alpha` must satisfy "
        "alpha < 2 / lambda_max(A): lower `alpha`. For `FixedPoint` the map must be a contraction: "
        "lower the inner learning rate or add damping."
    ),
    Status.SINGULAR: (
        "The materialised operator is singular, so `Dense` cannot solve it. Add damping with "
        "`hypergrad.Damped(operator, mu)` or regularise the inner problem."
    ),
}


class SolverError(RuntimeError):
    """Raised by :meth:`Solution.raise_if_failed` (and ``throw=True`` APIs) for a failed solve.

    The message names the solver, the status, the steps and the residual, followed by the
    status's remedy; the :class:`Solution` is kept in :attr:`solution`.

    Args:
        solution: the failed solution.
        solver: the solver that produced it (only its class name is used), or ``None``.

    Example:
        >>> import torch
        >>> from hypergrad import CG, SolverError
        >>> sol = CG(max_steps=1, rtol=1e-12)(lambda v: torch.diag(torch.tensor([1.0, 9.0])) @ v, torch.ones(2))
        >>> try:
        ...     sol.raise_if_failed(CG())
        ... except SolverError as err:
        ...     print(str(err).split(" (")[0])
        CG failed with status 'max_steps_reached' after 1 steps
    """

    def __init__(self, solution: "Solution", solver: Any = None):
        self.solution = solution
        name = type(solver).__name__ if solver is not None else "linear solver"
        super().__init__(
            f"{name} failed with status {solution.status.value!r} after {solution.num_steps} steps "
            f"(residual norm {solution.residual_norm}). {solution.status.message}"
        )


@dataclass(frozen=True)
class Solution:
    """The result of a linear solve.

    Attributes:
        x: the solution, a tree shaped like ``b``.
        status: a :class:`Status`; ``status.message`` says what to do when it failed.
        num_steps: iterations performed.
        num_matvecs: calls of ``matvec`` made by the solver (HVPs, for a Hessian operator).
        residual_norm: :math:`\\|b - A x\\|_2` of the returned ``x`` (``None`` when not computed,
            as for :class:`~hypergrad.solvers.Identity`).
        stats: solver-specific extras (e.g. ``min_curvature`` for CG).

    Example:
        >>> import torch
        >>> from hypergrad import CG
        >>> sol = CG(max_steps=5, rtol=1e-10)(lambda v: 2.0 * v, torch.ones(3))
        >>> sol.x, sol.converged, sol.num_matvecs
        (tensor([0.5000, 0.5000, 0.5000]), True, 1)
    """

    x: TreeOrTensor
    status: Status
    num_steps: int
    num_matvecs: int
    residual_norm: float | None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        """``True`` when a requested tolerance was reached (``status is Status.SUCCESS``).

        Returns:
            ``False`` for a fixed-budget solve, even an exact one; see :attr:`failed`.
        """
        return self.status is Status.SUCCESS

    @property
    def failed(self) -> bool:
        """``True`` when the solution should not be trusted (see :class:`Status`).

        Returns:
            ``status.failed``.
        """
        return self.status.failed

    def raise_if_failed(self, solver: Any = None) -> "Solution":
        """Raise :class:`SolverError` (with a remedy) if the solve failed; return ``self`` otherwise.

        Args:
            solver: the solver, named in the message (optional).

        Returns:
            ``self``, so ``x = solver(matvec, b).raise_if_failed().x`` reads in one line.

        Raises:
            SolverError: when :attr:`failed`.

        Example:
            >>> import torch
            >>> from hypergrad import Dense
            >>> Dense()(lambda v: 4.0 * v, torch.ones(1)).raise_if_failed().x
            tensor([0.2500])
        """
        if self.failed:
            raise SolverError(self, solver)
        return self


class AbstractLinearSolver(abc.ABC):
    """Base of all linear solvers: ``solver(matvec, b, x0=None) -> Solution``.

    Subclasses are frozen dataclasses, implement :meth:`_solve`, and are final (compose by
    wrapping the operator, e.g. :class:`hypergrad.Damped`, not by subclassing a solver).

    ``symmetric_only`` tells whether the solver assumes a symmetric positive definite operator
    (CG does); fixed-point hypergradients refuse such solvers because their operator is not
    symmetric.

    Example:
        >>> import hypergrad
        >>> isinstance(hypergrad.CG(), hypergrad.AbstractLinearSolver), hypergrad.CG.symmetric_only
        (True, True)
    """

    symmetric_only: bool = False

    def __call__(self, matvec: MatVec, b: TreeOrTensor, x0: TreeOrTensor | None = None) -> Solution:
        """Solve :math:`A x = b`.

        Args:
            matvec: the linear map ``v -> A v`` on trees shaped like ``b``.
            b: the right-hand side, a dict of tensors or a tensor.
            x0: optional initial guess shaped like ``b`` (warm start); ``None`` starts from zero.

        Returns:
            A :class:`Solution`; check :attr:`Solution.failed` or call
            :meth:`Solution.raise_if_failed`.
        """
        if not callable(matvec):
            raise TypeError(
                f"{type(self).__name__}: `matvec` must be a callable v -> A v (for example a "
                f"`hypergrad.HessianOperator`), got {type(matvec).__name__}. To solve with a dense "
                "matrix M, pass `lambda v: M @ v`."
            )
        if not isinstance(b, (Tensor, dict)) and not hasattr(b, "items"):
            raise TypeError(
                f"{type(self).__name__}: `b` must be a Tensor or a dict of tensors, got {type(b).__name__}."
            )
        if x0 is not None:
            tree_check_like("x0", x0, b, "b")
        return self._solve(matvec, b, x0)

    @abc.abstractmethod
    def _solve(self, matvec: MatVec, b: TreeOrTensor, x0: TreeOrTensor | None) -> Solution:
        """Solve ``A x = b``; ``x0`` has already been validated."""


def check_solver(solver: Any, *, owner: Optional[str] = None) -> AbstractLinearSolver:
    """``solver`` is a solver instance; a class, a string or anything else gets a fix in the message."""
    prefix = f"{owner}: " if owner else ""
    if isinstance(solver, AbstractLinearSolver):
        return solver
    if isinstance(solver, type) and issubclass(solver, AbstractLinearSolver):
        raise TypeError(
            f"{prefix}`solver` must be a solver instance, got the class {solver.__name__}; "
            f"call it: solver={solver.__name__}()."
        )
    hint = ""
    if isinstance(solver, str):
        hint = f" Pass an object, e.g. solver=hypergrad.CG(max_steps=10), not the string {solver!r}."
    raise TypeError(f"{prefix}`solver` must be a hypergrad solver, got {type(solver).__name__}.{hint}")


def _start(matvec: MatVec, b: TreeOrTensor, x0: TreeOrTensor | None) -> tuple[TreeOrTensor, TreeOrTensor, int]:
    """``(x, r, num_matvecs)`` of an iteration started at ``x0``: ``x = 0, r = b`` without one."""
    if x0 is None:
        return tree_zeros_like(b), b, 0
    return x0, tree_sub(b, matvec(x0)), 1


def _tolerance(b_norm: Tensor, rtol: float, atol: float) -> Tensor:
    return torch.clamp(rtol * b_norm, min=atol) if rtol > 0 else torch.full_like(b_norm, atol)
