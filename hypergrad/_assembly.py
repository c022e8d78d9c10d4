r"""The one assembly of every implicit hypergradient (in the spirit of JAXopt's ``root_vjp``).

Every implicit method is the same three moves on a linear operator :math:`A`:

.. math::

    A^\top v = b \quad(\text{the solve}),\qquad
    \nabla = d + c(v) \quad(\text{direct term plus cross term, a VJP into the outer variables}).

* :func:`implicit_grad` and :class:`~hypergrad.Implicit`: :math:`A = \nabla^2_\theta G + \mu I`,
  :math:`b = \nabla_\theta F`, :math:`c(v) = -\partial^2_{\lambda\theta} G\, v`,
  :math:`d = \partial_\lambda F`;
* :func:`proximal_grad` and :class:`~hypergrad.Proximal`: :math:`A = I + H/(\lambda + d)`,
  :math:`c(v) = v` (renamed to the outer keys);
* :func:`fixed_point_grad`: :math:`A = I - \partial_\theta\Phi^\top`, :math:`c(v) = \partial_\lambda\Phi^\top v`;
* the autograd bridge (:func:`~hypergrad.custom_root`): :math:`A = \partial_x T`,
  :math:`c(v) = -\partial_\theta T^\top v` for an optimality condition :math:`T(x, \theta) = 0`.

:func:`root_vjp` is that function; :func:`implicit_assembly` and :func:`proximal_assembly` build the
operator and cross term of the first two cases and are shared by the functional API and the
methods. Operator reuse and data-parallel reduction enter only through arguments: a prebuilt
``operator`` and a ``reduce`` hook. The solver-failure policy of the functional API is
:func:`apply_failure_policy`; inside :class:`~hypergrad.BilevelProblem` the problem applies the
method's policy to the returned :class:`~hypergrad.Solution` instead.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Literal, NamedTuple, Optional

import torch
from torch import Tensor

from ._checks import check_choice
from ._typing import TensorTree
from .operators import Damped, HessianOperator, HVPMode, Mapped, mixed_hvp
from .records import NonFiniteError, SolveFailedWarning
from .solvers import AbstractLinearSolver, Solution, SolverError, Status
from .tree import tree_all_finite, tree_scale

__all__ = [
    "HypergradResult",
    "FunctionalFailurePolicy",
    "FUNCTIONAL_FAILURE_POLICIES",
    "root_vjp",
    "implicit_assembly",
    "proximal_assembly",
    "apply_failure_policy",
    "mixed_mode",
]

Reduce = Callable[[dict[str, Tensor]], dict[str, Tensor]]
FunctionalFailurePolicy = Literal["warn", "raise", "apply"]
FUNCTIONAL_FAILURE_POLICIES: tuple[str, ...] = ("warn", "raise", "apply")


class HypergradResult(NamedTuple):
    """``(grad, solution)``: the hypergradient and the linear solve behind it.

    Attributes:
        grad: the hypergradient, a dict keyed like ``hparams`` (like ``params`` for
            :func:`proximal_grad`).
        solution: the :class:`~hypergrad.solvers.Solution` of the linear solve (status, steps,
            residual).

    Example:
        >>> import torch, hypergrad
        >>> G = lambda p, h: 0.5 * ((p["w"] - h["lam"]) ** 2).sum()
        >>> F = lambda p, h: 0.5 * (p["w"] ** 2).sum()
        >>> res = hypergrad.implicit_grad(G, F, {"w": torch.ones(1)}, {"lam": torch.ones(1)}, solver=hypergrad.Dense())
        >>> res.grad["lam"], res.solution.status
        (tensor([1.]), <Status.SUCCESS: 'success'>)
    """

    grad: dict[str, Tensor]
    solution: Solution


def check_failure_policy(on_failure: Any, throw: Any, *, owner: Optional[str] = None) -> FunctionalFailurePolicy:
    """Validate ``on_failure`` (and the legacy ``throw`` flag, an alias of ``on_failure="raise"``)."""
    if not isinstance(throw, bool):
        raise TypeError(f"`throw` must be True or False, got {throw!r}.")
    if on_failure == "skip":
        raise ValueError(
            "`on_failure='skip'` only makes sense inside hypergrad.BilevelProblem (which can skip the outer "
            "step); a function must return something: use 'warn' (default), 'raise', or 'apply' and "
            "inspect `result.solution.failed`."
        )
    check_choice("on_failure", on_failure, FUNCTIONAL_FAILURE_POLICIES, owner=owner)
    return "raise" if throw else on_failure


def apply_failure_policy(
    solution: Solution,
    on_failure: FunctionalFailurePolicy,
    solver: Any,
    *,
    stacklevel: int = 3,
    grad: Optional[dict[str, Tensor]] = None,
) -> None:
    """The functional API's policy for a solve: nothing on success, else warn, raise or (opt-in) nothing.

    A non-finite solution is never returned under ``"warn"``: it raises like ``"raise"`` (only
    ``"apply"`` hands it back, for inspection). That holds for any failed status whose ``x`` is not
    finite (e.g. :class:`~hypergrad.Dense` on a singular matrix returns NaN with ``"singular"``), and
    for a non-finite hypergradient ``grad`` after a finite solve (an infinite mixed derivative).

    Args:
        solution: the solve's result.
        on_failure: ``"warn"`` (a :class:`~hypergrad.SolveFailedWarning`), ``"raise"``
            (:class:`~hypergrad.SolverError`) or ``"apply"`` (return quietly; the caller checks
            ``solution.failed``).
        solver: the solver, named in messages.
        stacklevel: of the warning (3: the caller of the public function calling this).
        grad: the assembled hypergradient; unless ``"apply"``, a non-finite entry raises
            :class:`~hypergrad.NonFiniteError` (``None``: not checked).
    """
    if on_failure == "apply":
        return
    if solution.failed:
        if on_failure == "raise" or solution.status is Status.NONFINITE or not bool(tree_all_finite(solution.x)):
            raise SolverError(solution, solver)
        warnings.warn(
            f"{type(solver).__name__} failed with status {solution.status.value!r} after {solution.num_steps} steps "
            f"(residual norm {solution.residual_norm}); the hypergradient from this solve is returned anyway. "
            f"{solution.status.message} Pass on_failure='raise' to refuse it, or on_failure='apply' to accept "
            "failed solves quietly.",
            SolveFailedWarning,
            stacklevel=stacklevel,
        )
    if grad is None or bool(tree_all_finite(grad)):  # one host sync in the usual case
        return
    bad = [k for k, g in grad.items() if not bool(torch.isfinite(g).all())]
    if bad:
        raise NonFiniteError(
            f"the hypergradient is non-finite (NaN or Inf) in {bad} although the linear solve's solution is finite "
            f"(status {solution.status.value!r}): a mixed second derivative of the inner problem (or optimality "
            "condition) is infinite at this point (e.g. sqrt or log of a hyper-parameter at 0). Move the point off "
            "the singularity, or pass on_failure='apply' to receive it anyway."
        )


def root_vjp(
    operator: Callable[[Any], Any],
    solver: AbstractLinearSolver,
    rhs: dict[str, Tensor],
    cross: Callable[[Any], dict[str, Tensor]],
    *,
    direct: Optional[dict[str, Tensor]] = None,
    x0: Optional[TensorTree] = None,
    on_solution: Optional[Callable[[Solution], None]] = None,
) -> HypergradResult:
    r"""Solve :math:`A v = b`, then return :math:`d + c(v)` and the :class:`~hypergrad.Solution`.

    Args:
        operator: the matvec :math:`v \mapsto A v` (already transposed where needed, damped,
            reduced over ranks; a cached operator is passed here as it is).
        solver: the linear solver.
        rhs: :math:`b`, the cotangent.
        cross: :math:`c`, a VJP into the outer variables, ``v -> {outer_name: tensor}``.
        direct: :math:`d`, the direct partial derivative (``None`` for none); the keys of
            ``cross(v)`` missing from it are added.
        x0: warm start of the solve.
        on_solution: called with the solution before the cross term (the failure policy, the
            warm-start store); it may raise.

    Returns:
        :class:`HypergradResult` ``(grad, solution)``.
    """
    solution = solver(operator, rhs, x0)
    if on_solution is not None:
        on_solution(solution)
    contribution = cross(solution.x)
    if direct is None:
        return HypergradResult(dict(contribution), solution)
    grad = dict(direct)
    for k, c in contribution.items():
        grad[k] = grad[k] + c if k in grad else c
    return HypergradResult(grad, solution)


def mixed_mode(operator: Any, requested: HVPMode) -> HVPMode:
    """The mode of the mixed product matching the Hessian operator's (resolved) mode.

    The same order of differentiation as the Hessian (so an ``"auto"`` operator that fell back to
    forward mode, for memory or for a missing double backward, is followed by a forward-mode mixed
    product); the frozen modes map to their one-product form (one mixed product: nothing to reuse).
    """
    resolved = getattr(operator, "mode", requested)
    if resolved in ("rev_rev", "rev_rev_cached"):
        return "rev_rev"
    if resolved in ("fwd_rev", "fwd_rev_linearized"):
        return "fwd_rev"
    if resolved == "finite_diff":
        return "finite_diff"
    return "auto"


def _identity(tree: dict[str, Tensor]) -> dict[str, Tensor]:
    return tree


def _memo_matvec(memo: Optional[dict[str, Any]], hessian: Any, key: tuple, build: Callable[[], Any]) -> Any:
    """The solver's matvec around ``hessian``: the memo's object while operator and ``key`` are the same."""
    if memo is not None and memo.get("operator") is hessian and memo.get("key") == key:
        return memo["matvec"]
    matvec = build()
    if memo is not None:
        memo.clear()
        memo.update(operator=hessian, key=key, matvec=matvec)
    return matvec


def implicit_assembly(
    inner_fn: Callable[[TensorTree, TensorTree], Tensor],
    params: dict[str, Tensor],
    hparams: dict[str, Tensor],
    g_theta: dict[str, Tensor],
    g_lam: dict[str, Tensor],
    *,
    solver: AbstractLinearSolver,
    hvp_mode: HVPMode,
    damping: float,
    operator: Optional[HessianOperator] = None,
    reduce: Optional[Reduce] = None,
    x0: Optional[TensorTree] = None,
    on_solution: Optional[Callable[[Solution], None]] = None,
    memo: Optional[dict[str, Any]] = None,
) -> HypergradResult:
    r"""Implicit differentiation of :math:`\nabla_\theta G = 0`: :func:`root_vjp` with the Hessian of :math:`G`.

    .. math::

        (\nabla^2_\theta G + \mu I)\, v = \nabla_\theta F,\qquad
        \nabla_\lambda F = \partial_\lambda F - \partial^2_{\lambda\theta} G\, v

    Args:
        inner_fn: :math:`G(\theta, \lambda)`.
        params, hparams: the point (detached).
        g_theta, g_lam: :math:`\nabla_\theta F` and :math:`\partial_\lambda F` (already reduced).
        solver, hvp_mode, damping: the method's settings.
        operator: a prebuilt (e.g. cached) Hessian operator of ``inner_fn(., hparams)`` at
            ``params``; built here when ``None``.
        reduce: averages a tree over data-parallel ranks (applied to every HVP and to the
            cross term); ``None`` on one process.
        x0, on_solution: as in :func:`root_vjp`.
        memo: a dict the caller keeps while it reuses ``operator``; the solver's matvec built around
            it is stored there and handed to the solver again (the same object) while the operator
            and the settings are the same, so solvers that cache work per operator object
            (:class:`~hypergrad.RecycledLanczos`, :class:`~hypergrad.PCG`) reuse it.

    Returns:
        :class:`HypergradResult`, ``grad`` keyed like ``hparams``.
    """
    red = reduce if reduce is not None else _identity
    hessian = (
        operator if operator is not None else HessianOperator(lambda th: inner_fn(th, hparams), params, mode=hvp_mode)
    )

    def build() -> Any:
        matvec: Any = hessian if reduce is None else Mapped(hessian, reduce)
        return Damped(matvec, damping) if damping > 0 else matvec

    matvec = _memo_matvec(memo, hessian, (damping, reduce), build)

    def cross(v: Any) -> dict[str, Tensor]:
        mixed = mixed_hvp(inner_fn, params, hparams, v, mode=mixed_mode(hessian, hvp_mode))
        return dict(tree_scale(red(dict(mixed)), -1.0))

    return root_vjp(matvec, solver, g_theta, cross, direct=g_lam, x0=x0, on_solution=on_solution)


def proximal_assembly(
    lower: Callable[[TensorTree], Tensor],
    params: dict[str, Tensor],
    outer_grad: dict[str, Tensor],
    *,
    lam: float,
    solver: AbstractLinearSolver,
    hvp_mode: HVPMode,
    rename: Optional[dict[str, str]] = None,
    direct: Optional[dict[str, Tensor]] = None,
    operator: Optional[HessianOperator] = None,
    reduce: Optional[Reduce] = None,
    x0: Optional[TensorTree] = None,
    on_solution: Optional[Callable[[Solution], None]] = None,
    memo: Optional[dict[str, Any]] = None,
) -> HypergradResult:
    r"""Proximal coupling: :func:`root_vjp` with :math:`A = I + H/\lambda` and the identity cross term.

    .. math:: \big(I + H/\lambda\big)\, x = g,\qquad \nabla_\omega F = d + x

    Args:
        lower: :math:`L(\theta)` over the coupled parameters.
        params: :math:`\theta` (the coupled parameters only).
        outer_grad: :math:`g = \nabla_\theta F`, keyed like ``params``.
        lam: :math:`\lambda` (plus any damping).
        solver, hvp_mode: the settings.
        rename: ``{inner_name: outer_name}`` for the cross term (``None``: keep the names).
        direct: the direct partial derivative of the outer variables (``None``: none).
        operator, reduce, x0, on_solution, memo: as in :func:`implicit_assembly`.

    Returns:
        :class:`HypergradResult`.
    """
    hessian = operator if operator is not None else HessianOperator(lower, params, mode=hvp_mode)
    matvec = _memo_matvec(
        memo,
        hessian,
        (lam, reduce),
        lambda: Damped(hessian if reduce is None else Mapped(hessian, reduce), 1.0, scale=1.0 / lam),
    )

    def cross(x: Any) -> dict[str, Tensor]:
        return dict(x) if rename is None else {rename[k]: t for k, t in x.items()}

    return root_vjp(matvec, solver, outer_grad, cross, direct=direct, x0=x0, on_solution=on_solution)
