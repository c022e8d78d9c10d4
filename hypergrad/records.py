"""What one call of :class:`~hypergrad.BilevelProblem` did: :class:`StepRecord`, and the callback protocol.

Every public call of a problem (``step``, ``inner_step``, ``hypergradient``, ``outer_step``)
returns a :class:`StepRecord` and passes the same record to each registered callback, so a loop can
drive a progress bar or a metrics logger without hypergrad importing either:

>>> import hypergrad
>>> seen = []
>>> callback = lambda record: seen.append(record.phase)   # any callable(StepRecord) -> None
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

from .solvers import Solution

__all__ = ["Phase", "SolveInfo", "StepRecord", "StepCallback", "NonFiniteError", "SolveFailedWarning"]


class NonFiniteError(FloatingPointError):
    """A loss, gradient, Hessian-vector product or hypergradient was NaN or Inf.

    Raised by :class:`~hypergrad.BilevelProblem` with ``on_nonfinite="raise"``; with ``"skip"`` the
    same text is the record's ``reason``. Parameters, buffers, optimiser and scheduler state, counters
    and the warm-start vector are left as they were either way.
    A subclass of :class:`FloatingPointError`, so ``except FloatingPointError`` catches it too.

    Example:
        >>> import hypergrad
        >>> try:
        ...     raise hypergrad.NonFiniteError("the outer loss is nan")
        ... except FloatingPointError as err:
        ...     print(err)
        the outer loss is nan
    """


class SolveFailedWarning(UserWarning):
    """A failed linear solve was applied because the method's ``on_failure`` is ``"warn"``.

    :class:`~hypergrad.BilevelProblem` never applies a failed solve silently: with the default
    policy it warns with this category (and counts the failure in ``problem.failed_solves`` and
    ``record.solve_failed``). Turn it into an error with
    ``warnings.simplefilter("error", hypergrad.SolveFailedWarning)``, or choose
    ``on_failure="skip"``/``"raise"`` on the method.

    Example:
        >>> import warnings, hypergrad
        >>> issubclass(hypergrad.SolveFailedWarning, UserWarning)
        True
    """


#: Which public call produced a record.
Phase = Literal["inner", "hypergradient", "outer", "step"]


@dataclass(frozen=True)
class SolveInfo:
    """Diagnostics of the linear solve behind one hypergradient (host floats, cheap to log).

    Attributes:
        status: the :class:`~hypergrad.Status` value, e.g. ``"fixed_budget"`` or ``"success"``.
        num_steps: solver iterations.
        num_matvecs: operator applications by the solver (Hessian-vector products).
        residual_norm: :math:`\\|b - A x\\|` reported by the solver (``None`` if not computed).
        failed: ``True`` when the solver flagged the result as untrustworthy.

    Example:
        >>> import torch, hypergrad
        >>> sol = hypergrad.CG(max_steps=3)(lambda v: 2.0 * v, torch.ones(2))
        >>> hypergrad.SolveInfo.from_solution(sol)
        SolveInfo(status='fixed_budget', num_steps=3, num_matvecs=3, residual_norm=0.0, failed=False)
    """

    status: str
    num_steps: int
    num_matvecs: int
    residual_norm: Optional[float]
    failed: bool

    @classmethod
    def from_solution(cls, solution: Solution) -> "SolveInfo":
        """Copy the host-side fields of a :class:`~hypergrad.Solution`.

        Args:
            solution: the solver's result (its ``x`` is not kept).

        Returns:
            A :class:`SolveInfo` of plain Python values.
        """
        res = solution.residual_norm
        return cls(
            status=solution.status.value,
            num_steps=int(solution.num_steps),
            num_matvecs=int(solution.num_matvecs),
            residual_norm=None if res is None else float(res),
            failed=bool(solution.failed),
        )


@dataclass
class StepRecord:
    """A small summary of one problem call.

    Attributes:
        phase: ``"inner"``, ``"hypergradient"``, ``"outer"`` or ``"step"`` (inner steps + outer step).
        inner_steps: inner optimiser steps taken so far (after this call).
        outer_steps: outer optimiser steps taken so far (after this call).
        inner_losses: the inner loss of each inner step in this call (with the proximal term).
        outer_loss: the outer loss at which the hypergradient was taken, if one was.
        solve: :class:`SolveInfo` of the linear solve (``None`` for unrolled or no hypergradient).
        num_hvps: Hessian-vector products spent on the hypergradient (the solver's matvecs plus
            the mixed product of :class:`~hypergrad.Implicit`); building a cached operator (one
            forward and backward pass) is not counted, see ``operator_reused``.
        operator_reused: the Hessian operator of a previous call was reused.
        hypergrad_norm: :math:`\\|\\nabla_\\lambda F\\|` written into ``.grad`` (before clipping).
        times: wall-clock seconds per phase (``"inner"``, ``"hypergradient"``, ``"outer"``).
        skipped: a step was not applied (a non-finite value, or a failed solve under
            ``on_failure="skip"``).
        reason: why it was skipped (``None`` otherwise).
        solve_failed: the linear solve of this call failed (``solve.status`` says how), whether
            or not its hypergradient was applied (see the method's ``on_failure``).
        failed_solves: failed solves so far in the problem (after this call), for logs.

    Example:
        >>> import hypergrad
        >>> record = hypergrad.StepRecord("step", inner_steps=5, outer_steps=1, outer_loss=0.25)
        >>> record.skipped, record.scalars()["outer_loss"]
        (False, 0.25)
    """

    phase: Phase
    inner_steps: int = 0
    outer_steps: int = 0
    inner_losses: list[float] = field(default_factory=list)
    outer_loss: Optional[float] = None
    solve: Optional[SolveInfo] = None
    num_hvps: int = 0
    operator_reused: bool = False
    hypergrad_norm: Optional[float] = None
    times: dict[str, float] = field(default_factory=dict)
    skipped: bool = False
    reason: Optional[str] = None
    solve_failed: bool = False
    failed_solves: int = 0

    def scalars(self) -> dict[str, float]:
        """Flat ``name -> float`` view for loggers and progress bars (absent values omitted).

        Returns:
            ``{"inner_steps", "outer_steps", "inner_loss", "outer_loss", "hypergrad_norm",
            "solver_steps", "solver_residual", "solver_failed", "num_hvps", "time_<phase>",
            "skipped", "failed_solves"} -> float`` for the entries present; non-finite values are dropped except
            for the losses (a NaN loss is worth logging).

        Example:
            >>> StepRecord("inner", inner_steps=1, inner_losses=[0.5]).scalars()["inner_loss"]
            0.5
        """
        out: dict[str, float] = {"inner_steps": float(self.inner_steps), "outer_steps": float(self.outer_steps)}
        if self.inner_losses:
            out["inner_loss"] = self.inner_losses[-1]
        if self.outer_loss is not None:
            out["outer_loss"] = self.outer_loss
        if self.hypergrad_norm is not None:
            out["hypergrad_norm"] = self.hypergrad_norm
        if self.solve is not None:
            out["solver_steps"] = float(self.solve.num_steps)
            if self.solve.residual_norm is not None:
                out["solver_residual"] = self.solve.residual_norm
            out["solver_failed"] = float(self.solve.failed)
        if self.num_hvps:
            out["num_hvps"] = float(self.num_hvps)
        for phase, seconds in self.times.items():
            out[f"time_{phase}"] = seconds
        out["skipped"] = float(self.skipped)
        out["failed_solves"] = float(self.failed_solves)
        return {k: v for k, v in out.items() if isinstance(v, float) and (math.isfinite(v) or k.endswith("loss"))}


#: A callback receives every :class:`StepRecord`; its return value is ignored.
StepCallback = Callable[[StepRecord], None]
