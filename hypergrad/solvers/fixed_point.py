"""Fixed-point iteration for the adjoint of a fixed-point map."""

from __future__ import annotations

from dataclasses import dataclass

from .._checks import check_int, check_rtol
from .._typing import MatVec, TreeOrTensor
from ._base import AbstractLinearSolver, Solution
from ._richardson import richardson

__all__ = ["FixedPoint"]


@dataclass(frozen=True)
class FixedPoint(AbstractLinearSolver):
    r"""Fixed-point iteration of Grazzi et al. (2020) for :math:`(I - J^\top) v = b`.

    For a fixed-point inner problem :math:`\theta^* = \Phi(\theta^*, \lambda)` with
    :math:`J = \partial_\theta \Phi`, the adjoint equation :math:`v = J^\top v + b` is solved by

    .. math::

        v_{k+1} = J^\top v_k + b \;=\; v_k + \big(b - (I - J^\top) v_k\big),

    i.e. Richardson with unit step on the operator :math:`A = I - J^\top` that
    :class:`hypergrad.FixedPointOperator` provides. It converges linearly when :math:`\Phi` is a
    contraction; stops when :math:`\|v_{k+1} - v_k\| \le \mathrm{rtol}\,\|b\|`.

    Args:
        max_steps: iteration budget (>= 1).
        rtol: relative tolerance on the step :math:`\|v_{k+1}-v_k\|/\|b\|` (0: fixed budget).

    Example:
        >>> import torch
        >>> from hypergrad.solvers import FixedPoint
        >>> J = torch.tensor([[0.5, 0.2], [0.0, 0.3]], dtype=torch.float64)
        >>> A = lambda v: v - J.T @ v  # I - J^T
        >>> sol = FixedPoint(max_steps=200, rtol=1e-12)(A, torch.ones(2, dtype=torch.float64))
        >>> sol.converged
        True

    References:
        Grazzi, Franceschi, Pontil & Salzo (ICML 2020), On the iteration complexity of
        hypergradient computation.
    """

    max_steps: int = 100
    rtol: float = 1e-6

    def __post_init__(self) -> None:
        check_int("max_steps", self.max_steps, owner="FixedPoint")
        check_rtol("rtol", self.rtol, owner="FixedPoint")

    def _solve(self, matvec: MatVec, b: TreeOrTensor, x0: TreeOrTensor | None) -> Solution:
        return richardson(matvec, b, x0, alpha=1.0, max_steps=self.max_steps, rtol=self.rtol, atol=0.0)
