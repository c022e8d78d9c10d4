"""Many right-hand sides, one matrix: a Lanczos basis built once per operator and recycled."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, cast

import torch
from torch import Tensor

from .._checks import check_int, check_positive, check_rtol
from .._typing import MatVec, TreeOrTensor
from ._base import AbstractLinearSolver, Solution, Status, _tolerance
from ._lanczos import (
    LowRankInverse,
    converged_ritz_inverse,
    flat_start,
    lanczos,
    refreshed_inverse,
    ritz_pairs,
)
from ._operator_cache import OperatorCache, layout
from .minres import MINRES
from .pcg import pcg_flat

__all__ = ["RecycledLanczos"]


@dataclass(frozen=True)
class RecycledLanczos(AbstractLinearSolver):
    r"""Krylov recycling: one Lanczos factorisation per operator serves every right-hand side.

    On the first solve with an operator object it runs ``basis_size`` = :math:`m` Lanczos steps
    (full reorthogonalisation) from the residual :math:`r_0`, which gives both the minimal-residual
    solution in :math:`x_0 + \mathcal K_m(A, r_0)` and, from :math:`A V_m = V_{m+1}\bar H_m`, the Ritz
    pairs :math:`(\theta_i, u_i)`. It keeps the deflation preconditioner

    .. math::

        M^{-1} = U\,|\Theta|^{-1}U^\top + \frac{1}{|\theta|_{\min}}\,(I - UU^\top).

    Every later solve with the *same operator object* starts from the recycled guess
    :math:`x = x_0 + M^{-1} r_0` (no matvec), checks its true residual (one matvec) and, unless that
    already meets the tolerance, refines with preconditioned CG (at most ``max_steps`` steps).
    When the recycled basis is not good enough - PCG meets negative curvature (an indefinite
    system: the Ritz values have both signs) or misses the tolerance - it falls back to a fresh
    ``fallback`` solve (MINRES with the same budget by default) warm-started at the best iterate.
    Nothing is applied silently: the returned status is that of the last solver run, and
    ``stats`` records ``recycled``, ``fallback``, ``setup_matvecs`` (the basis, or the residual
    check of the recycled guess) and the Ritz values.

    The cache is tied to the operator object by a weak reference (never ``id()``); pass the same
    operator object for solves that share the matrix, and a new object (a new Hessian batch, new
    lower parameters) when it changes. A matrix changed in place under the same object is caught by
    the residual check and costs steps, not accuracy. :meth:`reset` forgets the basis.

    Args:
        basis_size: Lanczos steps :math:`m` of the factorisation (>= 1).
        max_steps: PCG steps per solve after the recycled guess (>= 1).
        rtol: relative tolerance on :math:`\|r\|/\|b\|` (0: fixed budget, no host sync in PCG).
        atol: absolute tolerance on :math:`\|r\|`.
        fallback: the solver used when recycling fails; ``None``: ``MINRES(max_steps, rtol, atol)``.
        ritz_tol: 0 (default) deflates every Ritz pair of the basis, the complement scaled by the
            smallest :math:`|\theta|` (right for a few large outliers over a tight bulk); ``> 0``
            deflates only the converged pairs, residual :math:`\|Au - \theta u\| \le`
            ``ritz_tol`` :math:`|\theta|` (estimated from the basis, no matvec), the complement scaled
            by the largest :math:`|\theta|` left out, so outliers at either end of the spectrum (a
            nearly singular, damped system) are removed and nothing unconverged is deflated.
        carry: on the first solve with a *new* operator object (the next alternation: the matrix
            changed slightly), re-fit the previous operator's deflation space to it by one
            Rayleigh-Ritz step (one matvec per kept vector, exact residuals, the unconverged pairs
            dropped by ``ritz_tol``) instead of building a new ``basis_size`` basis; a new basis is
            built when nothing is kept. The result is checked like every recycled solve (true
            residual, PCG, ``fallback``); ``stats["carried"]`` says when it happened. Keeps the
            deflation vectors alive between operators.

    Returns:
        A :class:`~hypergrad.solvers.Solution`.

    Example:
        >>> import torch
        >>> from hypergrad import RecycledLanczos
        >>> A = torch.diag(torch.cat([torch.tensor([50.0, 20.0, 10.0]), torch.ones(7)])).double()
        >>> solver, op = RecycledLanczos(basis_size=4, max_steps=10, rtol=1e-10), lambda v: A @ v
        >>> first = solver(op, torch.ones(10, dtype=torch.float64))
        >>> second = solver(op, torch.linspace(-1, 1, 10, dtype=torch.float64))
        >>> first.num_matvecs, second.num_matvecs, second.converged, second.stats["recycled"]
        (4, 1, True, True)

    References:
        Parks, de Sturler, Mackey, Johnson & Maiti (2006), Recycling Krylov subspaces for sequences
        of linear systems. SIAM J. Sci. Comput. 28(5).
        Saad, Yeung, Erhel & Guyomarc'h (2000), A deflated version of the conjugate gradient
        algorithm. SIAM J. Sci. Comput. 21(5).
    """

    basis_size: int = 8
    max_steps: int = 10
    rtol: float = 0.0
    atol: float = 0.0
    fallback: Optional[AbstractLinearSolver] = None
    ritz_tol: float = 0.0
    carry: bool = False
    _cache: OperatorCache = field(default_factory=OperatorCache, init=False, repr=False, compare=False)
    _carried: "_Slot" = field(default_factory=lambda: _Slot(), init=False, repr=False, compare=False)

    symmetric_only = True

    def __post_init__(self) -> None:
        check_int("basis_size", self.basis_size, owner="RecycledLanczos")
        check_int("max_steps", self.max_steps, owner="RecycledLanczos")
        check_rtol("rtol", self.rtol, owner="RecycledLanczos")
        check_positive("atol", self.atol, allow_zero=True, owner="RecycledLanczos")
        check_positive("ritz_tol", self.ritz_tol, allow_zero=True, owner="RecycledLanczos")
        if not isinstance(self.carry, bool):
            raise TypeError(f"RecycledLanczos: `carry` must be True or False, got {self.carry!r}.")
        if self.fallback is not None and not isinstance(self.fallback, AbstractLinearSolver):
            raise TypeError(
                "RecycledLanczos: `fallback` must be None or a hypergrad solver such as "
                f"hypergrad.MINRES(max_steps=20), got {type(self.fallback).__name__}."
            )

    def reset(self) -> None:
        """Forget the recycled basis and any carried one (the next solve builds a new one)."""
        self._cache.clear()
        self._carried.clear()

    def _solve(self, matvec: MatVec, b: TreeOrTensor, x0: TreeOrTensor | None) -> Solution:
        mv, unravel, bf, x, r, used = flat_start(matvec, b, x0)
        check = self.rtol > 0 or self.atol > 0
        tol = _tolerance(torch.linalg.vector_norm(bf), self.rtol, self.atol)
        if check and bool(torch.linalg.vector_norm(r) <= tol):
            return Solution(unravel(x), Status.SUCCESS, 0, used, float(torch.linalg.vector_norm(r)), _stats(0))
        inv: LowRankInverse | None = self._cache.get(matvec, b)
        recycled, carried, refresh = inv is not None, False, 0
        if inv is None and self.carry and (old := self._carried.get(b)) is not None:
            # a new operator (the next alternation): re-fit the previous deflation space to it
            inv, refresh = refreshed_inverse(mv, old, self.ritz_tol)
            carried = inv is not None
            if carried:
                self._cache.put(matvec, b, inv)
        if inv is None:
            k = lanczos(mv, r, self.basis_size)
            setup = k.size
            if not bool(torch.isfinite(k.H).all()):
                nan = torch.full_like(bf, float("nan"))
                return Solution(unravel(nan), Status.NONFINITE, 0, used + setup, float("nan"), _stats(setup))
            # minimal residual in x0 + K_m: y = argmin || beta0 e1 - H y ||; r = r0 - V_{m+1} H y exactly
            rhs = torch.zeros(k.H.shape[0], dtype=torch.float64, device=k.H.device)
            rhs[0] = k.beta0.to(torch.float64)
            y = torch.linalg.lstsq(k.H, rhs.unsqueeze(1)).solution.squeeze(1)
            x = x + k.V[: k.size].T @ y.to(bf.dtype)
            r = r - k.V.T @ (k.H @ y).to(bf.dtype)
            if self.ritz_tol > 0:
                inv = converged_ritz_inverse(k, self.ritz_tol)
            else:
                theta, U = ritz_pairs(k)
                inv = LowRankInverse(U, theta)
            setup += refresh
            self._cache.put(matvec, b, inv)
        else:
            x = x + inv(r)
            r = bf - mv(x)
            setup = 1 + refresh
        if self.carry:
            self._carried.put(b, inv)
        used += setup
        stats = _stats(setup, recycled, inv)
        stats["carried"] = carried
        res = torch.linalg.vector_norm(r)
        if check and bool(res <= tol):
            return Solution(unravel(x), Status.SUCCESS, 0, used, float(res), stats)
        if inv.all_positive:
            sol = pcg_flat(mv, bf, x, r, inv, self.max_steps, self.rtol, self.atol)
            used += sol.num_matvecs
            stats["min_curvature"] = sol.stats["min_curvature"]
            if not sol.failed:
                return Solution(unravel(cast(Tensor, sol.x)), sol.status, sol.num_steps, used, sol.residual_norm, stats)
            if sol.status is not Status.NONFINITE:
                x = cast(Tensor, sol.x) if sol.residual_norm is not None and sol.residual_norm < float(res) else x
        fallback = self.fallback or MINRES(max_steps=self.max_steps, rtol=self.rtol, atol=self.atol)
        sol = fallback(matvec, b, unravel(x))
        stats["fallback"] = type(fallback).__name__
        return Solution(sol.x, sol.status, sol.num_steps, used + sol.num_matvecs, sol.residual_norm, stats)


def _stats(setup: int, recycled: bool = False, inv: LowRankInverse | None = None) -> dict:
    out: dict = {"setup_matvecs": setup, "recycled": recycled, "carried": False, "fallback": None}
    if inv is not None:
        out["ritz_values"] = [float(t) for t in inv.theta]
    return out


class _Slot:
    """The deflation space carried to the next operator (``carry=True``), for one layout; copies start empty."""

    def __init__(self) -> None:
        self._layout: Optional[tuple] = None
        self._value: Optional[LowRankInverse] = None

    def get(self, b: TreeOrTensor) -> Optional[LowRankInverse]:
        return self._value if self._layout == layout(b) else None

    def put(self, b: TreeOrTensor, value: LowRankInverse) -> None:
        self._layout, self._value = layout(b), value

    def clear(self) -> None:
        self._layout, self._value = None, None

    def __reduce__(self) -> tuple:
        return (_Slot, ())

    def __deepcopy__(self, memo: dict) -> "_Slot":
        return _Slot()
