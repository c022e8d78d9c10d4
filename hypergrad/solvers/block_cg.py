r"""Block conjugate gradient: many right-hand sides of one SPD system, solved together."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .._checks import check_int, check_positive, check_rtol
from .._typing import MatVec, TreeOrTensor
from ..tree import tree_check_like, tree_map
from ._base import AbstractLinearSolver, Solution, Status, _check_matvec_output, _check_rhs, refuse_nonsymmetric

__all__ = ["BlockCG"]

_FIX = "Use FixedPoint, Neumann or Dense column by column, or pass symmetric=True if phi is a gradient-descent step."

#: A block map ``V -> A V``: every leaf of ``V`` carries a leading block dimension (one row per column).
MatMat = Callable[[TreeOrTensor], TreeOrTensor]


@dataclass(frozen=True)
class BlockCG(AbstractLinearSolver):
    r"""Block conjugate gradient: solve :math:`A X = B` for :math:`s` right-hand sides at once, SPD :math:`A`.

    Block CG (O'Leary 1980) searches, at step :math:`k`, the whole block Krylov space
    :math:`\mathcal{K}_k(A, R_0) = \operatorname{span}\{R_0, A R_0, \dots, A^{k-1} R_0\}` of all
    :math:`s` residuals for every column, so a direction found for one right-hand side serves all
    of them: with the extreme eigenvalues shared, it needs fewer steps, and usually fewer column
    products in all, than :math:`s` separate CG solves (outlying eigenvalues are found once, not
    :math:`s` times). The iteration, with :math:`P_k` an :math:`n \times r_k` search block
    (:math:`r_k \le s`):

    .. math::

        Q_k = A P_k,\quad C_k = P_k^\top Q_k,\quad
        \alpha_k = C_k^{-1} P_k^\top R_k,\quad X_{k+1} = X_k + P_k \alpha_k,\quad
        R_{k+1} = R_k - Q_k \alpha_k,

        Z_{k+1} = R_{k+1}[:, J_{k+1}]\, D_{k+1} - P_k\, C_k^{-1} Q_k^\top R_{k+1}[:, J_{k+1}]\, D_{k+1},\quad
        P_{k+1} = \operatorname{orth}(Z_{k+1}).

    **Breakdown.** In O'Leary's original iteration :math:`C_k` is singular as soon as the columns
    of :math:`P_k` become linearly dependent (duplicate or dependent right-hand sides, a zero
    column, a column that has converged while others have not). This implementation is the
    *breakdown-free* variant (Ji & Li 2017) with *deflation of converged columns*:

    * :math:`J_{k+1}` holds only the columns whose residual is still above their tolerance
      :math:`\tau_j = \max(\mathrm{rtol}\,\|b_j\|, \mathrm{atol})` (with ``rtol = atol = 0``, every
      column with a non-zero residual); :math:`D_{k+1}` scales each of them to unit norm, so a
      small right-hand side is not mistaken for a dependent one;
    * :math:`\operatorname{orth}` is a rank-revealing orthonormalisation: with the column-normalised
      Gram matrix :math:`\hat G = N^{-1} Z^\top Z N^{-1} = V \Lambda V^\top`
      (:math:`N = \operatorname{diag}\|z_j\|`), it keeps the eigenvectors with
      :math:`\lambda_i > \delta\, \lambda_{\max}` and returns :math:`P = Z N^{-1} V_+ \Lambda_+^{-1/2}`,
      :math:`\delta = 10^4\,\epsilon_{\text{mach}}` of the lowest-precision leaf. Numerically
      dependent directions are dropped, never inverted, so :math:`C_k` stays non-singular for SPD
      :math:`A`, and every step costs :math:`r_k \le s` column products.

    :math:`\alpha_k` is computed for *all* :math:`s` columns (converged ones too: it costs no
    product), so each step is, for every column, the exact :math:`A`-norm projection of its error
    onto :math:`\operatorname{span} P_k`: :math:`\|X_{k+1} - X^*\|_A \le \|X_k - X^*\|_A` column by column,
    whatever is deflated. Without deflation the iteration is O'Leary's (exact block CG); dropping
    a converged column leaves a loss of :math:`A`-conjugacy of the order of its tolerance, which
    may cost steps but not accuracy (the stopping test reads every column's residual).

    **Stopping and statuses.** With a tolerance it stops when every column meets
    :math:`\|r_j\| \le \tau_j` (:attr:`Status.SUCCESS`); otherwise after ``max_steps`` block steps
    (:attr:`Status.MAX_STEPS_REACHED`); with ``rtol = atol = 0`` it runs ``max_steps`` block steps
    (:attr:`Status.FIXED_BUDGET`; it stops earlier only when every residual is exactly zero). A
    block curvature matrix :math:`C_k` that is not positive definite (its smallest eigenvalue
    :math:`\le 0`: the operator is not positive definite on :math:`\operatorname{span} P_k`) stops
    the solve before stepping, :attr:`Status.NEGATIVE_CURVATURE`; a NaN or Inf anywhere gives
    :attr:`Status.NONFINITE`. ``residual_norm`` is the Frobenius norm :math:`\|B - A X\|_F` of the
    recursively updated residuals (``b_norm``: :math:`\|B\|_F`); ``stats`` holds the per-column
    ``residual_norms`` and ``b_norms``, ``block_sizes`` (:math:`r_k` per step), ``min_curvature``
    (smallest eigenvalue of any :math:`C_k`) and ``num_columns`` (:math:`s`). ``num_matvecs`` counts
    column products (HVPs): :math:`\sum_k r_k`, plus :math:`s` for ``X0``. ``budget_rtol`` is
    judged per column (:math:`\|r_j\| \le \text{budget\_rtol}\,\|b_j\|` for every :math:`j`).

    **Calling convention.** Block solves go through :meth:`solve_block`
    ``(matmat, B, X0=None)``: every leaf of ``B`` carries a leading block dimension :math:`s`
    (``B["w"][j]`` is column :math:`j`) and ``matmat`` maps such a block (of any :math:`r \le s`
    columns) to the block of products, e.g. :meth:`hypergrad.LinearOperator.matmat` (passing a
    :class:`~hypergrad.LinearOperator` itself uses its ``matmat``). Called like every other solver,
    ``solver(matvec, b, x0=None)``, it solves the single right-hand side as a block of one (then it
    is plain CG with a normalised search direction), so it fits wherever a solver is accepted. The
    two cannot be confused: a single call never reads a block dimension.

    Args:
        max_steps: budget of block steps (>= 1); each costs at most :math:`s` products.
        rtol: per-column relative tolerance on :math:`\|r_j\|/\|b_j\|` (0 disables).
        atol: per-column absolute tolerance on :math:`\|r_j\|` (0 disables).

    Returns:
        A :class:`~hypergrad.solvers.Solution` (``x`` shaped like ``B``).

    Example:
        >>> import torch
        >>> from hypergrad import BlockCG
        >>> A = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
        >>> B = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)  # s = 3 rows
        >>> sol = BlockCG(max_steps=5, rtol=1e-12).solve_block(lambda V: V @ A.T, B)
        >>> sol.converged, sol.stats["block_sizes"]  # 2 distinct columns: 2 products, then 1 (n = 3)
        (True, [2, 1])
        >>> torch.allclose(sol.x @ A.T, B)
        True
        >>> BlockCG(max_steps=5, rtol=1e-12)(lambda v: A @ v, B[2]).converged  # one right-hand side
        True

    References:
        O'Leary (1980), The block conjugate gradient algorithm and related methods. Linear Algebra
        Appl. 29. Ji & Li (2017), A breakdown-free block conjugate gradient method. BIT 57.
        Dubrulle (2001), Retooling the method of block conjugate gradients. ETNA 12.
    """

    max_steps: int = 10
    rtol: float = 0.0
    atol: float = 0.0

    symmetric_only = True

    def __post_init__(self) -> None:
        check_int("max_steps", self.max_steps, owner="BlockCG")
        check_rtol("rtol", self.rtol, owner="BlockCG")
        check_positive("atol", self.atol, allow_zero=True, owner="BlockCG")

    def _solve(self, matvec: MatVec, b: TreeOrTensor, x0: TreeOrTensor | None) -> Solution:
        """The single-right-hand-side protocol: a block of one column."""
        refuse_nonsymmetric("BlockCG", matvec, _FIX)

        def matmat(v: TreeOrTensor) -> TreeOrTensor:
            return tree_map(lambda t: t.unsqueeze(0), matvec(tree_map(lambda t: t[0], v)))

        block = tree_map(lambda t: t.unsqueeze(0), b)
        x_block = None if x0 is None else tree_map(lambda t: t.unsqueeze(0), x0)
        sol = self._iterate(matmat, block, x_block)
        stats = {k: v for k, v in sol.stats.items() if k not in ("b_norms", "num_columns")}
        return dataclasses.replace(sol, x=tree_map(lambda t: t[0], sol.x), stats=stats, b_norm=None)

    def solve_block(self, matmat: Any, B: TreeOrTensor, X0: TreeOrTensor | None = None) -> Solution:
        r"""Solve :math:`A X = B` for a block of right-hand sides.

        Args:
            matmat: the block map ``V -> A V`` (each leaf of ``V`` shaped ``(r, *column_shape)``,
                ``r <= s``; the output shaped like ``V``), e.g. ``operator.matmat``; a
                :class:`~hypergrad.LinearOperator` passed itself is replaced by its ``matmat``. For
                a dense matrix ``M`` and a tensor block, ``lambda V: V @ M.T`` (not ``M @ V``).
            B: the right-hand sides, a tensor of shape ``(s, *shape)`` or a dict of such tensors
                with one common leading dimension :math:`s \ge 1` (column :math:`j` is ``B[k][j]``).
            X0: optional initial guesses shaped like ``B`` (one product per column).

        Returns:
            A :class:`~hypergrad.solvers.Solution` whose ``x`` is shaped like ``B``; per-column
            residuals in ``stats["residual_norms"]``.

        Raises:
            TypeError: ``matmat`` is not callable, or ``B`` / ``X0`` / an output of ``matmat`` is
                not a tensor or dict of tensors of a floating dtype.
            ValueError: ``B`` has a 0-dim leaf, leaves with different leading dimensions, an empty
                block; ``X0`` or an output of ``matmat`` is shaped unlike its input; ``matmat`` is
                an operator tagged ``symmetric=False``.
        """
        from ..operators import LinearOperator, _block_size

        if isinstance(matmat, LinearOperator):
            refuse_nonsymmetric("BlockCG", matmat, _FIX)
            matmat = matmat.matmat
        elif not callable(matmat):
            raise TypeError(
                f"BlockCG.solve_block: `matmat` must be a callable V -> A V on blocks (e.g. "
                f"`hypergrad.HessianOperator(...).matmat`), got {type(matmat).__name__}."
            )
        else:
            refuse_nonsymmetric("BlockCG", matmat, _FIX)
        try:
            _check_rhs("BlockCG.solve_block", B)
        except (TypeError, ValueError) as err:  # the shared check calls it `b`
            raise type(err)(str(err).replace("`b", "`B")) from None
        _block_size(
            B,
            owner="BlockCG.solve_block",
            name="B",
            hint=" For one right-hand side call the solver itself, solver(matvec, b).",
        )
        if X0 is not None:
            tree_check_like("X0", X0, B, "B", dtype=True, device=True, owner="BlockCG.solve_block")
        sol = self._iterate(_CheckedMatMat(matmat), B, X0)
        if sol.status is Status.FIXED_BUDGET and self.budget_rtol > 0:
            res, bn = sol.stats["residual_norms"], sol.stats["b_norms"]
            met = all(r <= self.budget_rtol * b for r, b in zip(res, bn))
            status = Status.SUCCESS if met else Status.MAX_STEPS_REACHED
            sol = dataclasses.replace(sol, status=status, stats={**sol.stats, "budget_rtol": self.budget_rtol})
        return sol

    def _iterate(self, matmat: MatMat, B: TreeOrTensor, X0: TreeOrTensor | None) -> Solution:
        lay = _Layout(B)
        b = lay.flat(B)
        s = lay.s
        check = self.rtol > 0 or self.atol > 0
        num_matvecs = 0
        if X0 is None:
            x = [torch.zeros_like(t) for t in b]
            r = b
        else:
            x = lay.flat(X0)
            ax = lay.flat(matmat(lay.unflat(x)))
            num_matvecs += s
            r = [bi - ai for bi, ai in zip(b, ax)]
        b_norms = _col_norms(b)
        tol = torch.clamp(self.rtol * b_norms, min=self.atol) if check else torch.zeros_like(b_norms)
        rho = _col_norms(r)
        delta = 1e4 * max(torch.finfo(t.dtype).eps for t in b)
        min_curv = math.inf
        sizes: list[int] = []
        prev: Optional[tuple[list[Tensor], list[Tensor], Tensor]] = None  # (P, Q, C^{-1}) of the last step
        status = Status.FIXED_BUDGET
        steps = 0
        if not bool(torch.isfinite(rho).all()):
            status = Status.NONFINITE
        elif check and bool((rho <= tol).all()):
            status = Status.SUCCESS
        else:
            for steps in range(1, self.max_steps + 1):
                active = torch.nonzero(rho > tol).flatten()
                if active.numel() == 0:  # fixed budget, every residual exactly zero: nothing to search
                    steps -= 1
                    break
                sel = torch.zeros(s, active.numel(), dtype=torch.float64, device=rho.device)
                sel[active, torch.arange(active.numel(), device=rho.device)] = 1.0 / rho[active]
                z = _comb(r, sel)  # the active residuals, each scaled to unit norm
                if prev is not None:  # A-orthogonal to the previous block
                    p_old, q_old, c_inv = prev
                    z = [zi - pi for zi, pi in zip(z, _comb(p_old, c_inv @ _gram(q_old, z)))]
                p = _orth(z, delta)
                if p is None:
                    status = Status.NONFINITE
                    break
                if p[0].shape[0] == 0:  # nothing independent left to search (rounding): stop, report
                    status = Status.MAX_STEPS_REACHED if check else Status.FIXED_BUDGET
                    steps -= 1
                    break
                q = lay.flat(matmat(lay.unflat(p)))
                num_matvecs += p[0].shape[0]
                sizes.append(p[0].shape[0])
                c = _gram(p, q)
                c = 0.5 * (c + c.T)
                if not bool(torch.isfinite(c).all()):
                    status = Status.NONFINITE
                    break
                evals, evecs = torch.linalg.eigh(c)
                min_curv = min(min_curv, float(evals[0]))
                if not float(evals[0]) > 0:  # never step along a block that is not positive definite
                    status = Status.NEGATIVE_CURVATURE
                    break
                c_inv = (evecs / evals) @ evecs.T
                alpha = c_inv @ _gram(p, r)  # every column, converged ones included (no product)
                x = [xi + di for xi, di in zip(x, _comb(p, alpha))]
                r = [ri - di for ri, di in zip(r, _comb(q, alpha))]
                rho = _col_norms(r)
                if not bool(torch.isfinite(rho).all()):
                    status = Status.NONFINITE
                    break
                if check and bool((rho <= tol).all()):
                    status = Status.SUCCESS
                    break
                prev = (p, q, c_inv)
            else:
                if check:
                    status = Status.MAX_STEPS_REACHED
        res = [float(v) for v in rho]
        frob = math.sqrt(sum(v * v for v in res)) if all(math.isfinite(v) for v in res) else math.nan
        if status is not Status.NONFINITE and not all(bool(torch.isfinite(t).all()) for t in x):
            status = Status.NONFINITE
        stats: dict[str, Any] = {
            "residual_norms": res,
            "b_norms": [float(v) for v in b_norms],
            "block_sizes": sizes,
            "min_curvature": min_curv,
            "num_columns": s,
        }
        b_norm = float(torch.sqrt((b_norms * b_norms).sum()))
        return Solution(lay.unflat(x), status, steps, num_matvecs, frob, stats, b_norm)


class _CheckedMatMat:
    """``matmat`` whose every output is checked against its input (keys, shapes, dtypes, devices: metadata only)."""

    def __init__(self, fn: MatMat):
        self.fn = fn

    def __call__(self, v: TreeOrTensor) -> TreeOrTensor:
        out = self.fn(v)
        hint = (
            " A block map V -> A V must return a block shaped like V (one row per column: for a dense M and "
            "a tensor block, V @ M.T)."
        )
        _check_matvec_output("BlockCG", out, v, fn="matmat", arg="V", like="V", hint=hint)
        return out


class _Layout:
    """A block tree as a list of ``(s, m_k)`` matrices, and back."""

    def __init__(self, B: TreeOrTensor):
        self.keys: Optional[list[str]] = None if isinstance(B, Tensor) else list(B)
        leaves = self._leaves(B)
        self.shapes = [tuple(t.shape[1:]) for t in leaves]
        self.s = int(leaves[0].shape[0])

    def _leaves(self, tree: TreeOrTensor) -> list[Tensor]:
        if isinstance(tree, Tensor):
            return [tree]
        return [tree[k] for k in (self.keys or [])]

    def flat(self, tree: TreeOrTensor) -> list[Tensor]:
        return [t.reshape(t.shape[0], -1) for t in self._leaves(tree)]

    def unflat(self, mats: list[Tensor]) -> TreeOrTensor:
        leaves = [m.reshape(m.shape[0], *shape) for m, shape in zip(mats, self.shapes)]
        return leaves[0] if self.keys is None else dict(zip(self.keys, leaves))


def _gram(u: list[Tensor], v: list[Tensor]) -> Tensor:
    """:math:`U^\\top V` (``(r_u, r_v)``, float64): the inner products of the columns over all leaves."""
    return sum((a @ b.T).double() for a, b in zip(u, v))  # type: ignore[return-value]


def _comb(v: list[Tensor], m: Tensor) -> list[Tensor]:
    """:math:`V M`: new column ``j`` is ``sum_i V_i M_ij``."""
    return [m.T.to(t.dtype) @ t for t in v]


def _col_norms(v: list[Tensor]) -> Tensor:
    return torch.sqrt(sum((t.double() ** 2).sum(dim=1) for t in v))  # type: ignore[arg-type]


def _orth(z: list[Tensor], delta: float) -> Optional[list[Tensor]]:
    """Rank-revealing orthonormal basis of the columns of ``z`` (``None`` if non-finite)."""
    g = _gram(z, z)
    if not bool(torch.isfinite(g).all()):
        return None
    d = torch.sqrt(torch.clamp(torch.diagonal(g), min=0.0))
    keep_cols = d > 0
    inv_d = torch.where(keep_cols, 1.0 / torch.where(keep_cols, d, torch.ones_like(d)), torch.zeros_like(d))
    gn = g * inv_d[:, None] * inv_d[None, :]
    evals, evecs = torch.linalg.eigh(0.5 * (gn + gn.T))
    keep = evals > delta * float(evals[-1])
    w = inv_d[:, None] * evecs[:, keep] / torch.sqrt(evals[keep])
    return _comb(z, w)
