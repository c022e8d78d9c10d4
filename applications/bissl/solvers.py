r"""The BiSSL authors' implicit-Jacobian solver: conjugate gradient *per parameter tensor*.

The authors' code (``source/bissl/ij_solvers.py`` of their NIPS25 submission) solves
:math:`A x = b`, :math:`A = I + H/(\lambda + d)`, with a CG whose step sizes are computed separately
for every parameter tensor ("layer") :math:`\ell` while the matrix-vector product couples all of them:

.. math::

    q = A p,\quad
    \alpha_\ell = \frac{r_\ell^\top r_\ell}{p_\ell^\top q_\ell + \epsilon},\quad
    x_\ell \mathrel{+}= \alpha_\ell p_\ell,\quad
    r_\ell' = r_\ell - \alpha_\ell q_\ell,\quad
    \beta_\ell = \frac{r_\ell'^\top r_\ell'}{r_\ell^\top r_\ell + \epsilon},\quad
    p_\ell = r_\ell' + \beta_\ell p_\ell,

with :math:`\epsilon = 10^{-12}`, no curvature guard (a tensor with :math:`p_\ell^\top q_\ell < 0`
steps anyway) and ``nan_to_num`` on the result. With a single tensor it is textbook CG (up to
:math:`\epsilon`); with several it is not CG on :math:`A` (the directions are not
:math:`A`-conjugate across tensors), and the two agree only while :math:`A \approx I`.

:class:`LayerwiseCG` implements it behind hypergrad's solver protocol. Unlike the authors' code it
never hides what happened: a direction of non-positive curvature of :math:`A` ->
``NEGATIVE_CURVATURE`` (the step was still taken, as the authors do); NaN/inf replaced by
``nan_to_num`` -> ``NONFINITE`` (the BiSSL stage then skips the step and reports it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hypergrad import AbstractLinearSolver, Solution, Status

__all__ = ["LayerwiseCG"]


@dataclass(frozen=True)
class LayerwiseCG(AbstractLinearSolver):
    r"""The authors' per-tensor ("layer-wise") CG for :math:`A x = b` (see the module docstring).

    Args:
        max_steps: iterations (the authors: 5), each one ``matvec``; no tolerance stop.
        eps: added to both denominators (the authors: 1e-12).

    Returns:
        A :class:`hypergrad.Solution` with ``stats["min_curvature"]`` (the smallest Rayleigh
        quotient :math:`p^\top A p / p^\top p` of the whole directions met; :math:`\le 0` proves
        :math:`A` indefinite and gives ``NEGATIVE_CURVATURE``), ``stats["tensor_nonpositive_steps"]``
        (per-tensor steps with :math:`p_\ell^\top q_\ell \le 0`, taken anyway as the authors do; they
        happen even for positive definite :math:`A`, because :math:`q_\ell` mixes all tensors) and
        ``stats["nonfinite_replaced"]``.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> sol = LayerwiseCG(max_steps=2)(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(A @ sol.x, torch.ones(2, dtype=torch.float64)), sol.status.value
        (True, 'fixed_budget')
    """

    max_steps: int = 5
    eps: float = 1e-12

    symmetric_only = True

    def __post_init__(self) -> None:
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"LayerwiseCG: `max_steps` must be an int >= 1, got {self.max_steps!r}.")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 <= self.eps < 1:
            raise ValueError(f"LayerwiseCG: `eps` must be a number in [0, 1), got {self.eps!r}.")

    def _solve(self, matvec, b, x0):  # type: ignore[no-untyped-def]
        single = isinstance(b, torch.Tensor)
        bt = {"": b} if single else dict(b)

        def mv(v: dict) -> dict:
            out = matvec(v[""] if single else v)
            return {"": out} if single else dict(out)

        if x0 is None:
            x = {k: torch.zeros_like(v) for k, v in bt.items()}
            r = {k: v.clone() for k, v in bt.items()}
            n_mv = 0
        else:
            x = {k: v.clone() for k, v in ({"": x0} if single else dict(x0)).items()}
            ax = mv(x)
            r = {k: bt[k] - ax[k] for k in bt}
            n_mv = 1
        p = {k: v.clone() for k, v in r.items()}
        rr = {k: torch.vdot(v.flatten(), v.flatten()) for k, v in r.items()}
        min_curv, tensor_neg = float("inf"), 0
        for _ in range(self.max_steps):
            q = mv(p)
            n_mv += 1
            pqs = {k: torch.vdot(p[k].flatten(), q[k].flatten()) for k in bt}
            pp_all = float(sum(torch.vdot(v.flatten(), v.flatten()) for v in p.values()))
            if pp_all > 0:  # Rayleigh quotient of A along the whole direction: <= 0 means A is indefinite
                min_curv = min(min_curv, float(sum(pqs.values())) / pp_all)
            for k in bt:
                pq = pqs[k]
                tensor_neg += int(float(pq) <= 0)
                alpha = rr[k] / (pq + self.eps)
                x[k] = x[k] + alpha * p[k]
                r[k] = r[k] - alpha * q[k]
                rr_new = torch.vdot(r[k].flatten(), r[k].flatten())
                beta = rr_new / (rr[k] + self.eps)
                p[k] = r[k] + beta * p[k]
                rr[k] = rr_new
        bad = sum(int((~torch.isfinite(v)).sum()) for v in x.values())
        x = {k: torch.nan_to_num(v) for k, v in x.items()}
        res = float(torch.sqrt(sum(rr.values())))  # the recursively updated residual, as CG reports
        if bad or res != res:
            status = Status.NONFINITE
        elif min_curv <= 0:
            status = Status.NEGATIVE_CURVATURE
        else:
            status = Status.FIXED_BUDGET
        out = x[""] if single else x
        stats = {"min_curvature": min_curv, "nonfinite_replaced": bad, "tensor_nonpositive_steps": tensor_neg}
        return Solution(out, status, self.max_steps, n_mv, res, stats)
