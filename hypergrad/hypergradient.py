r"""Hypergradients: assembly of operator, linear solve and cross term.

For :math:`\min_\lambda F(\theta^*(\lambda), \lambda)` with
:math:`\theta^*(\lambda) = \arg\min_\theta G(\theta, \lambda)`, the implicit function theorem
applied to :math:`\nabla_\theta G(\theta^*, \lambda) = 0` gives

.. math::

    \nabla_\lambda F = \partial_\lambda F - \big(\partial^2_{\lambda\theta} G\big)\, v,
    \qquad \big(\partial^2_{\theta\theta} G\big)\, v = \partial_\theta F .

Every function here builds the operator (:mod:`hypergrad.operators`), calls the solver
(:mod:`hypergrad.solvers`) and applies the cross term; nothing else.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.func import grad

from ._assembly import (
    FunctionalFailurePolicy,
    HypergradResult,
    apply_failure_policy,
    check_failure_policy,
    implicit_assembly,
    proximal_assembly,
    root_vjp,
)
from ._checks import (
    check_callable,
    check_choice,
    check_int,
    check_invertible,
    check_positive,
    check_same_device,
    check_scalar_loss,
    check_tree,
    check_truncate,
    fill_zeros,
    loss_grads,
)
from ._typing import BilevelLoss, FixedPointMap, TensorTree
from .operators import HVP_MODES, FixedPointOperator, HVPMode, _check_no_inference_mode
from .solvers import AbstractLinearSolver
from .solvers._base import check_solver
from .tree import tree_all_finite, tree_check_like

__all__ = ["HypergradResult", "UnrolledResult", "implicit_grad", "proximal_grad", "fixed_point_grad", "unrolled_grad"]


class UnrolledResult(NamedTuple):
    """``(grad, params)``: the unrolled hypergradient and the inner parameters after the K steps.

    Attributes:
        grad: the hypergradient, a dict keyed like ``hparams``.
        params: :math:`\\theta_K`, detached, keyed like ``params``.

    Example:
        >>> import torch, hypergrad
        >>> step = lambda p, h: {"w": p["w"] - 0.5 * (p["w"] - h["lam"])}
        >>> F = lambda p, h: (p["w"] ** 2).sum()
        >>> res = hypergrad.unrolled_grad(step, F, {"w": torch.zeros(1)}, {"lam": torch.ones(1)}, num_steps=2)
        >>> res.params["w"]
        tensor([0.7500])
    """

    grad: dict[str, Tensor]
    params: dict[str, Tensor]


def _outer_grads(outer_loss: BilevelLoss, params: dict, hparams: dict) -> tuple[dict, dict]:
    _, gp, gh = loss_grads("outer_loss", outer_loss, params, hparams)
    for name, grads in (("params", gp), ("hparams", gh)):
        present = {k: g for k, g in grads.items() if g is not None}
        if bool(tree_all_finite(present)):  # one host sync in the usual case
            continue
        bad = [k for k, g in present.items() if not bool(torch.isfinite(g).all())]
        if bad:
            raise ValueError(
                f"the gradient of `outer_loss` with respect to `{name}` {bad} is non-finite (NaN or Inf) although "
                "the loss is finite (e.g. sqrt, log or a power at 0); the hypergradient would be meaningless. "
                "Move the point off the singularity or smooth the loss (e.g. sqrt(x + eps))."
            )
    return fill_zeros(gp, params), gh


def _check_pair(
    fn_name: str, fn: object, signature: str, outer_loss: object, params: object, hparams: object
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Check the inner function, ``outer_loss`` and both trees; return detached copies of the trees."""
    check_callable(fn_name, fn, signature)
    check_callable("outer_loss", outer_loss, "(params, hparams) -> scalar")
    params, hparams = check_tree("params", params), check_tree("hparams", hparams)
    check_same_device(params, "params", hparams, "hparams")
    return params, hparams


def _check_x0(x0: TensorTree | None, params: dict) -> None:
    if x0 is not None:
        tree_check_like("x0", x0, params, "params")


def _unreached_hparams(fn_name: str, fn: FixedPointMap, params: dict, hparams: dict, keys: list[str]) -> list[str]:
    """The ``keys`` of ``hparams`` that one call ``fn(params, hparams)`` does not depend on (no autograd path)."""
    if not keys:
        return []
    h = {k: v.detach().requires_grad_(k in keys) for k, v in hparams.items()}
    with torch.enable_grad():
        out = fn({k: v.detach() for k, v in params.items()}, h)
        if not isinstance(out, dict):
            raise TypeError(f"`{fn_name}` must return a dict of tensors keyed like `params`, got {type(out).__name__}.")
        outs = [v for v in out.values() if isinstance(v, Tensor) and v.requires_grad]
        if not outs:
            return list(keys)
        grads = torch.autograd.grad(
            outs, [h[k] for k in keys], grad_outputs=[torch.ones_like(v) for v in outs], allow_unused=True
        )
    return [k for k, g in zip(keys, grads) if g is None]


def _refuse_unreached(fn_name: str, unused: list[str]) -> None:
    """The error :func:`implicit_grad` raises for hyper-parameters that reach neither function."""
    if unused:
        raise ValueError(
            f"hparams {unused} affect neither `{fn_name}` nor `outer_loss`; their hypergradient "
            "is identically zero. Remove them from `hparams` or use them in a loss."
        )


def implicit_grad(
    inner_loss: BilevelLoss,
    outer_loss: BilevelLoss,
    params: TensorTree,
    hparams: TensorTree,
    *,
    solver: AbstractLinearSolver,
    hvp_mode: HVPMode = "auto",
    damping: float = 0.0,
    x0: TensorTree | None = None,
    on_failure: FunctionalFailurePolicy = "warn",
    throw: bool = False,
    validate: bool = True,
) -> HypergradResult:
    r"""Hypergradient of ``outer_loss`` at the inner solution, by implicit differentiation.

    .. math::

        \big(\nabla^2_{\theta} G + \mu I\big)\, v = \nabla_\theta F,
        \qquad
        \nabla_\lambda F = \partial_\lambda F - \big(\partial^2_{\lambda\theta} G\big)\, v

    evaluated at ``params`` :math:`\approx \theta^*(\lambda)` (the caller runs the inner solver
    first; the formula is exact only at a stationary point). Cost: the solver's matvecs (HVPs of
    :math:`G`), one gradient of :math:`F`, one mixed product; with ``validate`` one more gradient
    of :math:`G`.

    Args:
        inner_loss: :math:`G`, ``inner_loss(params, hparams) -> scalar``.
        outer_loss: :math:`F`, ``outer_loss(params, hparams) -> scalar``.
        params: :math:`\theta`, dict of floating tensors (detached internally).
        hparams: :math:`\lambda`, dict of floating tensors.
        solver: a solver object, e.g. ``hypergrad.CG(max_steps=20, rtol=1e-8)``.
        hvp_mode: see :mod:`hypergrad.operators`.
        damping: :math:`\mu \ge 0` added to the Hessian (regularises an indefinite Hessian).
        x0: warm start for :math:`v` (e.g. the previous outer step's ``solution.x``).
        on_failure: what a failed solve (``solution.failed``: negative curvature, tolerance
            missed, a fixed budget missing its ``rtol``, ...) does: ``"warn"`` (default) returns
            the result with a :class:`~hypergrad.SolveFailedWarning`; ``"raise"`` raises
            :class:`~hypergrad.SolverError`; ``"apply"`` returns it quietly (inspect
            ``result.solution``). A non-finite solution or hypergradient raises unless ``"apply"``.
        throw: ``True`` is the same as ``on_failure="raise"`` (kept for compatibility).
        validate: check that each loss depends on what it should (one extra gradient of
            :math:`G`); errors name the offending argument and key.

    Returns:
        :class:`HypergradResult` ``(grad, solution)``; ``grad`` is keyed like ``hparams``.

    Example:
        >>> import torch, hypergrad
        >>> # G = 1/2 (w - lam)^2 -> w* = lam;  F = 1/2 w^2 -> dF/dlam = lam
        >>> G = lambda p, h: 0.5 * ((p["w"] - h["lam"]) ** 2).sum()
        >>> F = lambda p, h: 0.5 * (p["w"] ** 2).sum()
        >>> lam = {"lam": torch.tensor([3.0])}
        >>> g, sol = hypergrad.implicit_grad(G, F, {"w": torch.tensor([3.0])}, lam, solver=hypergrad.CG(max_steps=5))
        >>> g["lam"]
        tensor([3.])

    References:
        Pedregosa (ICML 2016), Hyperparameter optimization with approximate gradient.
        Blondel et al. (NeurIPS 2022), Efficient and modular implicit differentiation.
    """
    _check_no_inference_mode("implicit_grad")
    params, hparams = _check_pair("inner_loss", inner_loss, "(params, hparams) -> scalar", outer_loss, params, hparams)
    solver = check_solver(solver)
    check_choice("hvp_mode", hvp_mode, HVP_MODES)
    damping = check_positive("damping", damping, allow_zero=True)
    policy = check_failure_policy(on_failure, throw)
    _check_x0(x0, params)
    if not isinstance(validate, bool):
        raise TypeError(f"`validate` must be True or False, got {validate!r}.")

    gF_theta, gF_lam = _outer_grads(outer_loss, params, hparams)
    if validate:
        _, gG_theta, gG_lam = loss_grads("inner_loss", inner_loss, params, hparams)
        if all(g is None for g in gG_theta.values()):
            raise ValueError(
                "`inner_loss` does not depend on `params`: its Hessian is zero and the implicit "
                "system is singular. Make sure inner_loss uses the params it is given."
            )
        unused = [k for k in hparams if gG_lam[k] is None and gF_lam[k] is None]
        if unused:
            raise ValueError(
                f"hparams {unused} affect neither `inner_loss` nor `outer_loss`; their hypergradient "
                "is identically zero. Remove them from `hparams` or use them in a loss."
            )
    result = implicit_assembly(
        inner_loss,
        params,
        hparams,
        gF_theta,
        fill_zeros(gF_lam, hparams),
        solver=solver,
        hvp_mode=hvp_mode,
        damping=damping,
        x0=x0,
    )
    apply_failure_policy(result.solution, policy, solver, grad=result.grad)
    return result


def proximal_grad(
    inner_loss: Callable[[TensorTree], Tensor],
    params: TensorTree,
    outer_grad: TensorTree,
    *,
    lam: float,
    solver: AbstractLinearSolver,
    hvp_mode: HVPMode = "auto",
    x0: TensorTree | None = None,
    on_failure: FunctionalFailurePolicy = "warn",
    throw: bool = False,
) -> HypergradResult:
    r"""Implicit gradient through a proximally coupled inner problem (BiSSL, iMAML).

    For :math:`\theta^*(\omega) = \arg\min_\theta L(\theta) + \frac{\lambda}{2}\|\theta - \omega\|^2`,
    :math:`\partial_\omega\theta^* = \lambda (H + \lambda I)^{-1}` with :math:`H = \nabla^2 L`, so the
    gradient of an outer objective through :math:`\theta^*` is

    .. math::

        \nabla_\omega F = \lambda (H + \lambda I)^{-1} g = x,
        \qquad \big(I + H/\lambda\big)\, x = g,\quad g = \nabla_\theta F(\theta^*),

    which needs no mixed second derivative. The system solved is :math:`(I + H/\lambda) x = g`, as
    in the BiSSL reference code; a damping constant :math:`d` is folded into ``lam`` by passing
    ``lam = lambda + d``.

    Args:
        inner_loss: :math:`L`, ``inner_loss(params) -> scalar`` (without the proximal term).
        params: :math:`\theta \approx \theta^*`.
        outer_grad: :math:`g = \nabla_\theta F`, keyed like ``params``.
        lam: proximal strength :math:`\lambda > 0` (plus any damping).
        solver: e.g. ``hypergrad.CG(max_steps=5)``.
        hvp_mode, x0, on_failure, throw: as in :func:`implicit_grad`.

    Returns:
        :class:`HypergradResult` with ``grad`` keyed like ``params`` (the gradient w.r.t.
        :math:`\omega`).

    Example:
        >>> import torch, hypergrad
        >>> L = lambda p: 0.5 * 3.0 * (p["w"] ** 2).sum()  # H = 3 I
        >>> g, _ = hypergrad.proximal_grad(L, {"w": torch.zeros(2)}, {"w": torch.ones(2)}, lam=1.0, solver=hypergrad.Dense())
        >>> g["w"]  # 1 * (3 + 1)^-1 * 1
        tensor([0.2500, 0.2500])
    """
    _check_no_inference_mode("proximal_grad")
    check_callable("inner_loss", inner_loss, "(params) -> scalar")
    params = check_tree("params", params)
    tree_check_like("outer_grad", outer_grad, params, "params")
    outer_grad = check_tree("outer_grad", outer_grad)
    tree_check_like("outer_grad", outer_grad, params, "params", dtype=True)  # float, but the dtype of params?
    lam = check_invertible("lam", lam)
    solver = check_solver(solver)
    check_choice("hvp_mode", hvp_mode, HVP_MODES)
    policy = check_failure_policy(on_failure, throw)
    _check_x0(x0, params)
    result = proximal_assembly(inner_loss, params, outer_grad, lam=lam, solver=solver, hvp_mode=hvp_mode, x0=x0)
    apply_failure_policy(result.solution, policy, solver, grad=result.grad)
    return result


def fixed_point_grad(
    phi: FixedPointMap,
    outer_loss: BilevelLoss,
    params: TensorTree,
    hparams: TensorTree,
    *,
    solver: AbstractLinearSolver,
    symmetric: bool = False,
    x0: TensorTree | None = None,
    on_failure: FunctionalFailurePolicy = "warn",
    throw: bool = False,
) -> HypergradResult:
    r"""Hypergradient when the inner solution is a fixed point :math:`\theta^* = \Phi(\theta^*, \lambda)`.

    .. math::

        v = \partial_\theta\Phi^\top v + \partial_\theta F,
        \qquad
        \nabla_\lambda F = \partial_\lambda F + \partial_\lambda\Phi^\top v .

    :math:`\Phi` can be one optimiser step, a DEQ layer, any contraction. The operator
    :math:`I - \partial_\theta\Phi^\top` is not symmetric in general, so solvers that assume
    symmetry (CG) are refused unless ``symmetric=True`` (true when :math:`\Phi` is a gradient step
    :math:`\theta - \eta\nabla_\theta G`).

    Args:
        phi: ``phi(params, hparams) -> params``.
        outer_loss: ``outer_loss(params, hparams) -> scalar``.
        params: :math:`\theta^*` (approximately).
        hparams: :math:`\lambda`.
        solver: e.g. ``hypergrad.FixedPoint(max_steps=100, rtol=1e-8)``.
        symmetric: declare :math:`\partial_\theta\Phi` symmetric (tags the operator so CG accepts it).
        x0, on_failure, throw: as in :func:`implicit_grad`.

    Returns:
        :class:`HypergradResult` ``(grad, solution)``; ``grad`` is keyed like ``hparams``.

    Raises:
        ValueError: a key of ``hparams`` reaches neither ``phi`` nor ``outer_loss`` (its hypergradient
            would be a silent zero), as in :func:`implicit_grad`.

    Example:
        >>> import torch, hypergrad
        >>> # phi = w - 0.5 (w - lam): fixed point w* = lam;  F = 1/2 w^2 -> dF/dlam = lam
        >>> phi = lambda p, h: {"w": p["w"] - 0.5 * (p["w"] - h["lam"])}
        >>> F = lambda p, h: 0.5 * (p["w"] ** 2).sum()
        >>> g, sol = hypergrad.fixed_point_grad(phi, F, {"w": torch.tensor([2.0])}, {"lam": torch.tensor([2.0])},
        ...                                     solver=hypergrad.FixedPoint(max_steps=60, rtol=1e-10))
        >>> round(g["lam"].item(), 6)
        2.0

    References:
        Grazzi et al. (ICML 2020), On the iteration complexity of hypergradient computation.
    """
    _check_no_inference_mode("fixed_point_grad")
    params, hparams = _check_pair("phi", phi, "(params, hparams) -> params", outer_loss, params, hparams)
    solver = check_solver(solver)
    policy = check_failure_policy(on_failure, throw)
    _check_x0(x0, params)
    gF_theta, gF_lam = _outer_grads(outer_loss, params, hparams)
    operator = FixedPointOperator(phi, params, hparams, symmetric=symmetric)
    _refuse_unreached(
        "phi", _unreached_hparams("phi", phi, params, hparams, [k for k, g in gF_lam.items() if g is None])
    )
    result = root_vjp(
        operator, solver, gF_theta, lambda v: dict(operator.hparam_vjp(v)), direct=fill_zeros(gF_lam, hparams), x0=x0
    )
    apply_failure_policy(result.solution, policy, solver, grad=result.grad)
    return result


def unrolled_grad(
    inner_step: FixedPointMap,
    outer_loss: BilevelLoss,
    params: TensorTree,
    hparams: TensorTree,
    *,
    num_steps: int,
    truncate: int | None = None,
) -> UnrolledResult:
    r"""Hypergradient by reverse-mode differentiation through ``num_steps`` inner steps.

    .. math::

        \theta_{k+1} = \Phi(\theta_k, \lambda),\ k < K;\qquad
        \nabla_\lambda F(\theta_K(\lambda), \lambda)

    With ``truncate=T`` only the last :math:`T` steps are differentiated (truncated
    back-propagation): the first :math:`K - T` run without a graph, so memory is :math:`O(T)`.
    This is the comparison method for the implicit ones; its memory grows with :math:`T`.

    Args:
        inner_step: one differentiable inner update ``(params, hparams) -> params``.
        outer_loss: ``(params, hparams) -> scalar``.
        params: :math:`\theta_0`.
        hparams: :math:`\lambda`.
        num_steps: :math:`K \ge 1`.
        truncate: :math:`1 \le T \le K`, or ``None`` for full back-propagation.

    Returns:
        :class:`UnrolledResult` ``(grad, params)`` with the hypergradient and :math:`\theta_K`.

    Raises:
        ValueError: a key of ``hparams`` reaches neither ``inner_step`` nor ``outer_loss`` (its
            hypergradient would be a silent zero), as in :func:`implicit_grad`. Checked only for keys
            whose gradient is exactly zero (one extra ``inner_step`` and ``outer_loss`` call then).

    Example:
        >>> import torch, hypergrad
        >>> step = lambda p, h: {"w": p["w"] - 0.5 * (p["w"] - h["lam"])}
        >>> F = lambda p, h: 0.5 * (p["w"] ** 2).sum()
        >>> g, w = hypergrad.unrolled_grad(step, F, {"w": torch.zeros(1)}, {"lam": torch.ones(1)}, num_steps=1)
        >>> g["lam"], w["w"]  # w1 = lam / 2, F = lam^2 / 8
        (tensor([0.2500]), tensor([0.5000]))

    References:
        Franceschi et al. (ICML 2017), Forward and reverse gradient-based hyperparameter optimization.
        Shaban et al. (AISTATS 2019), Truncated back-propagation for bilevel optimization.
    """
    _check_no_inference_mode("unrolled_grad")
    params, hparams = _check_pair("inner_step", inner_step, "(params, hparams) -> params", outer_loss, params, hparams)
    check_int("num_steps", num_steps)
    check_truncate(truncate, "num_steps", num_steps)
    start = num_steps - (truncate if truncate is not None else num_steps)
    theta = params
    with torch.no_grad():
        for _ in range(start):
            theta = _checked_step(inner_step, theta, hparams, params)

    def run(lam: TensorTree) -> tuple[Tensor, dict]:
        th = theta
        for _ in range(num_steps - start):
            th = _checked_step(inner_step, th, lam, params)
        return check_scalar_loss("outer_loss", outer_loss(th, lam)), th

    g, final = grad(run, has_aux=True)(hparams)
    nonzero = torch.stack([v.any() for v in g.values()]).tolist()  # one host sync
    zero = [k for k, nz in zip(g, nonzero) if not nz]  # maybe unused: check for a path (no cost otherwise)
    if zero:
        _, _, gF_lam = loss_grads("outer_loss", outer_loss, final, hparams)
        maybe = [k for k in zero if gF_lam[k] is None]
        _refuse_unreached("inner_step", _unreached_hparams("inner_step", inner_step, params, hparams, maybe))
    return UnrolledResult(dict(g), {k: v.detach() for k, v in final.items()})


def _checked_step(step: FixedPointMap, theta: TensorTree, lam: TensorTree, like: TensorTree) -> dict:
    out = step(theta, lam)
    if not isinstance(out, dict):
        raise TypeError(f"`inner_step` must return a dict of tensors keyed like `params`, got {type(out).__name__}.")
    tree_check_like("inner_step(params, hparams)", out, like, "params")
    return out
