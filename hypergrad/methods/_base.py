r"""Hypergradient methods for :class:`~hypergrad.BilevelProblem`: objects holding their own settings.

* :class:`Implicit` - implicit differentiation of :math:`\nabla_\theta G(\theta, \lambda) = 0`
  (a linear solve with the inner Hessian, then the mixed product).
* :class:`Proximal` - the inner problem is proximally coupled to outer parameters,
  :math:`G = L(\theta) + \frac{\lambda_p}{2}\|\theta_c - \omega\|^2` (BiSSL, iMAML): no mixed
  second derivative, the Hessian is taken over the coupled inner parameters only.
* :class:`Unrolled` - reverse-mode differentiation through ``steps`` differentiable SGD steps.

A method sees the two losses as pure functions of parameter trees, ``inner_fn(params, hparams)``
(on the Hessian batch) and ``outer_fn(params, hparams)`` (on the outer batch), which the problem
builds from the user's modules with :func:`hypergrad.stateless`. ``reduce`` averages a tree over
data-parallel ranks (the identity on one process), applied to every gradient and HVP so the result
equals a single process on the concatenated batch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, NamedTuple, Optional, cast

import torch
from torch import Tensor

from .._checks import check_choice, check_positive, fill_zeros, loss_grads
from .._typing import TensorTree
from ..operators import HVP_MODES, HessianOperator, HVPMode
from ..records import NonFiniteError
from ..solvers import AbstractLinearSolver, Solution, Status
from ..solvers._base import check_solver
from ..tree import tree_all_finite

__all__ = ["AbstractHypergradMethod", "MethodState", "MethodOutput", "FailurePolicy", "FAILURE_POLICIES"]

Reduce = Callable[[dict[str, Tensor]], dict[str, Tensor]]
PureLoss = Callable[[TensorTree, TensorTree], Tensor]
#: What :class:`~hypergrad.BilevelProblem` does with a failed solve of a method (see ``on_failure``).
FailurePolicy = Literal["warn", "skip", "raise", "apply"]
FAILURE_POLICIES: tuple[str, ...] = ("warn", "skip", "raise", "apply")


@dataclass
class MethodState:
    """Mutable per-problem state of a method: the warm-start vector and a reusable operator.

    ``operator_token`` is the explicit token (given by the caller) under which ``operator`` was
    built; it is served again only for an equal, non-``None`` token.
    """

    x0: Optional[dict[str, Tensor]] = None
    operator: Any = None
    operator_token: Any = None
    checked: bool = False
    #: the solver's matvec built around ``operator`` (same object for every solve it serves)
    solver_memo: dict[str, Any] = field(default_factory=dict)


class MethodOutput(NamedTuple):
    """What :meth:`AbstractHypergradMethod.hypergradient` returns to the problem."""

    grad: dict[str, Tensor]
    outer_loss: Tensor
    solution: Optional[Solution]
    num_hvps: int
    operator_reused: bool


def _wide(value: Tensor) -> Tensor:
    """A detached 0-dim copy in at least float32 (bf16 losses under autocast are widened)."""
    return value.detach().reshape(()).to(torch.promote_types(value.dtype, torch.float32))


def value_and_grads(fn: PureLoss, params: TensorTree, hparams: TensorTree) -> tuple[Tensor, dict, dict]:
    """``fn(params, hparams)`` (widened, possibly non-finite) and its gradients w.r.t. both trees (zeros where unused)."""
    value, gp, gh = loss_grads("outer_loss", fn, params, hparams, finite=False)
    return _wide(value), fill_zeros(gp, params), fill_zeros(gh, hparams)


def reduced_outer_grads(
    outer_fn: PureLoss, params: TensorTree, hparams: TensorTree, reduce: Reduce
) -> tuple[Tensor, dict, dict]:
    """Outer loss and gradients, averaged over ranks in one all-reduce; raises on a non-finite loss."""
    value, gp, gh = value_and_grads(outer_fn, params, hparams)
    packed = reduce(
        {**{"p." + k: v for k, v in gp.items()}, **{"h." + k: v for k, v in gh.items()}, "loss": value.reshape(1)}
    )
    value = packed["loss"].reshape(())
    if not bool(torch.isfinite(value)):
        raise NonFiniteError(f"the outer loss is {value.item()}")
    return value, {k: packed["p." + k] for k in gp}, {k: packed["h." + k] for k in gh}


def _independent(name: str, fn: PureLoss, params: TensorTree, hparams: TensorTree, keys: list[str]) -> list[str]:
    """The ``keys`` of ``hparams`` on which ``fn(params, hparams)`` does not depend (autograd finds no path)."""
    _, _, grads = loss_grads(name, fn, params, hparams, finite=False, require_path=False)
    return [k for k in keys if grads[k] is None]


def check_solution(solution: Solution, what: str) -> None:
    if solution.status is Status.NONFINITE:
        raise NonFiniteError(f"the linear solve of the {what} produced a non-finite value ({solution.status.message})")


class AbstractHypergradMethod(abc.ABC):
    """Protocol of a hypergradient method used by :class:`~hypergrad.BilevelProblem`.

    A method is a frozen dataclass holding its settings (validated in ``__post_init__``) and
    implementing :meth:`hypergradient`; :class:`~hypergrad.Implicit`,
    :class:`~hypergrad.Proximal` and :class:`~hypergrad.Unrolled` are the built-in ones.

    Example:
        >>> import hypergrad
        >>> m = hypergrad.Proximal(lam=1.0, coupling={"": ""})
        >>> isinstance(m, hypergrad.AbstractHypergradMethod), m.hessian_depends_on_outer
        (True, False)
    """

    #: The Hessian the method uses depends on the outer parameters (so it cannot be reused after
    #: an outer step).
    hessian_depends_on_outer: bool = True

    def check(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> None:
        """Validate the method against the trained parameters (names, shapes); raise ``ValueError``.

        Args:
            params: the inner level's trained parameters, ``{name: tensor}``.
            hparams: the outer level's trained parameters.
        """

    def inner_penalty(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> Optional[Tensor]:
        """A term the inner step adds to the inner loss (``None`` for none).

        Args:
            params: the inner parameters (differentiable).
            hparams: the outer parameters (treated as constants).

        Returns:
            A scalar tensor, or ``None`` (the default) for no penalty.
        """
        return None

    def unreached(
        self, inner_fn: PureLoss, outer_fn: PureLoss, params: dict[str, Tensor], hparams: dict[str, Tensor]
    ) -> list[str]:
        """The keys of ``hparams`` that no path reaches: their hypergradient is zero by construction.

        The default: an outer parameter reaches the hypergradient through :math:`\\partial_\\lambda F`
        or through :math:`G` (the mixed term, or the unrolled inner steps), so a key on which
        neither ``outer_fn`` nor ``inner_fn`` depends is unreached. :class:`~hypergrad.BilevelProblem`
        calls this once, on its first hypergradient, and refuses unreached parameters rather than
        hand the outer optimiser zeros (weight decay or momentum would move them; plain autograd
        would leave their ``.grad`` at ``None``).

        Args:
            inner_fn: :math:`G` on the Hessian batch.
            outer_fn: :math:`F` on the outer batch.
            params: the inner parameters (detached).
            hparams: the outer parameters (detached).

        Returns:
            The unreached keys, in the order of ``hparams`` (empty when every key is reached).
        """
        missing = _independent("outer_loss", outer_fn, params, hparams, list(hparams))
        return _independent("inner_loss", inner_fn, params, hparams, missing) if missing else []

    @abc.abstractmethod
    def hypergradient(
        self,
        inner_fn: PureLoss,
        outer_fn: PureLoss,
        params: dict[str, Tensor],
        hparams: dict[str, Tensor],
        state: MethodState,
        reduce: Reduce,
        operator_key: Any,
    ) -> MethodOutput:
        """Compute the hypergradient (keyed like ``hparams``) at ``params``.

        Args:
            inner_fn: :math:`G`, ``inner_fn(params, hparams) -> scalar`` on the Hessian batch.
            outer_fn: :math:`F`, ``outer_fn(params, hparams) -> scalar`` on the outer batch.
            params: the inner parameters :math:`\\theta` (detached).
            hparams: the outer parameters :math:`\\lambda` (detached).
            state: the problem's :class:`MethodState` (warm start, cached operator), mutated.
            reduce: averages a tree over data-parallel ranks; apply it to every gradient and HVP.
            operator_key: the caller's explicit token for the linearisation point (the inner
                parameters and the Hessian batch, plus the outer parameters when
                :attr:`hessian_depends_on_outer`). A method with ``reuse_operator=True`` serves its
                cached operator only for a token equal (``==``) to the one it was built under;
                ``None`` never reuses. No identity or version keys are taken from the tensors.

        Returns:
            A :class:`MethodOutput` ``(grad, outer_loss, solution, num_hvps, operator_reused)``. A
            failed but finite solve is returned as it is: the caller applies the method's
            ``on_failure`` (:class:`~hypergrad.BilevelProblem` does). Raise
            :class:`~hypergrad.NonFiniteError` for a non-finite value (never returned).
        """


class _LinearSolveMethod(AbstractHypergradMethod):
    solver: AbstractLinearSolver
    hvp_mode: HVPMode
    damping: float
    warm_start: bool
    reuse_operator: bool
    on_failure: FailurePolicy

    def _check_settings(self, owner: str) -> None:
        """Validate the settings every linear-solve method shares (``owner`` names it in the messages)."""
        check_solver(self.solver, owner=owner)
        check_choice("on_failure", self.on_failure, FAILURE_POLICIES, owner=owner)
        check_choice("hvp_mode", self.hvp_mode, HVP_MODES, owner=owner)
        check_positive("damping", self.damping, allow_zero=True, owner=owner)
        for name, flag in (("warm_start", self.warm_start), ("reuse_operator", self.reuse_operator)):
            if not isinstance(flag, bool):
                raise TypeError(f"{owner}: `{name}` must be True or False, got {flag!r}.")

    def _operator(
        self, fn: Callable[[TensorTree], Tensor], params: dict, state: MethodState, token: Any
    ) -> tuple[HessianOperator, bool]:
        """``(operator, reused)`` for the Hessian of ``fn`` at ``params`` (see :meth:`_reused`)."""
        # "auto": the cached graph when it fits
        return self._reused(lambda: HessianOperator(fn, params, mode=self.hvp_mode), state, token)

    def _reused(self, build: Callable[[], Any], state: MethodState, token: Any) -> tuple[Any, bool]:
        """``(operator, reused)``: ``build()``, or the operator an earlier call with an equal token built.

        Reuse keeps the operator *object* (and the solver's matvec around it, see :meth:`_memo`) for
        every call with the same token, whatever the mode: a frozen mode (``"rev_rev_cached"``, what
        ``"auto"`` picks when it fits, ``"fwd_rev_linearized"``) also keeps its one-off work, and a
        recomputing mode (``"rev_rev"``, ``"fwd_rev"``, ``"finite_diff"``) keeps nothing but the object,
        so solvers that cache work per operator object (:class:`~hypergrad.RecycledLanczos`,
        :class:`~hypergrad.PCG`) reuse their basis or preconditioner at that mode's memory. The FSDP2
        routes (:mod:`hypergrad.fsdp.bilevel`) build their sharded operator through the same rule.
        """
        if not self.reuse_operator:
            return build(), False
        if token is not None and state.operator is not None and state.operator_token == token:
            return state.operator, True
        state.operator, state.operator_token = None, None  # free the old graph before building a new one
        state.solver_memo.clear()
        op = build()
        if token is not None:
            state.operator, state.operator_token = op, token
        return op, False

    def _memo(self, state: MethodState) -> Optional[dict[str, Any]]:
        """Where the assembly keeps the solver's matvec while an operator is reused (else ``None``)."""
        return state.solver_memo if self.reuse_operator else None

    def _on_solution(self, state: MethodState, what: str) -> Callable[[Solution], None]:
        """The hook run after the solve: refuse a non-finite solution, keep a good one as warm start."""

        def hook(solution: Solution) -> None:
            check_solution(solution, what)
            self._store_x0(state, solution)

        return hook

    def _x0(self, state: MethodState, rhs: dict[str, Tensor]) -> Optional[dict[str, Tensor]]:
        x0 = state.x0 if self.warm_start else None
        if x0 is None or set(x0) != set(rhs) or any(x0[k].shape != rhs[k].shape for k in rhs):
            return None
        return {k: x0[k].to(device=rhs[k].device, dtype=rhs[k].dtype) for k in rhs}

    def _store_x0(self, state: MethodState, solution: Solution) -> None:
        """Keep ``x`` for the next solve, unless the solve failed (a bad start would propagate)."""
        if self.warm_start:
            ok = not solution.failed and bool(tree_all_finite(solution.x))
            x = cast(dict[str, Tensor], solution.x)
            state.x0 = {k: v.detach().clone() for k, v in x.items()} if ok else None
