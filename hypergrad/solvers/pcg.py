"""Preconditioned conjugate gradient, the preconditioner built once per operator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, cast

import torch
from torch import Tensor

from .._checks import check_int, check_positive, check_rtol
from .._typing import MatVec, TreeOrTensor
from ._base import AbstractLinearSolver, Solution, Status, _tolerance, curvature_final_status, curvature_step_status
from ._lanczos import flat_start
from ._operator_cache import OperatorCache
from .preconditioners import AbstractPreconditioner, BuiltPreconditioner, Nystrom

__all__ = ["PCG", "pcg_flat"]


@dataclass(frozen=True)
class PCG(AbstractLinearSolver):
    r"""Preconditioned CG: CG on :math:`M^{-1/2} A M^{-1/2}` for SPD :math:`A` and :math:`M`.

    .. math::

        z_k = M^{-1} r_k,\quad
        \alpha_k = \frac{r_k^\top z_k}{p_k^\top A p_k},\quad
        x_{k+1} = x_k + \alpha_k p_k,\quad r_{k+1} = r_k - \alpha_k A p_k,\quad
        p_{k+1} = z_{k+1} + \frac{r_{k+1}^\top z_{k+1}}{r_k^\top z_k}\, p_k .

    The preconditioner (:class:`~hypergrad.solvers.Nystrom` by default, or
    :class:`~hypergrad.solvers.HutchinsonDiagonal`) is built on the first solve with an operator
    object and reused for every later solve with the *same object* (different right-hand sides, one
    matrix: the N_U upper steps of a BiSSL alternation); its matvecs are counted in that solve's
    ``num_matvecs`` and in ``stats["setup_matvecs"]``. The cache holds a weak reference to the
    operator, never its ``id()``; a matrix changed in place under the same object only costs steps,
    because the residual is always the true one. :meth:`reset` forgets the cache. Like
    :class:`~hypergrad.solvers.CG`, a fixed budget (``rtol = atol = 0``) runs ``max_steps`` steps
    without host synchronisation, and negative curvature is reported, never stepped along.

    Args:
        preconditioner: an :class:`~hypergrad.solvers.AbstractPreconditioner` (settings object).
        max_steps: iteration budget (>= 1).
        rtol: relative tolerance on :math:`\|r\|/\|b\|` (0 disables).
        atol: absolute tolerance on :math:`\|r\|` (0 disables).

    Returns:
        A :class:`~hypergrad.solvers.Solution`; ``stats`` has ``setup_matvecs`` and
        ``min_curvature``.

    Example:
        >>> import torch
        >>> from hypergrad import PCG, Nystrom
        >>> A = torch.diag(torch.tensor([1000.0, 100.0, 1.0, 2.0, 3.0], dtype=torch.float64))
        >>> solver = PCG(preconditioner=Nystrom(rank=2, sketch="random"), max_steps=20, rtol=1e-10)
        >>> op = lambda v: A @ v
        >>> first = solver(op, torch.ones(5, dtype=torch.float64))
        >>> second = solver(op, torch.arange(5.0, dtype=torch.float64))  # same operator: no setup
        >>> first.converged, first.stats["setup_matvecs"], second.stats["setup_matvecs"]
        (True, 2, 0)

    References:
        Saad (2003), Iterative Methods for Sparse Linear Systems, 2nd ed., Algorithm 9.1.
    """

    preconditioner: AbstractPreconditioner = field(default_factory=Nystrom)
    max_steps: int = 10
    rtol: float = 0.0
    atol: float = 0.0
    _cache: OperatorCache = field(default_factory=OperatorCache, init=False, repr=False, compare=False)

    symmetric_only = True

    def __post_init__(self) -> None:
        if not isinstance(self.preconditioner, AbstractPreconditioner):
            raise TypeError(
                "PCG: `preconditioner` must be a hypergrad preconditioner such as hypergrad.Nystrom(rank=10) "
                f"or hypergrad.HutchinsonDiagonal(), got {type(self.preconditioner).__name__}."
            )
        check_int("max_steps", self.max_steps, owner="PCG")
        check_rtol("rtol", self.rtol, owner="PCG")
        check_positive("atol", self.atol, allow_zero=True, owner="PCG")

    def reset(self) -> None:
        """Forget the cached preconditioner (the next solve builds a new one)."""
        self._cache.clear()

    def _solve(self, matvec: MatVec, b: TreeOrTensor, x0: TreeOrTensor | None) -> Solution:
        mv, unravel, bf, x, r, used = flat_start(matvec, b, x0)
        if self.rtol > 0 or self.atol > 0:  # a converged start needs no preconditioner
            res = torch.linalg.vector_norm(r)
            if bool(res <= _tolerance(torch.linalg.vector_norm(bf), self.rtol, self.atol)):
                return Solution(unravel(x), Status.SUCCESS, 0, used, float(res), {"setup_matvecs": 0})
        built: BuiltPreconditioner | None = self._cache.get(matvec, b)
        setup = 0
        if built is None:
            built = self.preconditioner.build(matvec, b)
            setup = built.num_matvecs
            if built.finite:
                self._cache.put(matvec, b, built)
        if not built.finite:
            nan = torch.full_like(bf, float("nan"))
            return Solution(unravel(nan), Status.NONFINITE, 0, used + setup, float("nan"), {"setup_matvecs": setup})
        sol = pcg_flat(mv, bf, x, r, built.apply, self.max_steps, self.rtol, self.atol)
        return Solution(
            unravel(cast(Tensor, sol.x)),
            sol.status,
            sol.num_steps,
            sol.num_matvecs + setup + used,
            sol.residual_norm,
            {**sol.stats, "setup_matvecs": setup},
        )


def pcg_flat(
    mv: Callable[[Tensor], Tensor],
    b: Tensor,
    x: Tensor,
    r: Tensor,
    precond: Callable[[Tensor], Tensor],
    max_steps: int,
    rtol: float,
    atol: float,
) -> Solution:
    """PCG on flat vectors from ``x`` with its residual ``r = b - A x`` given (matvecs: steps only)."""
    check = rtol > 0 or atol > 0
    acc = torch.promote_types(b.dtype, torch.float32)
    rr = torch.dot(r, r).to(acc)
    tol = _tolerance(torch.linalg.vector_norm(b).to(acc), rtol, atol)
    if check and bool(torch.sqrt(rr) <= tol):
        return Solution(x, Status.SUCCESS, 0, 0, float(torch.sqrt(rr)), {"min_curvature": float("inf")})
    z = precond(r)
    p = z
    rz = torch.dot(r, z).to(acc)
    zero = torch.zeros_like(rz)
    min_curv = torch.full_like(rz, float("inf"))
    status, steps, num_matvecs = Status.FIXED_BUDGET, 0, 0
    for steps in range(1, max_steps + 1):
        ap = mv(p)
        num_matvecs += 1
        pap = torch.dot(p, ap).to(acc)
        min_curv = torch.fmin(min_curv, pap / torch.dot(p, p).to(acc))
        alpha = torch.where(pap > 0, rz / pap, zero)
        x = x + alpha.to(x.dtype) * p
        r = r - alpha.to(r.dtype) * ap
        z = precond(r)
        rz_new = torch.dot(r, z).to(acc)
        beta = torch.where(rz != 0, rz_new / rz, zero)
        p = z + beta.to(z.dtype) * p
        rz = rz_new
        rr = torch.dot(r, r).to(acc)
        if check and (stop := curvature_step_status(rr, min_curv, tol)) is not None:
            status = stop
            break
    res, mc = float(torch.sqrt(rr)), float(min_curv)
    return Solution(x, curvature_final_status(res, mc, status, check), steps, num_matvecs, res, {"min_curvature": mc})
