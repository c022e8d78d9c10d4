"""Dense reference solver: materialise the operator and call ``torch.linalg.solve``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_int
from .._typing import MatVec, TreeOrTensor
from ..tree import tree_ravel
from ._base import AbstractLinearSolver, Solution, Status

__all__ = ["Dense", "materialize"]


def materialize(matvec: MatVec, like: TreeOrTensor) -> Tensor:
    r"""The dense matrix :math:`A` of a linear map on trees shaped like ``like``.

    Column :math:`j` is :math:`A e_j` on the flattened tree. The columns are computed in one
    ``torch.func.vmap`` call when the operator supports it, otherwise one by one.

    Args:
        matvec: the linear map ``v -> A v``.
        like: a tree (or tensor) with the shapes, dtype and device of the vectors ``matvec`` takes.

    Returns:
        The :math:`n \times n` matrix, :math:`n` the number of entries of ``like`` (flattened in
        :func:`hypergrad.tree_ravel` order).

    Example:
        >>> import torch
        >>> M = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> materialize(lambda v: M @ v, torch.zeros(2))
        tensor([[1., 2.],
                [3., 4.]])
    """
    flat, unravel = tree_ravel(like)
    n = flat.numel()
    eye = torch.eye(n, dtype=flat.dtype, device=flat.device)
    if n == 0:  # no unknowns: the empty matrix (vmap and stack refuse an empty batch)
        return eye

    def column(e: Tensor) -> Tensor:
        return tree_ravel(matvec(unravel(e)))[0]

    try:
        cols = torch.func.vmap(column)(eye)
    except Exception:  # an op without a batching rule: fall back to a plain loop
        cols = torch.stack([column(e) for e in eye])
    return cols.T.contiguous()


@dataclass(frozen=True)
class Dense(AbstractLinearSolver):
    r"""Exact solve by materialisation: :math:`x = A^{-1} b` with ``torch.linalg.solve``.

    Builds the :math:`n \times n` matrix with :math:`n` matvecs (batched by ``vmap``), so it is the
    reference for tests and the right choice only for small problems. A singular matrix gives
    :attr:`Status.SINGULAR`. A float16/bfloat16 system is materialised in its own dtype, solved in
    float32 and the solution cast back (``torch.linalg`` has no half-precision kernels).

    Args:
        max_size: refuse operators on more than this many unknowns (memory is :math:`n^2`).

    Example:
        >>> import torch
        >>> from hypergrad.solvers import Dense
        >>> A = torch.tensor([[3.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
        >>> Dense()(lambda v: A @ v, torch.tensor([4.0, 2.0], dtype=torch.float64)).x
        tensor([1., 1.], dtype=torch.float64)
    """

    max_size: int = 20_000

    def __post_init__(self) -> None:
        check_int("max_size", self.max_size, owner="Dense")

    def _solve(self, matvec: MatVec, b: TreeOrTensor, x0: TreeOrTensor | None) -> Solution:
        flat_b, unravel = tree_ravel(b)
        n = flat_b.numel()
        if n > self.max_size:
            raise ValueError(
                f"Dense: the operator acts on {n} unknowns, more than `max_size`={self.max_size}; "
                f"materialising it needs {n * n * flat_b.element_size() / 2**30:.1f} GiB. Use "
                "`hypergrad.solvers.CG` (symmetric) or `Neumann`, or raise `max_size`."
            )
        matrix = materialize(matvec, b)  # in b's dtype: the matvec sees the vectors it was written for
        dtype = flat_b.dtype
        if dtype in _LOW_PRECISION:  # torch.linalg has no half kernels: solve in float32, cast back
            matrix, flat_b = matrix.to(torch.float32), flat_b.to(torch.float32)
        x, info = torch.linalg.solve_ex(matrix, flat_b)
        if int(info) != 0:
            return Solution(unravel(torch.full_like(flat_b, float("nan")).to(dtype)), Status.SINGULAR, 1, n, None)
        residual = float(torch.linalg.vector_norm(matrix @ x - flat_b))
        x = x.to(dtype)
        finite = bool(torch.isfinite(x).all()) and residual == residual
        status = Status.SUCCESS if finite else Status.NONFINITE
        return Solution(unravel(x), status, 1, n, residual, {"condition_number": _cond(matrix)})


#: Dtypes ``torch.linalg.solve`` lacks kernels for; :class:`Dense` promotes them to float32.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _cond(matrix: Tensor) -> float:
    try:
        return float(torch.linalg.cond(matrix))
    except RuntimeError:  # pragma: no cover - non-finite matrix
        return float("nan")
