"""MINRES for symmetric (possibly indefinite) operators."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_int, check_positive, check_rtol
from .._typing import MatVec, TreeOrTensor
from ..tree import tree_axpy, tree_scale, tree_vdot, tree_zeros_like
from ._base import AbstractLinearSolver, Solution, Status, _start, _tolerance

__all__ = ["MINRES"]


@dataclass(frozen=True)
class MINRES(AbstractLinearSolver):
    r"""MINRES: solve :math:`A x = b` for symmetric :math:`A`, definite or not.

    .. math::

        x_k = \operatorname*{arg\,min}_{x \in x_0 + \mathcal{K}_k(A, r_0)} \|b - A x\|_2,\qquad
        \mathcal{K}_k(A, r_0) = \operatorname{span}\{r_0, A r_0, \dots, A^{k-1} r_0\},

    computed by the Lanczos three-term recurrence and Givens rotations (Paige & Saunders): one
    ``matvec`` per step, five vectors of storage, and a residual norm :math:`\|r_k\|` that never
    grows. Unlike :class:`~hypergrad.solvers.CG` it needs no positive definiteness: the proximal
    system :math:`I + H/\lambda` of BiSSL is indefinite at small :math:`\lambda` and non-convex
    points, where CG stops with ``NEGATIVE_CURVATURE`` and MINRES still converges. With
    ``rtol = atol = 0`` (the default) it runs exactly ``max_steps`` steps without a host-device
    synchronisation; ``residual_norm`` is the recurrence's :math:`\|r_k\|` (equal to the true
    residual in exact arithmetic).

    Args:
        max_steps: iteration budget (>= 1).
        rtol: relative tolerance on :math:`\|r\|/\|b\|` (0 disables).
        atol: absolute tolerance on :math:`\|r\|` (0 disables).

    Returns:
        A :class:`~hypergrad.solvers.Solution`; ``stats["indefinite"]`` is ``True`` when a negative
        Lanczos diagonal entry :math:`v^\top A v < 0` was met (so CG would have failed).

    Example:
        >>> import torch
        >>> from hypergrad import MINRES
        >>> A = torch.tensor([[2.0, 1.0], [1.0, -3.0]], dtype=torch.float64)  # indefinite
        >>> sol = MINRES(max_steps=10, rtol=1e-12)(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> sol.converged, sol.num_steps
        (True, 2)
        >>> torch.allclose(A @ sol.x, torch.ones(2, dtype=torch.float64))
        True

    References:
        Paige & Saunders (1975), Solution of sparse indefinite systems of linear equations.
        SIAM J. Numer. Anal. 12(4).
    """

    max_steps: int = 10
    rtol: float = 0.0
    atol: float = 0.0

    symmetric_only = True

    def __post_init__(self) -> None:
        check_int("max_steps", self.max_steps, owner="MINRES")
        check_rtol("rtol", self.rtol, owner="MINRES")
        check_positive("atol", self.atol, allow_zero=True, owner="MINRES")

    def _solve(self, matvec: MatVec, b: TreeOrTensor, x0: TreeOrTensor | None) -> Solution:
        return minres(matvec, b, x0, max_steps=self.max_steps, rtol=self.rtol, atol=self.atol)


def minres(
    matvec: MatVec,
    b: TreeOrTensor,
    x0: TreeOrTensor | None,
    *,
    max_steps: int,
    rtol: float = 0.0,
    atol: float = 0.0,
    r0: TreeOrTensor | None = None,
    extra_matvecs: int = 0,
) -> Solution:
    """MINRES from ``x0`` (``r0 = b - A x0`` may be passed to save its matvec)."""
    check = rtol > 0 or atol > 0
    if r0 is None:
        x, r, num_matvecs = _start(matvec, b, x0)
    else:
        x, r, num_matvecs = (x0 if x0 is not None else tree_zeros_like(b)), r0, 0
    num_matvecs += extra_matvecs
    beta1 = torch.sqrt(tree_vdot(r, r))
    b_norm = torch.sqrt(tree_vdot(b, b))
    tol = _tolerance(b_norm, rtol, atol)
    stats: dict = {"indefinite": False}
    if check and bool(beta1 <= tol):
        return Solution(x, Status.SUCCESS, 0, num_matvecs, float(beta1), stats)
    zero = torch.zeros_like(beta1)
    tiny = torch.finfo(beta1.dtype).tiny

    def inv(t: torch.Tensor) -> torch.Tensor:
        return torch.where(t > 0, 1.0 / torch.clamp(t, min=tiny), zero)

    r1 = r
    r2 = r
    beta, oldb = beta1, zero
    dbar, epsln, phibar = zero, zero, beta1
    cs, sn = -torch.ones_like(beta1), zero
    w = tree_zeros_like(b)
    w2 = w
    min_alfa = torch.full_like(beta1, float("inf"))
    status = Status.FIXED_BUDGET
    steps = 0
    for steps in range(1, max_steps + 1):
        v = tree_scale(r2, inv(beta))
        y = matvec(v)
        num_matvecs += 1
        if steps >= 2:
            y = tree_axpy(-beta * inv(oldb), r1, y)
        alfa = tree_vdot(v, y)
        min_alfa = torch.fmin(min_alfa, alfa)
        y = tree_axpy(-alfa * inv(beta), r2, y)
        r1, r2 = r2, y
        oldb, beta = beta, torch.sqrt(tree_vdot(r2, r2))
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.clamp(torch.sqrt(gbar * gbar + beta * beta), min=tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = tree_scale(tree_axpy(-delta, w2, tree_axpy(-oldeps, w1, v)), 1.0 / gamma)
        x = tree_axpy(phi, w, x)
        if check:
            res = float(phibar)
            if res != res or res == float("inf"):
                status = Status.NONFINITE
                break
            if res <= float(tol):
                status = Status.SUCCESS
                break
    res = float(phibar)
    finite = bool(torch.stack([torch.isfinite(t).all() for t in _leaves(x)]).all())
    if res != res or res == float("inf") or not finite:
        status = Status.NONFINITE
    elif check and status is Status.FIXED_BUDGET:
        status = Status.MAX_STEPS_REACHED
    stats["indefinite"] = bool(min_alfa < 0)
    return Solution(x, status, steps, num_matvecs, res, stats)


def _leaves(t: TreeOrTensor) -> list[torch.Tensor]:
    return [t] if isinstance(t, torch.Tensor) else list(t.values())
