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
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Optional

import torch
from torch import Tensor
from torch.func import grad

from ._typing import TensorTree
from .hypergradient import unrolled_grad
from .operators import HVP_MODES, Damped, HessianOperator, HVPMode, mixed_hvp
from .records import NonFiniteError
from .solvers import AbstractLinearSolver, CG, Solution, Status
from .tree import tree_all_finite, tree_axpy, tree_sub

__all__ = ["AbstractHypergradMethod", "Implicit", "Proximal", "Unrolled"]

Reduce = Callable[[dict[str, Tensor]], dict[str, Tensor]]
PureLoss = Callable[[TensorTree, TensorTree], Tensor]


@dataclass
class MethodState:
    """Mutable per-problem state of a method: the warm-start vector and a reusable operator."""

    x0: Optional[dict[str, Tensor]] = None
    operator: Any = None
    operator_key: Any = None
    checked: bool = False


class MethodOutput(NamedTuple):
    grad: dict[str, Tensor]
    outer_loss: Tensor
    solution: Optional[Solution]
    num_hvps: int
    operator_reused: bool


def _check_solver(owner: str, solver: Any) -> None:
    if isinstance(solver, type) and issubclass(solver, AbstractLinearSolver):
        raise TypeError(f"{owner}: `solver` must be a solver instance, got the class {solver.__name__}; call it: solver={solver.__name__}().")
    if not isinstance(solver, AbstractLinearSolver):
        hint = f" Pass an object such as hypergrad.CG(max_steps=10), not the string {solver!r}." if isinstance(solver, str) else ""
        raise TypeError(f"{owner}: `solver` must be a hypergrad solver, got {type(solver).__name__}.{hint}")


def _check_number(owner: str, name: str, value: Any, *, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(f"{owner}: `{name}` must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}.")


def _check_common(owner: str, solver: Any, hvp_mode: Any, damping: Any, warm_start: Any, reuse_operator: Any) -> None:
    _check_solver(owner, solver)
    if hvp_mode not in HVP_MODES:
        raise ValueError(f"{owner}: `hvp_mode` must be one of {list(HVP_MODES)}, got {hvp_mode!r}.")
    _check_number(owner, "damping", damping, positive=False)
    for name, flag in (("warm_start", warm_start), ("reuse_operator", reuse_operator)):
        if not isinstance(flag, bool):
            raise TypeError(f"{owner}: `{name}` must be True or False, got {flag!r}.")
    if reuse_operator and hvp_mode not in ("auto", "rev_rev_cached"):
        raise ValueError(
            f"{owner}: `reuse_operator=True` keeps a reverse-mode gradient graph and needs "
            f"hvp_mode='auto' or 'rev_rev_cached', got hvp_mode={hvp_mode!r}."
        )


def _wide(value: Tensor) -> Tensor:
    """A detached 0-dim copy in at least float32 (bf16 losses under autocast are widened)."""
    return value.detach().reshape(()).to(torch.promote_types(value.dtype, torch.float32))


def value_and_grads(fn: PureLoss, params: TensorTree, hparams: TensorTree) -> tuple[Tensor, dict, dict]:
    """``fn(params, hparams)`` and its gradients w.r.t. both trees (zeros where unused)."""
    p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    h = {k: v.detach().requires_grad_(True) for k, v in hparams.items()}
    with torch.enable_grad():
        value = fn(p, h)
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"`outer_loss` must return a scalar tensor, got {shape}; reduce it with .mean().")
        if not value.requires_grad:
            raise ValueError("`outer_loss` does not depend on the trained parameters of either level; use the modules it is given.")
        grads = torch.autograd.grad(value, [*p.values(), *h.values()], allow_unused=True)
    gp = {k: torch.zeros_like(p[k]) if g is None else g for k, g in zip(p, grads[: len(p)])}
    gh = {k: torch.zeros_like(h[k]) if g is None else g for k, g in zip(h, grads[len(p):])}
    return _wide(value), gp, gh


def reduced_outer_grads(outer_fn: PureLoss, params: TensorTree, hparams: TensorTree, reduce: Reduce) -> tuple[Tensor, dict, dict]:
    """Outer loss and gradients, averaged over ranks in one all-reduce; raises on a non-finite loss."""
    value, gp, gh = value_and_grads(outer_fn, params, hparams)
    packed = reduce({**{"p." + k: v for k, v in gp.items()}, **{"h." + k: v for k, v in gh.items()}, "loss": value.reshape(1)})
    value = packed["loss"].reshape(())
    if not bool(torch.isfinite(value)):
        raise NonFiniteError(f"the outer loss is {value.item()}")
    return value, {k: packed["p." + k] for k in gp}, {k: packed["h." + k] for k in gh}


def check_solution(solution: Solution, what: str) -> None:
    if solution.status is Status.NONFINITE:
        raise NonFiniteError(f"the linear solve of the {what} produced a non-finite value ({solution.status.message})")


class AbstractHypergradMethod(abc.ABC):
    """Protocol of a hypergradient method used by :class:`~hypergrad.BilevelProblem`."""

    #: The Hessian the method uses depends on the outer parameters (so it cannot be reused after
    #: an outer step).
    hessian_depends_on_outer: bool = True

    def check(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> None:
        """Validate the method against the trained parameters (names, shapes); raise ``ValueError``."""

    def inner_penalty(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> Optional[Tensor]:
        """A term the inner step adds to the inner loss (``None`` for none)."""
        return None

    @abc.abstractmethod
    def hypergradient(
        self, inner_fn: PureLoss, outer_fn: PureLoss, params: dict[str, Tensor], hparams: dict[str, Tensor],
        state: MethodState, reduce: Reduce, operator_key: Any,
    ) -> MethodOutput:
        """Compute the hypergradient (keyed like ``hparams``) at ``params``."""


class _LinearSolveMethod(AbstractHypergradMethod):
    solver: AbstractLinearSolver
    hvp_mode: HVPMode
    warm_start: bool
    reuse_operator: bool

    def _operator(self, fn: Callable[[TensorTree], Tensor], params: dict, state: MethodState, key: Any) -> tuple[Any, bool]:
        """``(operator, reused)``; a reused operator was built by an earlier call with the same key."""
        if not self.reuse_operator:
            return HessianOperator(fn, params, mode=self.hvp_mode), False
        if state.operator is not None and state.operator_key == key:
            return state.operator, True
        state.operator, state.operator_key = None, None  # free the old graph before building a new one
        op = HessianOperator(fn, params, mode="rev_rev_cached")
        state.operator, state.operator_key = op, key
        return op, False

    def _x0(self, state: MethodState, rhs: dict[str, Tensor]) -> Optional[dict[str, Tensor]]:
        x0 = state.x0 if self.warm_start else None
        if x0 is None or set(x0) != set(rhs) or any(x0[k].shape != rhs[k].shape for k in rhs):
            return None
        return {k: x0[k].to(device=rhs[k].device, dtype=rhs[k].dtype) for k in rhs}

    def _store_x0(self, state: MethodState, solution: Solution) -> None:
        """Keep ``x`` for the next solve, unless the solve failed (a bad start would propagate)."""
        if self.warm_start:
            ok = not solution.failed and bool(tree_all_finite(solution.x))
            state.x0 = {k: v.detach().clone() for k, v in solution.x.items()} if ok else None


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
        matvec: Any = (lambda v: reduce(op(v)))
        if self.damping > 0:
            matvec = Damped(matvec, self.damping)
        solution = self.solver(matvec, g_theta, self._x0(state, g_theta))
        check_solution(solution, "implicit hypergradient")
        self._store_x0(state, solution)
        cross_mode = "rev_rev" if op.mode in ("rev_rev", "rev_rev_cached") else self.hvp_mode
        cross = reduce(mixed_hvp(inner_fn, params, hparams, solution.x, mode=cross_mode))
        return MethodOutput(tree_sub(g_lam, cross), value, solution, solution.num_matvecs + 1, reused)


@dataclass(frozen=True)
class Proximal(_LinearSolveMethod):
    r"""Proximal coupling (BiSSL, iMAML): the inner level is tied to outer parameters by a penalty.

    The inner step minimises :math:`L(\theta) + \frac{\lambda}{2}\sum_{c}\|\theta_c - \omega_c\|^2`
    (the method adds the penalty itself; ``inner_loss`` returns :math:`L`). The outer gradient of a
    coupled outer parameter :math:`\omega_c` is

    .. math::

        \nabla_{\omega} F = x + \partial_{\omega} F,\qquad
        \Big(I + \frac{H_{cc}}{\lambda + d}\Big) x = \nabla_{\theta_c} F,

    where :math:`H_{cc}` is the Hessian of :math:`L` (on the Hessian batch) over the coupled inner
    parameters only, the other inner parameters (a projector head, say) held fixed; uncoupled outer
    parameters get their direct partial :math:`\partial F`. :math:`d` is extra damping (BiSSL uses
    :math:`d = 10`). Equivalent to :func:`hypergrad.proximal_grad` with ``lam = lam + damping``.
    ``inner_loss`` must depend on the outer parameters only through the coupling (checked once).

    Args:
        lam: proximal strength :math:`\lambda > 0` of the inner penalty.
        coupling: ``{inner_name: outer_name}``; names are parameter names of the inner / outer
            modules, or module prefixes (``{"backbone": "backbone"}`` couples every parameter
            below them, matched by their remaining names; ``{"": ""}`` couples everything).
        solver: e.g. ``CG(max_steps=5)``.
        damping: :math:`d \ge 0`, added to :math:`\lambda` in the linear system only.
        hvp_mode, warm_start, reuse_operator: as in :class:`Implicit`; here the Hessian does not
            depend on the outer parameters, so a reused operator survives outer steps and is
            rebuilt only when the inner parameters or the Hessian batch change.

    Example:
        >>> import hypergrad
        >>> m = hypergrad.Proximal(lam=1e-3, damping=10.0, coupling={"backbone": "backbone"})
        >>> m.lam + m.damping
        10.001

    References:
        Rajeswaran et al. (NeurIPS 2019), Meta-learning with implicit gradients (iMAML).
        Zakarias et al. (2024), BiSSL: bilevel optimization for self-supervised pre-training and fine-tuning.
    """

    lam: float = 1.0
    coupling: Mapping[str, str] = field(default_factory=dict)
    solver: AbstractLinearSolver = field(default_factory=lambda: CG(max_steps=5))
    damping: float = 0.0
    hvp_mode: HVPMode = "auto"
    warm_start: bool = False
    reuse_operator: bool = False

    hessian_depends_on_outer = False

    def __post_init__(self) -> None:
        _check_number("Proximal", "lam", self.lam, positive=True)
        if not isinstance(self.coupling, Mapping) or not self.coupling:
            raise ValueError(
                f"Proximal: `coupling` must be a non-empty dict {{inner_name: outer_name}}, got {self.coupling!r}; "
                "e.g. coupling={'backbone': 'backbone'} or {'': ''} to couple all parameters by name."
            )
        for k, v in self.coupling.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"Proximal: `coupling` keys and values must be strings, got {k!r}: {v!r}.")
        _check_common("Proximal", self.solver, self.hvp_mode, self.damping, self.warm_start, self.reuse_operator)

    def pairs(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> dict[str, str]:
        """Resolve :attr:`coupling` to ``{inner_param: outer_param}`` (exact names or prefixes)."""
        out: dict[str, str] = {}
        for src, dst in self.coupling.items():
            if src in params:
                matches = {src: dst}
            else:
                pre_s, pre_d = (src + ".") if src else "", (dst + ".") if dst else ""
                matches = {k: pre_d + k[len(pre_s):] for k in params if k.startswith(pre_s)}
            if not matches:
                raise ValueError(
                    f"Proximal: `coupling` key {src!r} names no trained inner parameter or module; "
                    f"trained inner parameters are {sorted(params)[:8]}{' ...' if len(params) > 8 else ''}."
                )
            for i, o in matches.items():
                if o not in hparams:
                    raise ValueError(f"Proximal: `coupling` maps inner {i!r} to outer {o!r}, which is not a trained outer parameter.")
                if params[i].shape != hparams[o].shape:
                    raise ValueError(
                        f"Proximal: `coupling` pairs inner {i!r} of shape {tuple(params[i].shape)} with outer "
                        f"{o!r} of shape {tuple(hparams[o].shape)}; coupled tensors must have equal shapes."
                    )
            out.update(matches)
        return out

    def check(self, params, hparams) -> None:
        self.pairs(params, hparams)

    def inner_penalty(self, params, hparams) -> Tensor:
        terms = [((params[i] - hparams[o].detach()) ** 2).sum() for i, o in self.pairs(params, hparams).items()]
        return 0.5 * self.lam * torch.stack(terms).sum()

    def hypergradient(self, inner_fn, outer_fn, params, hparams, state, reduce, operator_key) -> MethodOutput:
        pairs = self.pairs(params, hparams)
        frozen_h = {k: v.detach() for k, v in hparams.items()}
        if not state.checked:
            _check_inner_ignores_outer(inner_fn, params, frozen_h)
            state.checked = True
        value, g_theta, g_lam = reduced_outer_grads(outer_fn, params, hparams, reduce)
        rest = {k: v.detach() for k, v in params.items() if k not in pairs}

        def lower(theta_c: TensorTree) -> Tensor:
            return inner_fn({**rest, **theta_c}, frozen_h)

        theta_c = {k: params[k].detach() for k in pairs}
        op, reused = self._operator(lower, theta_c, state, operator_key)
        scale = 1.0 / (self.lam + self.damping)
        rhs = {k: g_theta[k] for k in pairs}
        solution = self.solver(lambda v: tree_axpy(scale, reduce(op(v)), v), rhs, self._x0(state, rhs))
        check_solution(solution, "proximal hypergradient")
        self._store_x0(state, solution)
        out = dict(g_lam)
        for i, o in pairs.items():
            out[o] = out[o] + solution.x[i]
        return MethodOutput(out, value, solution, solution.num_matvecs, reused)


def _check_inner_ignores_outer(inner_fn: PureLoss, params: dict, hparams: dict) -> None:
    h = {k: v.detach().requires_grad_(True) for k, v in hparams.items()}
    with torch.enable_grad():
        value = inner_fn({k: v.detach() for k, v in params.items()}, h)
        if not value.requires_grad:
            return
        grads = torch.autograd.grad(value, list(h.values()), allow_unused=True)
    used = [k for k, g in zip(h, grads) if g is not None and bool(g.abs().sum() > 0)]
    if used:
        raise ValueError(
            f"Proximal: `inner_loss` depends on the outer parameters {used[:5]} directly, but the proximal "
            "method assumes the levels interact only through `coupling` (it skips the mixed second "
            "derivative). Use hypergrad.Implicit, or remove the outer parameters from inner_loss."
        )


@dataclass(frozen=True)
class Unrolled(AbstractHypergradMethod):
    r"""Differentiate through ``steps`` SGD steps on the inner loss (the comparison baseline).

    .. math::

        \theta_{k+1} = \theta_k - \eta \nabla_\theta G(\theta_k, \lambda),\quad k < K;
        \qquad \nabla_\lambda F(\theta_K(\lambda), \lambda)

    started at the current inner parameters and run functionally on the Hessian batch (the real
    inner parameters and optimiser are not touched). Memory grows with ``truncate`` (default: all
    ``steps``). Under data parallelism each rank unrolls on its own batch and the results are
    averaged (an approximation of the single-process unrolled gradient).

    Args:
        steps: :math:`K \ge 1`.
        lr: inner step :math:`\eta > 0` of the unrolled SGD.
        truncate: differentiate only the last ``truncate`` steps (``None``: all).

    Example:
        >>> import hypergrad
        >>> hypergrad.Unrolled(steps=5, lr=0.1).steps
        5
    """

    steps: int = 10
    lr: float = 0.1
    truncate: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"Unrolled: `steps` must be an integer >= 1, got {self.steps!r}.")
        _check_number("Unrolled", "lr", self.lr, positive=True)
        if self.truncate is not None and (
            isinstance(self.truncate, bool) or not isinstance(self.truncate, int) or not 1 <= self.truncate <= self.steps
        ):
            raise ValueError(f"Unrolled: `truncate` must be None or an integer in [1, steps={self.steps}], got {self.truncate!r}.")

    def hypergradient(self, inner_fn, outer_fn, params, hparams, state, reduce, operator_key) -> MethodOutput:
        def sgd_step(theta: TensorTree, lam: TensorTree) -> dict[str, Tensor]:
            g = grad(inner_fn)(theta, lam)
            return dict(tree_axpy(-self.lr, g, theta))

        try:
            result = unrolled_grad(sgd_step, outer_fn, params, hparams, num_steps=self.steps, truncate=self.truncate)
        except ValueError:
            self._raise_if_nonfinite(sgd_step, outer_fn, params, hparams)
            raise  # not a numerical problem
        final, g_lam = result.params, result.grad
        with torch.no_grad():
            value = _wide(outer_fn(final, hparams))
        packed = reduce({**{"h." + k: v for k, v in g_lam.items()}, "loss": value.reshape(1)})
        value = packed["loss"].reshape(())
        if not bool(torch.isfinite(value)):
            raise NonFiniteError(f"the outer loss after {self.steps} unrolled steps is {value.item()}")
        return MethodOutput({k: packed["h." + k] for k in g_lam}, value, None, 0, False)

    def _raise_if_nonfinite(self, sgd_step: Callable, outer_fn: PureLoss, params: dict, hparams: dict) -> None:
        theta = dict(params)
        for _ in range(self.steps):
            theta = {k: v.detach() for k, v in sgd_step(theta, hparams).items()}
        value = outer_fn(theta, hparams).detach()
        if not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"the outer loss after {self.steps} unrolled steps is {value.reshape(-1)[0].item()}")
