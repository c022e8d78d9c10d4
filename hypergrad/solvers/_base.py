"""The linear-solver protocol: ``solver(matvec, b, x0=None) -> Solution``.

Every solver in :mod:`hypergrad.solvers` solves :math:`A x = b` for a linear map ``matvec``
(:math:`v \\mapsto A v`) on parameter trees, is a frozen dataclass whose fields are its settings
(validated at construction), and reports what happened in a :class:`Solution` instead of failing
silently. The caller decides whether a failure raises (:meth:`Solution.raise_if_failed`).
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from .._checks import check_rtol
from .._typing import MatVec, TreeOrTensor
from ..tree import tree_check_like, tree_norm, tree_sub, tree_zeros_like

__all__ = ["AbstractLinearSolver", "Solution", "Status", "SolverError", "check_solver"]


class Status(enum.Enum):
    """Outcome of a linear solve. ``failed`` statuses carry a remedy in :attr:`message`.

    ``SUCCESS``: the tolerance was reached (a per-step ``rtol``/``atol``, or a ``budget_rtol``
    checked after a fixed budget). ``FIXED_BUDGET``: no tolerance was asked for and the budget was
    spent; the result carries ``residual_norm`` and ``relative_residual`` so a caller can judge it,
    and a solver built with ``budget_rtol > 0`` never returns it (it returns ``SUCCESS`` or
    ``MAX_STEPS_REACHED``). The others (``MAX_STEPS_REACHED``, ``NONFINITE``,
    ``NEGATIVE_CURVATURE``, ``DIVERGED``, ``SINGULAR``) are failures.

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
        "`max_steps`; see `residual_norm` / `relative_residual` for the accuracy reached, or set "
        "`budget_rtol` on the solver to have a budget that misses it reported as a failure."
    ),
    Status.MAX_STEPS_REACHED: (
        "The tolerance (`rtol`/`atol`, or `budget_rtol` checked after the fixed budget) was not reached "
        "within `max_steps`. Try increasing `max_steps`, loosening the tolerance, adding damping with `hypergrad.Damped(operator, mu)`, or warm-starting with "
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
        stats: solver-specific extras (e.g. ``min_curvature`` for CG; ``budget_rtol`` when a fixed
            budget was judged against it).
        b_norm: :math:`\\|b\\|_2`, filled in by :meth:`AbstractLinearSolver.__call__` whenever
            ``residual_norm`` is (one reduction, read once after the solve).

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
    b_norm: float | None = None

    @property
    def relative_residual(self) -> float | None:
        """:math:`\\|b - A x\\| / \\|b\\|` (``residual_norm / b_norm``), or ``None`` when unknown.

        Returns:
            A float (``0.0`` for ``b = 0`` solved exactly, ``inf`` for ``b = 0`` with a non-zero
            residual), or ``None`` when either norm was not computed.
        """
        if self.residual_norm is None or self.b_norm is None:
            return None
        if self.b_norm == 0:
            return 0.0 if self.residual_norm == 0 else float("inf")
        return self.residual_norm / self.b_norm

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


@dataclass(frozen=True)
class AbstractLinearSolver(abc.ABC):
    """Base of all linear solvers: ``solver(matvec, b, x0=None) -> Solution``.

    Subclasses are frozen dataclasses, implement :meth:`_solve`, and are final (compose by
    wrapping the operator, e.g. :class:`hypergrad.Damped`, not by subclassing a solver).

    ``symmetric_only`` tells whether the solver assumes a symmetric positive definite operator
    (CG does); fixed-point hypergradients refuse such solvers because their operator is not
    symmetric.

    Every solver shares this entry point, which validates the call before ``_solve`` runs and
    judges a fixed budget after it:

    * ``b`` is a tensor or a non-empty dict of floating-point tensors, not on the ``meta`` device,
      all on one device; ``x0`` has the keys, shapes, dtypes and device of ``b``;
    * the first output of ``matvec`` is checked once against ``b`` (type, keys, shape, dtype,
      device), so a map returning another shape or other keys is an error naming ``matvec``
      instead of a broadcast ``x`` (no extra matvec; later calls are passed through);
    * ``budget_rtol`` (keyword, default 0): when ``> 0``, a solve that ends in
      :attr:`Status.FIXED_BUDGET` is judged once after the budget by its residual,
      :math:`\\|b - A x\\| \\le \\text{budget\\_rtol}\\,\\|b\\|`: met gives :attr:`Status.SUCCESS`,
      missed gives the failure :attr:`Status.MAX_STEPS_REACHED`. It adds no host sync inside the
      loop (unlike ``rtol``, which stops early and reads the residual every step); a solver that
      reports no residual (:class:`~hypergrad.solvers.Identity`) spends one matvec on it.

    Args:
        budget_rtol: relative residual a fixed-budget solve must reach to count as a success
            (0 disables the check; keyword-only, on every solver).

    Example:
        >>> import torch
        >>> import hypergrad
        >>> isinstance(hypergrad.CG(), hypergrad.AbstractLinearSolver), hypergrad.CG.symmetric_only
        (True, True)
        >>> A = torch.diag(torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64))
        >>> sol = hypergrad.CG(max_steps=2, budget_rtol=1e-6)(lambda v: A @ v, torch.ones(3, dtype=torch.float64))
        >>> sol.status.value, sol.failed, sol.relative_residual > 1e-6
        ('max_steps_reached', True, True)
    """

    budget_rtol: float = field(default=0.0, kw_only=True)

    symmetric_only: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_rtol("budget_rtol", self.budget_rtol, owner=type(self).__name__)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_checks_base", False):  # run the base check first

            @functools.wraps(own)
            def __post_init__(self: AbstractLinearSolver) -> None:
                AbstractLinearSolver.__post_init__(self)
                own(self)

            __post_init__._checks_base = True  # type: ignore[attr-defined]
            cls.__post_init__ = __post_init__  # type: ignore[method-assign]
        if "__repr__" not in cls.__dict__:  # set before @dataclass runs, so it keeps this one
            cls.__repr__ = AbstractLinearSolver._repr  # type: ignore[method-assign, assignment]

    def _repr(self) -> str:
        """``CG(max_steps=5, rtol=0.0, atol=0.0)``: the solver's own fields, ``budget_rtol`` only when set."""
        own = [f for f in dataclasses.fields(self) if f.repr and f.name != "budget_rtol"]
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in own]
        if self.budget_rtol:
            parts.append(f"budget_rtol={self.budget_rtol!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def __call__(self, matvec: MatVec, b: TreeOrTensor, x0: TreeOrTensor | None = None) -> Solution:
        """Solve :math:`A x = b`.

        Args:
            matvec: the linear map ``v -> A v`` on trees shaped like ``b``; its first output is
                checked against ``b`` (type, keys, shape, dtype, device).
            b: the right-hand side, a floating-point tensor or a non-empty dict of them, on one
                device.
            x0: optional initial guess with the keys, shapes, dtypes and device of ``b`` (warm
                start); ``None`` starts from zero.

        Returns:
            A :class:`Solution`; check :attr:`Solution.failed` or call
            :meth:`Solution.raise_if_failed`.

        Raises:
            TypeError: ``matvec`` is not callable; ``b`` is not a tensor or dict of tensors or not
                floating point; ``matvec`` returns a non-tensor or a tree where ``b`` is a tensor.
            ValueError: ``b`` is empty, on the ``meta`` device or on several devices; ``x0`` or the
                output of ``matvec`` differs from ``b`` in keys, shape, dtype or device.
        """
        name = type(self).__name__
        if not callable(matvec):
            raise TypeError(
                f"{name}: `matvec` must be a callable v -> A v (for example a "
                f"`hypergrad.HessianOperator`), got {type(matvec).__name__}. To solve with a dense "
                "matrix M, pass `lambda v: M @ v`."
            )
        _check_rhs(name, b)
        if x0 is not None:
            tree_check_like("x0", x0, b, "b", dtype=True, device=True, owner=name)
        checked = _CheckedMatVec(matvec, b, name)
        solution = self._solve(checked, b, x0)
        return self._judge(solution, checked, b)

    @abc.abstractmethod
    def _solve(self, matvec: MatVec, b: TreeOrTensor, x0: TreeOrTensor | None) -> Solution:
        """Solve ``A x = b``; ``b``, ``x0`` and the first output of ``matvec`` are validated."""

    def _judge(self, solution: Solution, matvec: MatVec, b: TreeOrTensor) -> Solution:
        """Fill ``b_norm``; judge a fixed budget by its residual when ``budget_rtol > 0``.

        A solution whose residual norm is not finite is :attr:`Status.NONFINITE`, whatever the solver
        reported: a right-hand side with an Inf makes every tolerance ``rtol * ||b||`` infinite, so a
        tolerance check alone would call ``x = 0`` a success.
        """
        if solution.residual_norm is not None and not math.isfinite(solution.residual_norm):
            solution = dataclasses.replace(solution, status=Status.NONFINITE)
        judge = self.budget_rtol > 0 and solution.status is Status.FIXED_BUDGET
        residual = solution.residual_norm
        if judge and residual is None:  # e.g. Identity: one matvec to measure it
            residual = float(tree_norm(tree_sub(b, matvec(solution.x))))
            solution = dataclasses.replace(solution, residual_norm=residual, num_matvecs=solution.num_matvecs + 1)
        if residual is None or solution.b_norm is not None:
            return solution
        solution = dataclasses.replace(solution, b_norm=float(tree_norm(b)))
        if not judge:
            return solution
        met = residual <= self.budget_rtol * solution.b_norm  # type: ignore[operator]
        status = Status.SUCCESS if met else Status.MAX_STEPS_REACHED
        return dataclasses.replace(solution, status=status, stats={**solution.stats, "budget_rtol": self.budget_rtol})


class _CheckedMatVec:
    """``matvec`` whose first output is checked against ``b``; attributes pass through to it."""

    def __init__(self, fn: MatVec, b: TreeOrTensor, owner: str):
        self.wrapped, self._b, self._owner, self._checked = fn, b, owner, False

    def __call__(self, v: TreeOrTensor) -> TreeOrTensor:
        out = self.wrapped(v)
        if not self._checked:
            _check_matvec_output(self._owner, out, self._b)
            self._checked = True
        return out

    def __getattr__(self, name: str) -> Any:  # operator tags (e.g. ``symmetric``) stay visible
        return getattr(self.wrapped, name)


_MATVEC_HINT = (
    " A linear map v -> A v must return a vector with the keys, shapes, dtype and device of v "
    "(here: of `b`); check the operator, e.g. a matrix of the wrong size or a forgotten key."
)


def _check_matvec_output(
    owner: str, out: object, b: TreeOrTensor, *, fn: str = "matvec", arg: str = "v", like: str = "b", hint: str = ""
) -> None:
    """``out = fn(arg)`` is a tree with the keys, shapes, dtypes and device of ``like`` (metadata only)."""
    hint = hint or _MATVEC_HINT
    if isinstance(b, Tensor) and not isinstance(out, Tensor):
        raise TypeError(f"{owner}: `{fn}` must return a Tensor like `{like}`, got {type(out).__name__}.{hint}")
    try:
        tree_check_like(f"{fn}({arg})", out, b, like, dtype=True, device=True, owner=owner)
    except TypeError as err:
        raise TypeError(f"{err}{hint}") from None
    except ValueError as err:
        raise ValueError(f"{err}{hint}") from None


def _check_rhs(owner: str, b: object) -> None:
    if isinstance(b, Tensor):
        leaves: list[tuple[str, object]] = [("`b`", b)]
    elif isinstance(b, Mapping):
        if len(b) == 0:
            raise ValueError(f"{owner}: `b` is an empty dict; pass at least one tensor.")
        leaves = [(f"`b[{k!r}]`", v) for k, v in b.items()]
    else:
        raise TypeError(f"{owner}: `b` must be a Tensor or a dict of tensors, got {type(b).__name__}.")
    devices = set()
    for where, leaf in leaves:
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{owner}: {where} must be a Tensor, got {type(leaf).__name__}.")
        if not leaf.is_floating_point():
            raise TypeError(
                f"{owner}: {where} has dtype {leaf.dtype}; linear solves need a real floating-point "
                "right-hand side (an integer one would truncate every step). Cast it, e.g. b.double() or "
                "b.float()."
            )
        if leaf.device.type == "meta":
            raise ValueError(
                f"{owner}: {where} is on the meta device, which holds no data, so there is nothing to "
                "solve; materialise it first (e.g. module.to_empty(device=...) and load the weights)."
            )
        devices.add(leaf.device)
    if len(devices) > 1:
        raise ValueError(f"{owner}: `b` mixes devices {sorted(map(str, devices))}; move every tensor to one device.")


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


def curvature_step_status(rr: Tensor, min_curv: Tensor, tol: Tensor) -> Optional[Status]:
    """The status a CG-type iteration stops on after a step with a tolerance check, else ``None``.

    ``rr`` is :math:`\\|r\\|^2`, ``min_curv`` the smallest :math:`p^\top A p` seen so far: a
    non-finite residual, then non-positive curvature, then a met tolerance (one host sync).
    """
    res = float(torch.sqrt(rr))
    if res != res or res == float("inf"):
        return Status.NONFINITE
    if not float(min_curv) > 0:
        return Status.NEGATIVE_CURVATURE
    if res <= float(tol):
        return Status.SUCCESS
    return None


def curvature_final_status(res: float, min_curv: float, status: Status, check: bool) -> Status:
    """The status of a CG-type iteration after its loop, from its residual norm ``res`` and ``min_curv``.

    A non-finite residual or curvature is :attr:`Status.NONFINITE`, non-positive curvature
    :attr:`Status.NEGATIVE_CURVATURE`; otherwise ``status`` (what the loop stopped on), with a spent
    budget under a tolerance (``check``) reported as :attr:`Status.MAX_STEPS_REACHED`.
    """
    if res != res or res == float("inf") or min_curv != min_curv:
        return Status.NONFINITE
    if min_curv <= 0:
        return Status.NEGATIVE_CURVATURE
    if check and status is Status.FIXED_BUDGET:
        return Status.MAX_STEPS_REACHED
    return status


def refuse_nonsymmetric(owner: str, matvec: Any, fix: str) -> None:
    """A ``ValueError`` for an operator tagged ``symmetric=False`` given to a solver that assumes symmetry.

    ``fix`` ends the message with what to use instead; untagged callables are trusted.
    """
    if getattr(matvec, "symmetric", None) is False:
        raise ValueError(
            f"{owner} assumes a symmetric operator, but `matvec` ({type(matvec).__name__}) is tagged "
            f"symmetric=False (e.g. I - d(phi)/d(params)^T of a fixed-point map). {fix}"
        )
