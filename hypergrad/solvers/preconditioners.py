r"""Preconditioners for :class:`~hypergrad.solvers.PCG`: settings objects that build :math:`M^{-1}`.

A preconditioner is built once per operator (the solver caches it, tied to the operator object)
from a few matvecs, then applied to every residual. Two are provided:

* :class:`HutchinsonDiagonal`: :math:`M = \operatorname{diag}(A)`, estimated by Hutchinson's
  :math:`\operatorname{diag}(A) \approx \frac1s\sum_i z_i \odot A z_i` with Rademacher :math:`z_i`.
* :class:`Nystrom`: a rank-:math:`\ell` eigen-approximation :math:`A \approx U\Lambda U^\top`
  deflated out of the spectrum, from a random sketch (randomised Nystrom) or from the Lanczos
  basis of the first right-hand side (the recycled Krylov subspace).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_positive
from .._typing import MatVec, TreeOrTensor
from ._lanczos import LowRankInverse, flat_matvec, flattener, lanczos, ritz_pairs

__all__ = ["AbstractPreconditioner", "BuiltPreconditioner", "HutchinsonDiagonal", "Nystrom"]


@dataclass
class BuiltPreconditioner:
    """A preconditioner built for one operator: ``apply(r) -> M^{-1} r`` on flat vectors.

    Attributes:
        apply: the map on flattened residuals.
        num_matvecs: matvecs spent building it.
        finite: ``False`` when the operator returned non-finite values while it was built.
        positive: ``False`` when the estimate met non-positive eigenvalues (absolute values used).
    """

    apply: Callable[[Tensor], Tensor]
    num_matvecs: int
    finite: bool = True
    positive: bool = True


class AbstractPreconditioner(abc.ABC):
    r"""Settings of a preconditioner; :meth:`build` makes :math:`M^{-1}` for one operator.

    Subclasses are frozen dataclasses; :class:`~hypergrad.solvers.PCG` calls :meth:`build` once per
    operator object and caches the result.

    Example:
        >>> import torch, hypergrad
        >>> pre = hypergrad.HutchinsonDiagonal(num_samples=4)
        >>> built = pre.build(lambda v: 3.0 * v, torch.ones(5))
        >>> built.apply(torch.ones(5)), built.num_matvecs
        (tensor([0.3333, 0.3333, 0.3333, 0.3333, 0.3333]), 4)
    """

    @abc.abstractmethod
    def build(self, matvec: MatVec, b: TreeOrTensor) -> BuiltPreconditioner:
        """Build :math:`M^{-1}` for ``matvec`` acting on trees laid out like ``b``.

        Args:
            matvec: the operator ``v -> A v``.
            b: a right-hand side (its layout, dtype and device; Lanczos sketches also start from it).

        Returns:
            A :class:`BuiltPreconditioner`.
        """


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hutchinson_estimate(
    mv: Callable[[Tensor], Tensor], like: Tensor, num_samples: int, seed: int, mask: Optional[Tensor] = None
) -> Tensor:
    r"""The Hutchinson estimate :math:`\frac1s\sum_i z_i \odot A z_i`, Rademacher probes :math:`z_i`
    shaped like ``like`` (``mask``: probes zero outside it, so only that part of the diagonal is estimated)."""
    gen = _generator(seed)
    d = torch.zeros_like(like)
    for _ in range(num_samples):
        z = (torch.randint(0, 2, like.shape, generator=gen) * 2 - 1).to(dtype=like.dtype, device=like.device)
        if mask is not None:
            z = torch.where(mask, z, torch.zeros_like(z))
        d = d + z * mv(z)
    return d / num_samples


@dataclass(frozen=True)
class HutchinsonDiagonal(AbstractPreconditioner):
    r"""Jacobi preconditioning with a Hutchinson estimate of the diagonal.

    .. math::

        d = \frac{1}{s}\sum_{i=1}^{s} z_i \odot A z_i,\quad z_i \in \{-1, 1\}^n,\qquad
        M^{-1} r = r \oslash \max(d, \rho\,\overline{|d|})

    (:math:`\mathbb E[z \odot Az] = \operatorname{diag}(A)`). Costs ``num_samples`` matvecs once per
    operator. Entries below ``min_ratio`` times the mean magnitude are clamped, keeping
    :math:`M` positive definite when the estimate is noisy or :math:`A` indefinite.

    Args:
        num_samples: number of probe vectors :math:`s` (>= 1).
        min_ratio: the clamp :math:`\rho` relative to the mean :math:`|d|` (> 0).
        seed: seed of the probes (CPU generator; the probes are moved to the operator's device).

    Example:
        >>> import torch
        >>> from hypergrad import HutchinsonDiagonal
        >>> A = torch.diag(torch.tensor([1.0, 10.0, 100.0]))
        >>> HutchinsonDiagonal(num_samples=1).build(lambda v: A @ v, torch.ones(3)).apply(torch.ones(3))
        tensor([1.0000, 0.1000, 0.0100])

    References:
        Bekas, Kokiopoulou & Saad (2007), An estimator for the diagonal of a matrix.
    """

    num_samples: int = 8
    min_ratio: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("num_samples", self.num_samples, owner="HutchinsonDiagonal")
        check_positive("min_ratio", self.min_ratio, owner="HutchinsonDiagonal")
        check_int("seed", self.seed, minimum=0, owner="HutchinsonDiagonal")

    def build(self, matvec: MatVec, b: TreeOrTensor) -> BuiltPreconditioner:
        ravel, _ = flattener(b)
        mv = flat_matvec(matvec, b)
        d = hutchinson_estimate(mv, ravel(b), self.num_samples, self.seed)
        finite = bool(torch.isfinite(d).all())
        if not finite:
            d = torch.ones_like(d)
        positive = bool((d > 0).all())
        floor = self.min_ratio * d.abs().mean()
        d = torch.clamp(d, min=float(floor) if float(floor) > 0 else 1.0)
        inv = 1.0 / d
        return BuiltPreconditioner(lambda r: inv * r, self.num_samples, finite, positive)


@dataclass(frozen=True)
class Nystrom(AbstractPreconditioner):
    r"""Low-rank (Nystrom) preconditioning: deflate the top eigenpairs of :math:`A`.

    With :math:`A \approx U \Lambda U^\top` (rank :math:`\ell`, :math:`U^\top U = I`):

    .. math::

        M^{-1} r = U \Lambda^{-1} U^\top r + \frac{1}{\lambda_\ell}\,(I - U U^\top)\, r,

    which maps the captured eigenvalues to about 1 and scales the rest by :math:`1/\lambda_\ell`,
    so CG's condition number drops from :math:`\lambda_1/\lambda_n` to about
    :math:`\lambda_\ell/\lambda_n`. The sketch costs ``rank`` matvecs once per operator:

    * ``sketch="lanczos"`` (default): Ritz pairs of ``rank`` Lanczos steps (full
      reorthogonalisation) started from the first right-hand side: the recycled Krylov subspace;
      good at the extreme eigenvalues, which dominate the condition number.
    * ``sketch="random"``: the randomised Nystrom approximation
      :math:`A\Omega(\Omega^\top A\Omega)^{-1}\Omega^\top A` of a Gaussian sketch :math:`\Omega`
      (stabilised by a shift :math:`\nu = \epsilon\|A\Omega\|`; for an indefinite :math:`A` it
      falls back to Rayleigh-Ritz on :math:`\operatorname{range}\Omega`).

    Absolute eigenvalues are used, so :math:`M` stays positive definite.

    Args:
        rank: :math:`\ell`, the number of eigenpairs (>= 1; capped at the system size).
        sketch: ``"lanczos"`` or ``"random"``.
        seed: seed of the random sketch.

    Example:
        >>> import torch
        >>> from hypergrad import Nystrom
        >>> A = torch.diag(torch.tensor([100.0, 10.0, 2.0, 1.0], dtype=torch.float64))
        >>> built = Nystrom(rank=4, sketch="random").build(lambda v: A @ v, torch.ones(4, dtype=torch.float64))
        >>> x = torch.tensor([1.0, -2.0, 3.0, 4.0], dtype=torch.float64)
        >>> torch.allclose(built.apply(A @ x), x)  # full rank: M = A
        True

    References:
        Frangella, Tropp & Udell (2023), Randomized Nystrom preconditioning. SIAM J. Matrix Anal. Appl.
        Parks et al. (2006), Recycling Krylov subspaces for sequences of linear systems.
    """

    rank: int = 10
    sketch: str = "lanczos"
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("rank", self.rank, owner="Nystrom")
        check_choice("sketch", self.sketch, ("lanczos", "random"), owner="Nystrom")
        check_int("seed", self.seed, minimum=0, owner="Nystrom")

    def build(self, matvec: MatVec, b: TreeOrTensor) -> BuiltPreconditioner:
        ravel, _ = flattener(b)
        mv = flat_matvec(matvec, b)
        bf = ravel(b)
        if self.sketch == "lanczos":
            k = lanczos(mv, bf, self.rank)
            if not bool(torch.isfinite(k.H).all()):
                return BuiltPreconditioner(lambda r: r, k.size, finite=False)
            theta, U = ritz_pairs(k)
            inv = LowRankInverse(U, theta)
            return BuiltPreconditioner(inv, k.size, True, inv.all_positive)
        return self._random(mv, bf)

    def _random(self, mv: Callable[[Tensor], Tensor], bf: Tensor) -> BuiltPreconditioner:
        n = bf.numel()
        ell = max(1, min(self.rank, n))
        omega = torch.randn(n, ell, generator=_generator(self.seed), dtype=torch.float64)
        omega, _ = torch.linalg.qr(omega)
        om = omega.to(dtype=bf.dtype, device=bf.device)
        Y = torch.stack([mv(om[:, j]) for j in range(ell)], dim=1)
        if not bool(torch.isfinite(Y).all()):
            return BuiltPreconditioner(lambda r: r, ell, finite=False)
        Y64, om64 = Y.to(torch.float64), om.to(torch.float64)
        nu = float(torch.finfo(bf.dtype).eps) * float(torch.linalg.matrix_norm(Y64))
        Ynu = Y64 + nu * om64
        core = om64.T @ Ynu
        core = 0.5 * (core + core.T)
        chol, info = torch.linalg.cholesky_ex(core)
        positive = int(info) == 0
        if positive:
            B = torch.linalg.solve_triangular(chol, Ynu.T, upper=False).T  # Ynu C^{-T}
            U, sig, _ = torch.linalg.svd(B, full_matrices=False)
            lam = torch.clamp(sig * sig - nu, min=0.0)
            keep = lam > 1e-12 * float(lam.max())
            theta, Ut = lam[keep], U[:, keep].T
        else:  # indefinite: Rayleigh-Ritz on range(Omega)
            proj = om64.T @ Y64
            t, S = torch.linalg.eigh(0.5 * (proj + proj.T))
            order = torch.argsort(t.abs(), descending=True)
            theta, Ut = t[order], (om64 @ S[:, order]).T
        inv = LowRankInverse(Ut.to(bf.dtype), theta)
        return BuiltPreconditioner(inv, ell, True, positive and inv.all_positive)
