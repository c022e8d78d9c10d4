"""Richardson iteration, shared by :class:`Neumann` and :class:`FixedPoint`."""

from __future__ import annotations

import torch

from .._typing import MatVec, TreeOrTensor
from ..tree import tree_axpy, tree_norm
from ._base import Solution, Status, _start, _tolerance

# The residual of a convergent Richardson iteration on an SPD operator never grows; for a
# non-normal contraction it can grow transiently, so only a tenfold growth counts as divergence.
_DIVERGENCE_FACTOR = 10.0


def richardson(
    matvec: MatVec,
    b: TreeOrTensor,
    x0: TreeOrTensor | None,
    *,
    alpha: float,
    max_steps: int,
    rtol: float,
    atol: float,
) -> Solution:
    """``x <- x + alpha (b - A x)`` with the residual updated as ``r <- r - alpha A r``."""
    check = rtol > 0 or atol > 0
    x, r, num_matvecs = _start(matvec, b, x0)
    r0 = tree_norm(r)
    tol = _tolerance(tree_norm(b), rtol, atol) if check else torch.zeros_like(r0)
    status = Status.FIXED_BUDGET
    steps = 0
    if check and bool(r0 <= tol):
        return Solution(x, Status.SUCCESS, 0, num_matvecs, float(r0))
    for steps in range(1, max_steps + 1):
        ar = matvec(r)
        num_matvecs += 1
        x = tree_axpy(alpha, r, x)
        r = tree_axpy(-alpha, ar, r)
        if check:
            res = float(tree_norm(r))
            if res != res or res == float("inf"):
                status = Status.NONFINITE
                break
            if res > _DIVERGENCE_FACTOR * float(r0):
                status = Status.DIVERGED
                break
            if res <= float(tol):
                status = Status.SUCCESS
                break
    res_t = tree_norm(r)
    res, start = (float(v) for v in torch.stack([res_t, r0.to(res_t.dtype)]))
    if res != res or res == float("inf"):
        status = Status.NONFINITE
    elif res > _DIVERGENCE_FACTOR * start and start > 0:
        status = Status.DIVERGED
    elif check and status is Status.FIXED_BUDGET:
        status = Status.MAX_STEPS_REACHED
    return Solution(x, status, steps, num_matvecs, res, {"initial_residual_norm": start})
