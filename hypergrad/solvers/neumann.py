"""Truncated Neumann series (Richardson iteration with step ``alpha``)."""

from __future__ import annotations

from dataclasses import dataclass

from .._checks import check_int, check_positive, check_rtol
from .._typing import MatVec, TreeOrTensor
from ._base import AbstractLinearSolver, Solution
from ._richardson import richardson

__all__ = ["Neumann"]


@dataclass(frozen=True)
class Neumann(AbstractLinearSolver):
    r"""Truncated Neumann series for :math:`A^{-1} b`.

    .. math::

        A^{-1} b = \alpha \sum_{k \ge 0} (I - \alpha A)^k b
        \quad\Longleftrightarrow\quad
        x_{k+1} = x_k + \alpha (b - A x_k),

    which converges when the spectral radius of :math:`I - \alpha A` is below one (for SPD
    :math:`A`: :math:`0 < \alpha < 2/\lambda_{\max}`). One ``matvec`` per step. Works for
    non-symmetric operators too. Growth of the residual is reported as :attr:`Status.DIVERGED`.

    Args:
        max_steps: number of series terms (>= 1): from :math:`x_0 = 0`, ``max_steps`` = K steps give
            :math:`x_K = \alpha \sum_{k<K} (I - \alpha A)^k b`.
        alpha: step, > 0. Too large diverges; too small converges slowly.
        rtol: optional relative tolerance (0: fixed budget, no per-step host sync).
        atol: optional absolute tolerance.

    Example:
        >>> import torch
        >>> from hypergrad.solvers import Neumann
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> sol = Neumann(max_steps=200, alpha=0.5, rtol=1e-10)(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> sol.converged, [round(v, 6) for v in sol.x.tolist()]
        (True, [0.5, 1.0])

    References:
        Lorraine, Vicol & Duvenaud (AISTATS 2020), Optimizing millions of hyperparameters by
        implicit differentiation.
    """

    max_steps: int = 10
    alpha: float = 1.0
    rtol: float = 0.0
    atol: float = 0.0

    def __post_init__(self) -> None:
        check_int("max_steps", self.max_steps, owner="Neumann")
        check_positive("alpha", self.alpha, allow_zero=True, owner="Neumann")
        if self.alpha == 0:
            raise ValueError("Neumann: `alpha` must be > 0, got 0. A typical choice is 1 / lambda_max(A).")
        check_rtol("rtol", self.rtol, owner="Neumann")
        check_positive("atol", self.atol, allow_zero=True, owner="Neumann")

    def _solve(self, matvec: MatVec, b: TreeOrTensor, x0: TreeOrTensor | None) -> Solution:
        return richardson(matvec, b, x0, alpha=self.alpha, max_steps=self.max_steps, rtol=self.rtol, atol=self.atol)
