r"""Data hyper-cleaning on scikit-learn's digits: one weight per (possibly corrupted) training label.

A small, exact version of the benchopt bilevel benchmark's hyper-cleaning problem, built on data
that ships inside scikit-learn (no download), with the :class:`~hypergrad.testing.ToyProblem`
interface and an exact hypergradient. (``applications.toy.hyper_cleaning`` is the training
application on ``BilevelProblem``; it has no exact reference to benchmark against.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor

from hypergrad.testing import ToyProblem

__all__ = ["HyperCleaningProblem"]


class HyperCleaningProblem(ToyProblem):
    r"""Learn per-sample weights :math:`\sigma(\lambda_i)` that down-weight corrupted labels.

    Multinomial logistic regression :math:`W \in \mathbb{R}^{C \times (d+1)}` (bias folded in):

    .. math::

        G(W, \lambda) = \frac1n \sum_i \sigma(\lambda_i)\, \mathrm{CE}(W x_i, \tilde y_i)
        + \frac{\rho}{2} \|W\|^2,
        \qquad
        F(W) = \frac{1}{n_{\text{val}}} \sum_j \mathrm{CE}(W x^{\text{val}}_j, y^{\text{val}}_j),

    where a fraction ``corruption`` of the training labels :math:`\tilde y` is replaced by random
    classes. Exact hypergradient (dense IFT with closed-form Hessian and mixed term, and
    ``torch.linalg.solve``; no :mod:`hypergrad`):
    :math:`\nabla_\lambda F = -\big(\partial^2_{\lambda W} G\big)^\top H^{-1} \nabla_W F`.

    Args:
        n_train, n_val: samples (drawn without overlap from the 1,797 digits).
        corruption: fraction of corrupted training labels.
        reg: :math:`\rho > 0` (makes :math:`G` strongly convex in :math:`W`).
        seed, dtype, device: as for the other toy problems.

    Example:
        >>> prob = HyperCleaningProblem(n_train=30, n_val=20)
        >>> lam = prob.init_hparams()
        >>> w = prob.inner_solution(lam)
        >>> float(prob.inner_grad(w, lam)["W"].norm()) < 1e-10
        True
    """

    def __init__(
        self,
        n_train: int = 100,
        n_val: int = 100,
        corruption: float = 0.5,
        reg: float = 1e-2,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ):
        from sklearn.datasets import load_digits

        if not 0 <= corruption <= 1:
            raise ValueError(f"HyperCleaningProblem: `corruption` must be in [0, 1], got {corruption!r}.")
        if n_train < 1 or n_val < 1 or n_train + n_val > 1797:
            raise ValueError(
                f"HyperCleaningProblem: need 1 <= n_train, n_val and n_train + n_val <= 1797, "
                f"got n_train={n_train!r}, n_val={n_val!r}."
            )
        self.dtype, self.device, self.reg = dtype, torch.device(device), float(reg)
        digits = load_digits()
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(digits.target), generator=gen)
        x = torch.as_tensor(digits.data, dtype=torch.float64)[perm] / 16.0
        x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        y = torch.as_tensor(digits.target)[perm]
        self.num_classes = 10
        y_train = y[:n_train].clone()
        bad = torch.rand(n_train, generator=gen) < corruption
        y_train[bad] = torch.randint(0, 10, (int(bad.sum()),), generator=gen)
        self.corrupted = bad.to(self.device)
        self.X, self.y = self._tensor(x[:n_train]), y_train.to(self.device)
        self.X_val, self.y_val = (
            self._tensor(x[n_train : n_train + n_val]),
            y[n_train : n_train + n_val].to(self.device),
        )
        self.param_shapes = {"W": (10, x.shape[1])}
        self.n_train = n_train

    def inner_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        ce = nnf.cross_entropy(self.X @ params["W"].T, self.y, reduction="none")
        return (torch.sigmoid(hparams["lam"]) * ce).mean() + 0.5 * self.reg * (params["W"] ** 2).sum()

    def outer_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        return nnf.cross_entropy(self.X_val @ params["W"].T, self.y_val)

    def init_hparams(self) -> dict[str, Tensor]:
        return {"lam": torch.zeros(self.n_train, dtype=self.dtype, device=self.device)}

    def inner_grad(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> dict[str, Tensor]:
        w = params["W"]
        resid = torch.softmax(self.X @ w.T, dim=1) - nnf.one_hot(self.y, self.num_classes).to(self.dtype)
        weight = torch.sigmoid(hparams["lam"]) / self.n_train
        return {"W": (weight[:, None] * resid).T @ self.X + self.reg * w}

    def inner_hessian(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        r"""Closed form: :math:`\frac1n \sum_i \sigma(\lambda_i) (\mathrm{diag}(p_i) - p_i p_i^\top)
        \otimes x_i x_i^\top + \rho I` over ``W`` flattened row-major."""
        w = params["W"].detach()
        p = torch.softmax(self.X @ w.T, dim=1)  # (n, C)
        a = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, C, C)
        weight = torch.sigmoid(hparams["lam"].detach()) / self.n_train
        c, d, n = a.shape[1], self.X.shape[1], w.numel()
        outer = (self.X[:, :, None] * self.X[:, None, :]).reshape(-1, d * d)  # (n, D*D)
        h = ((weight[:, None, None] * a).reshape(-1, c * c).T @ outer).reshape(c, c, d, d).permute(0, 2, 1, 3)
        return h.reshape(n, n) + self.reg * torch.eye(n, dtype=self.dtype, device=self.device)

    def inner_solution(self, hparams: dict[str, Tensor], *, max_steps: int = 50) -> dict[str, Tensor]:
        """Newton's method from zero (the loss is strongly convex); stops at machine precision."""
        hparams = {k: v.detach() for k, v in hparams.items()}
        w = torch.zeros(self.param_shapes["W"], dtype=self.dtype, device=self.device)
        for _ in range(max_steps):
            g = self.inner_grad({"W": w}, hparams)["W"].reshape(-1)
            if float(g.norm()) <= 1e-13:
                break
            w = w - torch.linalg.solve(self.inner_hessian({"W": w}, hparams), g).reshape(w.shape)
        return {"W": w}

    def exact_hypergradient(self, hparams: dict[str, Tensor]) -> dict[str, Tensor]:
        r"""Dense IFT with the closed-form mixed term
        :math:`\partial_{\lambda_i}\nabla_W G = \frac1n \sigma'(\lambda_i) (p_i - e_{y_i}) x_i^\top`."""
        hparams = {k: v.detach() for k, v in hparams.items()}
        w = self.inner_solution(hparams)["W"]
        p_val = torch.softmax(self.X_val @ w.T, dim=1)
        onehot_val = nnf.one_hot(self.y_val, self.num_classes).to(self.dtype)
        grad_f = ((p_val - onehot_val).T @ self.X_val) / len(self.y_val)  # dF/dW, (C, D)
        v = torch.linalg.solve(self.inner_hessian({"W": w}, hparams), grad_f.reshape(-1)).reshape(w.shape)
        p = torch.softmax(self.X @ w.T, dim=1)
        resid = p - nnf.one_hot(self.y, self.num_classes).to(self.dtype)  # (n, C)
        sig = torch.sigmoid(hparams["lam"])
        mixed_v = torch.einsum("ic,id,cd->i", resid, self.X, v)  # <(p_i - e_i) x_i^T, v>
        return {"lam": -(sig * (1 - sig) / self.n_train) * mixed_v}
