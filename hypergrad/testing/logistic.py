r"""L2-regularised logistic regression with one regularisation strength per feature."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor

from .base import ToyProblem

__all__ = ["LogisticProblem"]


def _classification_data(n: int, w_true: Tensor, flip: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, w_true.numel(), generator=gen, dtype=torch.float64)
    y = torch.sign(x @ w_true + 1e-12)
    flips = torch.rand(n, generator=gen, dtype=torch.float64) < flip
    return x, torch.where(flips, -y, y)


class LogisticProblem(ToyProblem):
    r"""Per-feature L2 strengths :math:`\lambda_j = e^{\ell_j}` tuned on validation log-loss.

    Labels :math:`y_i \in \{-1, +1\}`; :math:`\mathrm{sp}(z) = \log(1 + e^{z})` (softplus).

    .. math::

        G(w, \ell) = \frac{1}{n} \sum_i \mathrm{sp}(-y_i x_i^\top w) + \tfrac12 \sum_j e^{\ell_j} w_j^2,
        \qquad
        F(w) = \frac{1}{n_{\text{val}}} \sum_i \mathrm{sp}(-y^{\text{val}}_i {x^{\text{val}}_i}^\top w).

    The inner solution comes from Newton's method (backtracking line search) down to a gradient
    norm of ``newton_tol`` (default :math:`10^{-13}` in float64). With
    :math:`H = \frac1n X^\top D X + \mathrm{diag}(e^{\ell})`,
    :math:`D = \mathrm{diag}(\sigma_i (1 - \sigma_i))`, the exact hypergradient is the dense IFT
    formula (``torch.linalg.solve``; no :mod:`hypergrad` code involved)

    .. math::

        \nabla_\ell F = -\big(\partial^2_{\ell w} G\big) H^{-1} \nabla_w F
        = -\, e^{\ell} \odot w^* \odot \big(H^{-1} \nabla_w F(w^*)\big).

    Data: Gaussian features, labels from a sparse ground truth (half the features irrelevant) with
    a fraction ``flip`` of labels flipped, so per-feature strengths matter.

    Args:
        n_train, n_val: sample counts.
        dim: features (params ``{"w": (dim,)}``; hparams ``{"log_lam": (dim,)}``).
        flip: label-noise rate in ``[0, 0.5)``.
        seed: data seed.
        dtype, device: where the data lives.
        newton_tol: stop Newton when :math:`\|\nabla_w G\| \le \mathrm{tol}\,(1 + \|e^{\ell} \odot w\|)`
            (``None``: 1e-13 in float64, :math:`10^{3}\epsilon_{\text{mach}}` otherwise).

    Example:
        >>> prob = LogisticProblem(n_train=30, n_val=10, dim=3)
        >>> lam = prob.init_hparams()
        >>> w = prob.inner_solution(lam)
        >>> float(prob.inner_grad(w, lam)["w"].norm()) <= 1e-13
        True

    References:
        Dagreou, Ablin, Vaiter & Moreau (NeurIPS 2022), A framework for bilevel optimization that
        enables stochastic and global variance reduction algorithms (the benchopt bilevel
        benchmark's logistic-regression problem).
    """

    def __init__(
        self,
        n_train: int = 100,
        n_val: int = 50,
        dim: int = 8,
        flip: float = 0.1,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
        newton_tol: float | None = None,
    ):
        gen = self._init_data({"n_train": n_train, "n_val": n_val, "dim": dim}, seed, dtype, device)
        if not 0 <= flip < 0.5:
            raise ValueError(f"LogisticProblem: `flip` must be in [0, 0.5), got {flip!r}.")
        self.dim = dim
        self.param_shapes = {"w": (dim,)}
        self.newton_tol = (
            newton_tol
            if newton_tol is not None
            else (1e-13 if dtype == torch.float64 else 1e3 * torch.finfo(dtype).eps)
        )
        w_true = torch.randn(dim, generator=gen, dtype=torch.float64)
        w_true[dim // 2 :] = 0.0
        x, y = _classification_data(n_train, w_true, flip, gen)
        xv, yv = _classification_data(n_val, w_true, flip, gen)
        self.X, self.y, self.X_val, self.y_val = (self._tensor(t) for t in (x, y, xv, yv))

    def inner_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        w = params["w"]
        data = nnf.softplus(-self.y * (self.X @ w)).mean()
        return data + 0.5 * (torch.exp(hparams["log_lam"]) * w**2).sum()

    def outer_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        return nnf.softplus(-self.y_val * (self.X_val @ params["w"])).mean()

    def init_hparams(self) -> dict[str, Tensor]:
        return {"log_lam": torch.full((self.dim,), -2.0, dtype=self.dtype, device=self.device)}

    def inner_grad(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> dict[str, Tensor]:
        w = params["w"]
        s = torch.sigmoid(-self.y * (self.X @ w))
        return {"w": -(self.X.T @ (self.y * s)) / self.y.numel() + torch.exp(hparams["log_lam"]) * w}

    def inner_hessian(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        s = torch.sigmoid(self.X @ params["w"].detach())
        d = s * (1.0 - s) / self.y.numel()
        return (self.X.T * d) @ self.X + torch.diag(torch.exp(hparams["log_lam"].detach()))

    def inner_solution(self, hparams: dict[str, Tensor], *, max_steps: int = 100) -> dict[str, Tensor]:
        """Newton's method with backtracking from :math:`w = 0`; raises if it does not converge."""
        hparams = {k: v.detach() for k, v in hparams.items()}
        w = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for _ in range(max_steps):
            g = self.inner_grad({"w": w}, hparams)["w"]
            if float(g.norm()) <= self._tolerance(w, hparams):
                return {"w": w}
            step = torch.linalg.solve(self.inner_hessian({"w": w}, hparams), g)
            f0, decrement, t = float(self.inner_loss({"w": w}, hparams)), float(g @ step), 1.0
            # Backtrack (Armijo) only while the predicted decrease is above the loss's rounding
            # level; closer in, the full Newton step converges quadratically.
            while (
                decrement > 1e-12 * (1 + abs(f0))
                and t > 1e-8
                and (float(self.inner_loss({"w": w - t * step}, hparams)) > f0 - 1e-4 * t * decrement)
            ):
                t *= 0.5
            w_new = w - t * step
            if bool(torch.equal(w_new, w)):  # no representable progress left: at machine precision
                break
            w = w_new
        gnorm, tol = float(self.inner_grad({"w": w}, hparams)["w"].norm()), self._tolerance(w, hparams)
        if gnorm > 10 * tol:
            raise RuntimeError(
                f"LogisticProblem: Newton stopped at gradient norm {gnorm:.3e} > {tol:.1e} "
                "(newton_tol scaled by 1 + |lam * w|); raise `max_steps` or `newton_tol`."
            )
        return {"w": w}

    def _tolerance(self, w: Tensor, hparams: dict[str, Tensor]) -> float:
        # The two terms of the gradient cancel at the solution; each is computed with a rounding
        # error proportional to its size, so the reachable gradient norm scales with |lam * w|.
        return self.newton_tol * (1.0 + float((torch.exp(hparams["log_lam"]) * w).norm()))

    def exact_hypergradient(self, hparams: dict[str, Tensor]) -> dict[str, Tensor]:
        w = self.inner_solution(hparams)["w"]
        s = torch.sigmoid(-self.y_val * (self.X_val @ w))
        grad_w = -(self.X_val.T @ (self.y_val * s)) / self.y_val.numel()
        v = torch.linalg.solve(self.inner_hessian({"w": w}, hparams), grad_w)
        return {"log_lam": -torch.exp(hparams["log_lam"].detach()) * w * v}
