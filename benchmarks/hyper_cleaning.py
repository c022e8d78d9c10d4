r"""Data hyper-cleaning on scikit-learn's digits: one weight per (possibly corrupted) training label.

A small, exact version of the benchopt bilevel benchmark's hyper-cleaning problem, built on data
that ships inside scikit-learn (no download). Used when ``applications.toy`` has no hyper-cleaning
problem of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor

from applications.toy.base import ToyProblem

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
    classes. Exact hypergradient (dense IFT; references use ``torch.func.hessian``/``jacrev`` and
    ``torch.linalg.solve``, not :mod:`hypergrad`):
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

    def __init__(self, n_train: int = 100, n_val: int = 100, corruption: float = 0.5, reg: float = 1e-2,
                 seed: int = 0, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"):
        from sklearn.datasets import load_digits

        if not 0 <= corruption <= 1:
            raise ValueError(f"HyperCleaningProblem: `corruption` must be in [0, 1], got {corruption!r}.")
        if n_train < 1 or n_val < 1 or n_train + n_val > 1797:
            raise ValueError(f"HyperCleaningProblem: need 1 <= n_train, n_val and n_train + n_val <= 1797, "
                             f"got n_train={n_train!r}, n_val={n_val!r}.")
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
        self.X_val, self.y_val = self._tensor(x[n_train:n_train + n_val]), y[n_train:n_train + n_val].to(self.device)
        self.param_shapes = {"W": (10, x.shape[1])}
        self.n_train = n_train

    def inner_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        ce = nnf.cross_entropy(self.X @ params["W"].T, self.y, reduction="none")
        return (torch.sigmoid(hparams["lam"]) * ce).mean() + 0.5 * self.reg * (params["W"] ** 2).sum()

    def outer_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        return nnf.cross_entropy(self.X_val @ params["W"].T, self.y_val)

    def init_hparams(self) -> dict[str, Tensor]:
        return {"lam": torch.zeros(self.n_train, dtype=self.dtype, device=self.device)}

    def _flat_inner(self, hparams: dict[str, Tensor]):
        shape = self.param_shapes["W"]
        return lambda w: self.inner_loss({"W": w.reshape(shape)}, hparams)

    def inner_grad(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"W": torch.func.grad(lambda w: self.inner_loss({"W": w}, hparams))(params["W"])}

    def inner_hessian(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        hparams = {k: v.detach() for k, v in hparams.items()}
        return torch.func.hessian(self._flat_inner(hparams))(params["W"].detach().reshape(-1))

    def inner_solution(self, hparams: dict[str, Tensor], *, max_steps: int = 50) -> dict[str, Tensor]:
        """Newton's method from zero (the loss is strongly convex); stops at machine precision."""
        hparams = {k: v.detach() for k, v in hparams.items()}
        shape, f = self.param_shapes["W"], self._flat_inner(hparams)
        w = torch.zeros(shape, dtype=self.dtype, device=self.device).reshape(-1)
        for _ in range(max_steps):
            g = torch.func.grad(f)(w)
            if float(g.norm()) <= 1e-13:
                break
            w = w - torch.linalg.solve(torch.func.hessian(f)(w), g)
        return {"W": w.reshape(shape)}

    def exact_hypergradient(self, hparams: dict[str, Tensor]) -> dict[str, Tensor]:
        hparams = {k: v.detach() for k, v in hparams.items()}
        w = self.inner_solution(hparams)["W"].reshape(-1)
        shape = self.param_shapes["W"]
        grad_f = torch.func.grad(lambda v: self.outer_loss({"W": v.reshape(shape)}, hparams))(w)
        v = torch.linalg.solve(self.inner_hessian({"W": w.reshape(shape)}, hparams), grad_f)

        def grad_w(lam: Tensor) -> Tensor:
            return torch.func.grad(lambda u: self.inner_loss({"W": u.reshape(shape)}, {"lam": lam}))(w)

        mixed = torch.func.jacrev(grad_w)(hparams["lam"])  # (n_params, n_train)
        return {"lam": -(mixed.T @ v)}
