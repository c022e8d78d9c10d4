r"""Ridge-regression hyper-parameter optimisation with a closed-form :math:`d w^*/d\lambda`."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import ToyProblem

__all__ = ["RidgeProblem"]


def _regression_data(n: int, w_true: Tensor, noise: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, w_true.numel(), generator=gen, dtype=torch.float64)
    return x, x @ w_true + noise * torch.randn(n, generator=gen, dtype=torch.float64)


class RidgeProblem(ToyProblem):
    r"""Tune the ridge strength :math:`\lambda = e^{\ell}` on a validation set.

    .. math::

        G(w, \ell) = \tfrac12 \|X w - y\|^2 + \tfrac{e^{\ell}}{2} \|w\|^2,
        \qquad
        F(w) = \tfrac{1}{n_{\text{val}}} \|X_{\text{val}} w - y_{\text{val}}\|^2 .

    Closed forms, with :math:`K = X^\top X + \lambda I`:

    .. math::

        w^*(\lambda) = K^{-1} X^\top y, \qquad
        \frac{d w^*}{d\lambda} = -K^{-1} w^*, \qquad
        \frac{dF}{d\ell} = \lambda\, \nabla_w F(w^*)^\top \frac{d w^*}{d\lambda} .

    Data: :math:`y = X w_{\text{true}} + \sigma \varepsilon` with standard normal :math:`X`,
    :math:`\varepsilon` and :math:`w_{\text{true}}`, from a private seeded generator.

    Args:
        n_train, n_val: numbers of training and validation samples.
        dim: number of features (params ``{"w": (dim,)}``; hparams ``{"log_lam": ()}``).
        noise: :math:`\sigma`, label noise (makes regularisation worth tuning).
        seed: data seed.
        dtype, device: where the data lives.

    Example:
        >>> prob = RidgeProblem(n_train=20, n_val=10, dim=3)
        >>> lam = prob.init_hparams()
        >>> w = prob.inner_solution(lam)
        >>> float(prob.inner_grad(w, lam)["w"].abs().max()) < 1e-10
        True
        >>> sorted(prob.exact_hypergradient(lam))
        ['log_lam']

    References:
        Pedregosa (ICML 2016); the closed form is jaxopt's ``ridge_solver_jac`` test reference.
    """

    def __init__(
        self,
        n_train: int = 80,
        n_val: int = 40,
        dim: int = 10,
        noise: float = 3.0,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ):
        gen = self._init_data({"n_train": n_train, "n_val": n_val, "dim": dim}, seed, dtype, device)
        self.dim = dim
        self.param_shapes = {"w": (dim,)}
        w_true = torch.randn(dim, generator=gen, dtype=torch.float64)
        x, y = _regression_data(n_train, w_true, noise, gen)
        xv, yv = _regression_data(n_val, w_true, noise, gen)
        self.X, self.y, self.X_val, self.y_val = (self._tensor(t) for t in (x, y, xv, yv))
        self.w_true = self._tensor(w_true)

    def inner_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        w = params["w"]
        return 0.5 * ((self.X @ w - self.y) ** 2).sum() + 0.5 * torch.exp(hparams["log_lam"]) * (w**2).sum()

    def outer_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        return ((self.X_val @ params["w"] - self.y_val) ** 2).mean()

    def init_hparams(self) -> dict[str, Tensor]:
        return {"log_lam": torch.zeros((), dtype=self.dtype, device=self.device)}

    def inner_grad(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> dict[str, Tensor]:
        w = params["w"]
        return {"w": self.X.T @ (self.X @ w - self.y) + torch.exp(hparams["log_lam"]) * w}

    def inner_hessian(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        lam = torch.exp(hparams["log_lam"].detach())
        return self.X.T @ self.X + lam * torch.eye(self.dim, dtype=self.dtype, device=self.device)

    def inner_solution(self, hparams: dict[str, Tensor]) -> dict[str, Tensor]:
        k = self.inner_hessian({}, hparams)
        return {"w": torch.linalg.solve(k, self.X.T @ self.y)}

    def exact_hypergradient(self, hparams: dict[str, Tensor]) -> dict[str, Tensor]:
        lam = torch.exp(hparams["log_lam"].detach())
        k = self.inner_hessian({}, hparams)
        w = torch.linalg.solve(k, self.X.T @ self.y)
        dw_dlam = -torch.linalg.solve(k, w)
        grad_w = 2.0 / self.y_val.numel() * self.X_val.T @ (self.X_val @ w - self.y_val)
        return {"log_lam": lam * (grad_w @ dw_dlam)}
