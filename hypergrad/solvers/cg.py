"""Conjugate gradient for symmetric positive definite operators."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_int, check_positive, check_rtol
from .._typing import MatVec, TreeOrTensor
from ..tree import tree_axpy, tree_vdot
from ._base import (
    AbstractLinearSolver,
    Solution,
    Status,
    _start,
    _tolerance,
    curvature_final_status,
    curvature_step_status,
    refuse_nonsymmetric,
)

__all__ = ["CG"]

_FIX = "Use FixedPoint, Neumann or Dense, or pass symmetric=True if phi is a gradient-descent step."


@dataclass(frozen=True)
class CG(AbstractLinearSolver):
    r"""Conjugate gradient: solve :math:`A x = b` for symmetric positive definite :math:`A`.

    .. math::

        r_0 = b - A x_0,\ p_0 = r_0;\quad
        \alpha_k = \frac{r_k^\top r_k}{p_k^\top A p_k},\
        x_{k+1} = x_k + \alpha_k p_k,\ r_{k+1} = r_k - \alpha_k A p_k,\
        p_{k+1} = r_{k+1} + \frac{r_{k+1}^\top r_{k+1}}{r_k^\top r_k} p_k .

    One ``matvec`` (one HVP for a Hessian) per step, plus one for the initial residual when
    ``x0`` is given. With ``rtol = atol = 0`` (the default) it runs exactly ``max_steps`` steps and
    never synchronises the host with the device until the end; with a tolerance it stops as soon as
    :math:`\|r_k\| \le \max(\mathrm{rtol}\,\|b\|, \mathrm{atol})`, reading the residual each step.
    A direction with :math:`p^\top A p \le 0` (negative curvature) is never stepped along; it is
    reported as :attr:`Status.NEGATIVE_CURVATURE` with the smallest Rayleigh quotient met in
    ``stats["min_curvature"]``. An operator tagged ``symmetric=False`` (see
    :class:`hypergrad.LinearOperator`) is refused with a ``ValueError``; untagged callables are
    trusted. ``residual_norm`` is CG's recursively updated residual.

    Args:
        max_steps: iteration budget (>= 1).
        rtol: relative tolerance on :math:`\|r\|/\|b\|` (0 disables).
        atol: absolute tolerance on :math:`\|r\|` (0 disables).

    Returns:
        A :class:`~hypergrad.solvers.Solution`.

    Example:
        >>> import torch
        >>> from hypergrad.solvers import CG
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> sol = CG(max_steps=10, rtol=1e-12)(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> sol.converged, sol.num_steps
        (True, 2)
        >>> torch.allclose(A @ sol.x, torch.ones(2, dtype=torch.float64))
        True

    References:
        Hestenes & Stiefel (1952), Methods of conjugate gradients for solving linear systems.
        Grazzi et al. (ICML 2020), On the iteration complexity of hypergradient computation.
    """

    max_steps: int = 10
    rtol: float = 0.0
    atol: float = 0.0

    symmetric_only = True

    def __post_init__(self) -> None:
        check_int("max_steps", self.max_steps, owner="CG")
        check_rtol("rtol", self.rtol, owner="CG")
        check_positive("atol", self.atol, allow_zero=True, owner="CG")

    def _solve(self, matvec: MatVec, b: TreeOrTensor, x0: TreeOrTensor | None) -> Solution:
        refuse_nonsymmetric("CG", matvec, _FIX)
        check = self.rtol > 0 or self.atol > 0
        x, r, num_matvecs = _start(matvec, b, x0)
        p = r
        rr = tree_vdot(r, r)
        tol = _tolerance(torch.sqrt(tree_vdot(b, b)), self.rtol, self.atol) if check else torch.zeros_like(rr)
        min_curv = torch.full_like(rr, float("inf"))
        pp = rr  # ||p||^2, updated by CG's recursion below (no extra reduction per step)
        zero = torch.zeros_like(rr)
        status = Status.FIXED_BUDGET
        steps = 0
        if check and bool(torch.sqrt(rr) <= tol):
            return Solution(x, Status.SUCCESS, 0, num_matvecs, float(torch.sqrt(rr)), {"min_curvature": float("inf")})
        for steps in range(1, self.max_steps + 1):
            ap = matvec(p)
            num_matvecs += 1
            pap = tree_vdot(p, ap)
            # Rayleigh quotient of the direction; fmin ignores the 0/0 of a zero direction.
            min_curv = torch.fmin(min_curv, pap / pp)
            # Never step along a direction of non-positive curvature (alpha = 0 there).
            alpha = torch.where(pap > 0, rr / pap, zero)
            x = tree_axpy(alpha, p, x)
            r = tree_axpy(-alpha, ap, r)
            del ap  # not held through the next product: one vector less at the HVP's peak
            rr_new = tree_vdot(r, r)
            beta = torch.where(rr > 0, rr_new / rr, zero)
            p = tree_axpy(beta, p, r)
            # r_{k+1} is orthogonal to p_k, so ||p_{k+1}||^2 = ||r_{k+1}||^2 + beta^2 ||p_k||^2.
            pp = rr_new + beta * beta * pp
            rr = rr_new
            if check and (stop := curvature_step_status(rr, min_curv, tol)) is not None:
                status = stop
                break
        res, mc = float(torch.sqrt(rr)), float(min_curv)
        return Solution(
            x, curvature_final_status(res, mc, status, check), steps, num_matvecs, res, {"min_curvature": mc}
        )
