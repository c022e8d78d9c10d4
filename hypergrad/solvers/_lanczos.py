"""Krylov bases on flattened trees: Lanczos with full reorthogonalisation, Ritz pairs, low-rank inverses.

Private helpers for :mod:`hypergrad.solvers.recycled` and :mod:`hypergrad.solvers.preconditioners`.
Vectors are flattened into one 1-D tensor (in the working dtype and device of the right-hand side);
the small projected matrices are float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .._typing import MatVec, TreeOrTensor

__all__ = ["flattener", "lanczos", "ritz_pairs", "converged_ritz_inverse", "refreshed_inverse", "LowRankInverse"]


def flattener(b: TreeOrTensor) -> tuple[Callable[[TreeOrTensor], Tensor], Callable[[Tensor], TreeOrTensor]]:
    """``(ravel, unravel)`` for trees laid out like ``b`` (keys in ``b``'s order)."""
    if isinstance(b, Tensor):
        shape = b.shape
        return (lambda t: t.reshape(-1)), (lambda v: v.reshape(shape))
    keys = list(b.keys())
    shapes = [b[k].shape for k in keys]
    sizes = [b[k].numel() for k in keys]

    def ravel(t: TreeOrTensor) -> Tensor:
        return torch.cat([t[k].reshape(-1) for k in keys])  # type: ignore[index]

    def unravel(v: Tensor) -> TreeOrTensor:
        return {k: p.reshape(s) for k, p, s in zip(keys, torch.split(v, sizes), shapes)}

    return ravel, unravel


def flat_matvec(matvec: MatVec, b: TreeOrTensor) -> Callable[[Tensor], Tensor]:
    """``matvec`` acting on flat vectors laid out like ``b``."""
    ravel, unravel = flattener(b)
    return lambda v: ravel(matvec(unravel(v))).detach()


def flat_start(
    matvec: MatVec, b: TreeOrTensor, x0: TreeOrTensor | None
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], TreeOrTensor], Tensor, Tensor, Tensor, int]:
    """A solve on flat vectors laid out like ``b``, from ``x0`` (zero without one).

    Returns ``(mv, unravel, b, x, r, num_matvecs)``: the flat operator, the flat ``b`` and start,
    its residual ``r = b - A x`` and the matvecs spent on it (one with ``x0``).
    """
    ravel, unravel = flattener(b)
    mv = flat_matvec(matvec, b)
    bf = ravel(b)
    if x0 is None:
        return mv, unravel, bf, torch.zeros_like(bf), bf, 0
    x = ravel(x0)
    return mv, unravel, bf, x, bf - mv(x), 1


@dataclass
class Krylov:
    """An orthonormal Krylov basis with :math:`A V_m = V_{m+1} \\bar H` (to rounding).

    Attributes:
        V: ``(m + 1, n)``: rows are the basis vectors (the last one spans the next direction).
        H: ``(m + 1, m)`` float64: the projected operator (tridiagonal up to rounding for symmetric A).
        beta0: :math:`\\|r_0\\|`, the norm of the start vector.
    """

    V: Tensor
    H: Tensor
    beta0: Tensor

    @property
    def size(self) -> int:
        return self.H.shape[1]


def lanczos(mv: Callable[[Tensor], Tensor], r0: Tensor, m: int) -> Krylov:
    r"""``m`` steps of Lanczos from ``r0`` with full (twice-applied) reorthogonalisation.

    Written as Arnoldi so that the relation :math:`A V_m = V_{m+1}\bar H` holds to rounding even
    when reorthogonalisation corrections are not negligible (single precision). A breakdown
    (an invariant subspace) leaves zero rows, never NaN, and needs no host synchronisation.
    """
    r0 = r0.detach()
    n = r0.numel()
    m = max(1, min(m, n))
    V = torch.zeros(m + 1, n, dtype=r0.dtype, device=r0.device)
    H = torch.zeros(m + 1, m, dtype=torch.float64, device=r0.device)
    beta0 = torch.linalg.vector_norm(r0)
    tiny = torch.finfo(r0.dtype).tiny
    V[0] = torch.where(beta0 > tiny, r0 / torch.clamp(beta0, min=tiny), torch.zeros_like(r0))
    for j in range(m):
        w = mv(V[j])
        h = V[: j + 1] @ w
        w = w - V[: j + 1].T @ h
        h2 = V[: j + 1] @ w
        w = w - V[: j + 1].T @ h2
        beta = torch.linalg.vector_norm(w)
        H[: j + 1, j] = (h + h2).to(torch.float64)
        H[j + 1, j] = beta.to(torch.float64)
        scale = float(torch.finfo(r0.dtype).eps) * torch.clamp(torch.linalg.vector_norm(h), min=tiny)
        V[j + 1] = torch.where(beta > scale, w / torch.clamp(beta, min=tiny), torch.zeros_like(w))
    return Krylov(V, H, beta0)


def ritz_pairs(k: Krylov, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """Ritz values (float64, largest ``|theta|`` first) and vectors ``(r, n)`` of the symmetric part."""
    theta, S, _ = _ritz(k)
    if rank is not None:
        theta, S = theta[:rank], S[:, :rank]
    U = S.T.to(k.V.dtype) @ k.V[: k.size]
    return theta, U


def _ritz(k: Krylov) -> tuple[Tensor, Tensor, Tensor]:
    """Ritz values (largest ``|theta|`` first), their coordinates ``S`` and residual estimates.

    The residual of the Ritz pair :math:`(\theta_i, V_m s_i)` is :math:`|\beta_m s_{m,i}|` in exact
    arithmetic (Paige): the last row of :math:`\bar H` times the last component of :math:`s_i`.
    """
    m = k.size
    T = k.H[:m, :m]
    T = 0.5 * (T + T.T)
    theta, S = torch.linalg.eigh(T)
    order = torch.argsort(theta.abs(), descending=True)
    theta, S = theta[order], S[:, order]
    keep = theta.abs() > 1e-10 * torch.clamp(theta.abs().max(), min=1e-300)
    theta, S = theta[keep], S[:, keep]
    return theta, S, (k.H[m, m - 1] * S[m - 1]).abs()


def converged_ritz_inverse(k: Krylov, ritz_tol: float) -> "LowRankInverse":
    r"""The deflation preconditioner of the *converged* Ritz pairs only.

    Keeps the pairs whose residual estimate is at most ``ritz_tol`` :math:`|\theta_i|` (an
    unconverged pair is a mix of eigenvectors: deflating it with :math:`1/\theta_i` distorts the
    spectrum rather than removing a part of it). The complement is scaled by :math:`1/\max|\theta|`
    over the pairs left out (they lie inside the spectrum that remains), so the deflated directions
    map to 1, inside the complement's preconditioned range :math:`(0, \approx 1]`: the condition number
    becomes that of the spectrum left after deflation, at both ends.
    """
    theta, S, res = _ritz(k)
    good = res <= ritz_tol * theta.abs()
    rest = theta[~good].abs()
    U = S[:, good].T.to(k.V.dtype) @ k.V[: k.size]
    return LowRankInverse(U, theta[good], complement=float(rest.max()) if rest.numel() else None)


class LowRankInverse:
    r"""Apply :math:`M^{-1} r = U\,|\Theta|^{-1} U^\top r + s\,(r - U U^\top r)` to flat vectors.

    ``U`` ``(r, n)`` has orthonormal rows, ``theta`` the eigenvalue estimates (their absolute values
    are used, so :math:`M` is SPD) and :math:`s = 1/|\theta|_{\min}` by default (the complement is
    treated as the smallest captured eigenvalue, as in Nystrom preconditioning).
    """

    def __init__(self, U: Tensor, theta: Tensor, complement: float | None = None):
        U, theta = U.detach(), theta.detach()
        self.U = U
        mag = theta.abs()
        self.inv = (1.0 / mag).to(U.dtype) if mag.numel() else mag.to(U.dtype)
        if complement is None:
            complement = float(mag.min()) if mag.numel() else 1.0
        self.s = 1.0 / complement
        self.theta = theta
        self.all_positive = bool((theta > 0).all()) if theta.numel() else True

    def __call__(self, r: Tensor) -> Tensor:
        if self.U.shape[0] == 0:
            return self.s * r
        c = self.U @ r
        return self.U.T @ (self.inv * c) + self.s * (r - self.U.T @ c)


def refreshed_inverse(
    mv: Callable[[Tensor], Tensor], old: "LowRankInverse", ritz_tol: float
) -> tuple["LowRankInverse | None", int]:
    r"""``(inverse, matvecs)``: the deflation space of ``old`` re-fitted to a new (changed) operator.

    One Rayleigh-Ritz step on :math:`\mathrm{span}(U)`: :math:`W = A U` (one matvec per kept vector),
    :math:`T = U W^\top = Y \Theta Y^\top`, new pairs :math:`(\theta_i, Y^\top U)` with their *exact*
    residuals :math:`\|Y^\top W - \Theta Y^\top U\|`; with ``ritz_tol > 0`` only the pairs with residual
    :math:`\le` ``ritz_tol`` :math:`|\theta_i|` are kept. ``None`` when ``A U`` is not finite or no
    pair is kept (then build a new basis). The complement scale of ``old`` is kept.
    """
    U = old.U
    n = U.shape[0]
    if n == 0:
        return None, 0
    W = torch.stack([mv(u) for u in U])
    if not bool(torch.isfinite(W).all()):
        return None, n
    T = U.to(torch.float64) @ W.to(torch.float64).T
    theta, Y = torch.linalg.eigh(0.5 * (T + T.T))
    Un, Wn = Y.T.to(U.dtype) @ U, Y.T.to(W.dtype) @ W
    res = torch.linalg.vector_norm((Wn - theta.to(U.dtype)[:, None] * Un).to(torch.float64), dim=1)
    good = res <= ritz_tol * theta.abs() if ritz_tol > 0 else theta.abs() > 0
    if not bool(good.any()):
        return None, n
    return LowRankInverse(Un[good], theta[good], complement=1.0 / old.s), n
