"""The first-order baseline: pretend the operator is the identity."""

from __future__ import annotations

from dataclasses import dataclass

from .._typing import MatVec, TreeOrTensor
from ._base import AbstractLinearSolver, Solution, Status

__all__ = ["Identity"]


@dataclass(frozen=True)
class Identity(AbstractLinearSolver):
    r"""Return :math:`x = b`, i.e. approximate :math:`A^{-1}` by :math:`I` (zero matvecs).

    In :func:`hypergrad.implicit_grad` this is the first-order ("no implicit Jacobian") baseline
    used by DARTS-style and T1-T2 methods; for the proximal BiSSL operator
    :math:`I + H/\lambda` it drops the Hessian term. It makes no accuracy claim: ``status`` is
    :attr:`Status.FIXED_BUDGET` and ``residual_norm`` is ``None``.

    Example:
        >>> import torch
        >>> from hypergrad.solvers import Identity
        >>> Identity()(lambda v: 2 * v, torch.ones(2)).x
        tensor([1., 1.])
    """

    def _solve(self, matvec: MatVec, b: TreeOrTensor, x0: TreeOrTensor | None) -> Solution:
        return Solution(b, Status.FIXED_BUDGET, 0, 0, None)
