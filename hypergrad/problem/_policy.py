"""What :class:`~hypergrad.BilevelProblem` does when a phase goes wrong.

Two kinds of trouble, two settings:

* **non-finite values** (a NaN/Inf loss, gradient, Hessian-vector product or hypergradient):
  ``on_nonfinite="skip"`` skips the phase and the record says why; ``"raise"`` raises
  :class:`~hypergrad.NonFiniteError`. Either way the phase leaves no trace (see ``_transaction``).
* **failed linear solves** (any status whose ``failed`` is true: ``negative_curvature``,
  ``max_steps_reached``, a ``fixed_budget`` that missed its ``rtol``, ...), acted on as the
  method's ``on_failure`` says: ``"raise"`` raises :class:`~hypergrad.SolverError`, ``"skip"``
  skips the outer step like a non-finite hypergradient, ``"warn"`` (the default) applies the
  hypergradient with a :class:`~hypergrad.SolveFailedWarning`, ``"apply"`` applies it quietly
  (the caller opted in). Every failed solve is counted (``problem.failed_solves``) and flagged in
  the record (``record.solve_failed``), whatever the policy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, cast

from ..methods._base import FAILURE_POLICIES, FailurePolicy
from ..records import NonFiniteError, SolveFailedWarning, StepRecord
from ..solvers import Solution, SolverError

NonFinitePolicy = Literal["skip", "raise"]
NONFINITE_POLICIES = ("skip", "raise")

UNCHANGED = "parameters, buffers, optimiser and scheduler state, counters and the warm-start vector are unchanged"


def method_failure_policy(method: Any) -> FailurePolicy:
    """The method's ``on_failure`` (``"warn"`` for methods without one)."""
    policy = getattr(method, "on_failure", "warn")
    return cast(FailurePolicy, policy) if policy in FAILURE_POLICIES else "warn"


@dataclass(frozen=True)
class StepPolicy:
    """The two settings above, and the bookkeeping of a skip."""

    on_nonfinite: NonFinitePolicy
    on_failure: FailurePolicy

    def nonfinite(self, record: StepRecord, reason: str, what: str) -> None:
        """Raise (``"raise"``) or mark ``record`` skipped; the caller has already undone the phase."""
        if self.on_nonfinite == "raise":
            raise NonFiniteError(f"{reason}; the {what} was not applied ({UNCHANGED}).")
        mark_skipped(record, reason)

    def failed_solve(self, record: StepRecord, solution: Solution, method: Any) -> bool:
        """Act on a failed solve; returns ``True`` when the hypergradient must be skipped."""
        record.solve_failed = True
        reason = (
            f"the linear solve of the hypergradient failed with status {solution.status.value!r} "
            f"after {solution.num_steps} steps: {solution.status.message}"
        )
        if self.on_failure == "raise":
            raise SolverError(solution, getattr(method, "solver", None))
        if self.on_failure == "skip":
            mark_skipped(record, reason)
            return True
        if self.on_failure == "warn":
            warnings.warn(
                f"{reason} The hypergradient was applied anyway (on_failure='warn'); set the method's "
                "on_failure='skip' or 'raise' to refuse failed solves, or 'apply' to accept them quietly.",
                SolveFailedWarning,
                stacklevel=4,
            )
        return False


def mark_skipped(record: StepRecord, reason: str) -> None:
    record.skipped = True
    if record.reason is None:
        record.reason = reason
    elif reason not in record.reason:
        record.reason = f"{record.reason}; {reason}"
