r"""Implicit and proximal hypergradients of ``fully_shard``-ed (FSDP2) inner models.

The same formulas as :func:`hypergrad.implicit_grad` and :func:`hypergrad.proximal_grad`, with the
inner parameters :math:`\theta` sharded over ranks: the right-hand side, the solver's iterates and
the solution are ``{name: DTensor}`` trees sharded like :math:`\theta`, the Hessian products come
from :class:`~hypergrad.fsdp.ShardedHessianOperator`, and the solver's inner products reduce
across ranks with one ``all_reduce`` each (:func:`~hypergrad.fsdp.sharded_vdot`). With losses that
are means over equally sized per-rank batches the result equals one process on the concatenated
batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

from torch import Tensor, nn

from .._assembly import root_vjp
from ..operators import Damped
from ..solvers import AbstractLinearSolver, Dense, Solution, SolverError
from ..solvers._base import check_solver
from ..tree import tree_scale
from .operator import ShardedHessianOperator, ShardedHVPMode, ShardedLoss, sharded_value_and_grad
from .vectors import check_sharded_like

__all__ = ["ShardedHypergradResult", "sharded_implicit_grad", "sharded_proximal_grad"]


class ShardedHypergradResult(NamedTuple):
    """``(grad, solution, outer_loss, operator)``: a sharded hypergradient and what produced it.

    Attributes:
        grad: the hypergradient (plain tensors keyed like ``hparams`` for
            :func:`sharded_implicit_grad`; ``DTensor`` s sharded like the parameters for
            :func:`sharded_proximal_grad`).
        solution: the linear solve; ``solution.x`` is sharded like the parameters (keep it as the
            next warm start ``x0``).
        outer_loss: the rank-averaged outer loss (``None`` for :func:`sharded_proximal_grad`).
        operator: the :class:`~hypergrad.fsdp.ShardedHessianOperator` used (``num_backward``
            counts its backward passes).

    Example:
        >>> from hypergrad.fsdp import ShardedHypergradResult
        >>> ShardedHypergradResult._fields
        ('grad', 'solution', 'outer_loss', 'operator')
    """

    grad: dict[str, Tensor]
    solution: Solution
    outer_loss: Optional[Tensor]
    operator: ShardedHessianOperator


def _check(solver: Any, owner: str) -> AbstractLinearSolver:
    solver = check_solver(solver, owner=owner)
    if isinstance(solver, Dense):
        raise ValueError(
            f"{owner}: `solver` Dense materialises the whole Hessian on one rank, which defeats sharding and is not "
            "supported under FSDP2; use hypergrad.CG (or Neumann) instead."
        )
    return solver


def _hook(throw: bool, solver: AbstractLinearSolver) -> Any:
    """The assembly's ``on_solution``: raise :class:`~hypergrad.SolverError` for a failed solve when asked."""

    def hook(solution: Solution) -> None:
        if throw and solution.failed:
            raise SolverError(solution, solver)

    return hook


def sharded_implicit_grad(
    module: nn.Module,
    inner_loss: ShardedLoss,
    outer_loss: ShardedLoss,
    hparams: dict[str, Tensor],
    *,
    inner_batch: Sequence[Any],
    outer_batch: Sequence[Any],
    solver: AbstractLinearSolver,
    mode: ShardedHVPMode = "finite_diff",
    damping: float = 0.0,
    x0: Optional[dict[str, Tensor]] = None,
    dense_module: Optional[nn.Module] = None,
    throw: bool = False,
) -> ShardedHypergradResult:
    r"""Implicit (IFT) hypergradient with a ``fully_shard``-ed inner model.

    .. math::

        \big(\nabla^2_{\theta} \bar G + \mu I\big)\, v = \nabla_\theta \bar F,
        \qquad
        \nabla_\lambda \bar F = \partial_\lambda \bar F - \big(\partial^2_{\lambda\theta} \bar G\big)\, v

    where bars are means over ranks (equal to the loss on the concatenated batch). Cost: one
    ``backward()`` of :math:`F`; per solver step one HVP (two backward passes for
    ``"finite_diff"``, one for the other modes); the mixed product is one more HVP-sized pass.

    Args:
        module: the inner model :math:`\theta`, wrapped with ``fully_shard``, at (approximately)
            the inner solution.
        inner_loss: :math:`G`, ``inner_loss(module, hparams, *inner_batch) -> scalar`` (local mean).
        outer_loss: :math:`F`, ``outer_loss(module, hparams, *outer_batch) -> scalar`` (local mean).
        hparams: :math:`\lambda`, plain tensors identical on every rank.
        inner_batch: this rank's batch for the Hessian.
        outer_batch: this rank's batch for :math:`F`.
        solver: e.g. ``hypergrad.CG(max_steps=20, rtol=1e-6)`` (``Dense`` is refused).
        mode: HVP route (:data:`~hypergrad.fsdp.SHARDED_HVP_MODES`).
        damping: :math:`\mu \ge 0`.
        x0: warm start, sharded like the parameters (a previous ``solution.x``).
        dense_module: unsharded twin of ``module`` for ``mode="exact"``.
        throw: raise :class:`~hypergrad.SolverError` when the solve failed.

    Returns:
        :class:`ShardedHypergradResult`; ``grad`` is keyed like ``hparams``, identical on every rank.

    Example:
        >>> import torch, hypergrad
        >>> from hypergrad.fsdp import sharded_implicit_grad
        >>> sharded_implicit_grad(torch.nn.Linear(2, 1), None, None, {}, inner_batch=(), outer_batch=(),
        ...                       solver=hypergrad.Dense())
        Traceback (most recent call last):
        ...
        ValueError: sharded_implicit_grad: `solver` Dense materialises the whole Hessian on one rank, which defeats sharding and is not supported under FSDP2; use hypergrad.CG (or Neumann) instead.
    """
    solver = _check(solver, "sharded_implicit_grad")
    value, g_theta, g_lam = sharded_value_and_grad(module, outer_loss, outer_batch, hparams)
    op = ShardedHessianOperator(module, inner_loss, inner_batch, hparams, mode=mode, dense_module=dense_module)
    matvec: Any = Damped(op, damping) if damping > 0 else op
    if x0 is not None:
        check_sharded_like("x0", x0, op.params)

    def cross(v: Any) -> dict[str, Tensor]:
        return dict(tree_scale(op.mixed(dict(v)), -1.0)) if g_lam else {}

    grad, solution = root_vjp(matvec, solver, g_theta, cross, direct=g_lam, x0=x0, on_solution=_hook(throw, solver))
    return ShardedHypergradResult(grad, solution, value, op)


def sharded_proximal_grad(
    module: nn.Module,
    inner_loss: ShardedLoss,
    outer_grad: dict[str, Tensor],
    *,
    inner_batch: Sequence[Any],
    lam: float,
    solver: AbstractLinearSolver,
    mode: ShardedHVPMode = "finite_diff",
    x0: Optional[dict[str, Tensor]] = None,
    dense_module: Optional[nn.Module] = None,
    throw: bool = False,
) -> ShardedHypergradResult:
    r"""Proximal (BiSSL, iMAML) hypergradient with a ``fully_shard``-ed inner model.

    For :math:`\theta^*(\omega) = \arg\min_\theta L(\theta) + \frac{\lambda}{2}\|\theta-\omega\|^2`,

    .. math:: \nabla_\omega F = \lambda (H + \lambda I)^{-1} g = x,\qquad \big(I + H/\lambda\big)\, x = g,

    with :math:`H = \nabla^2 \bar L` over the parameters in ``outer_grad`` (the others held
    fixed) and :math:`g = \nabla_\theta \bar F` (e.g. from :func:`~hypergrad.fsdp.sharded_value_and_grad`).
    Fold any damping :math:`d` into ``lam`` (``lam = lambda + d``), as in :func:`hypergrad.proximal_grad`.

    Args:
        module: the inner model, wrapped with ``fully_shard``.
        inner_loss: :math:`L`, ``inner_loss(module, hparams, *inner_batch) -> scalar`` without the
            proximal term (``hparams`` is ``{}``).
        outer_grad: :math:`g`, ``{name: DTensor}`` sharded like the parameters it names.
        inner_batch: this rank's batch for the Hessian.
        lam: :math:`\lambda > 0` (plus damping).
        solver: e.g. ``hypergrad.CG(max_steps=5)``.
        mode: HVP route (:data:`~hypergrad.fsdp.SHARDED_HVP_MODES`).
        x0: warm start sharded like ``outer_grad``.
        dense_module: unsharded twin of ``module`` for ``mode="exact"``.
        throw: raise :class:`~hypergrad.SolverError` when the solve failed.

    Returns:
        :class:`ShardedHypergradResult` with ``grad = solution.x`` sharded like ``outer_grad``.

    Example:
        >>> import torch, hypergrad
        >>> from hypergrad.fsdp import sharded_proximal_grad
        >>> sharded_proximal_grad(torch.nn.Linear(2, 1), None, {}, inner_batch=(), lam=0.0, solver=hypergrad.CG())
        Traceback (most recent call last):
        ...
        ValueError: sharded_proximal_grad: `lam` must be a positive number, got 0.0.
    """
    if not isinstance(lam, (int, float)) or not lam > 0:
        raise ValueError(f"sharded_proximal_grad: `lam` must be a positive number, got {lam!r}.")
    solver = _check(solver, "sharded_proximal_grad")
    op = ShardedHessianOperator(
        module, inner_loss, inner_batch, {}, mode=mode, keys=list(outer_grad), dense_module=dense_module
    )
    check_sharded_like("outer_grad", outer_grad, op.params)
    if x0 is not None:
        check_sharded_like("x0", x0, op.params)
    matvec = Damped(op, 1.0, scale=1.0 / float(lam))
    grad, solution = root_vjp(matvec, solver, dict(outer_grad), dict, x0=x0, on_solution=_hook(throw, solver))
    return ShardedHypergradResult(grad, solution, None, op)
