r"""A quadratic bilevel problem with a set Hessian spectrum and a closed-form hypergradient."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import ToyProblem

__all__ = ["QuadraticProblem"]


class QuadraticProblem(ToyProblem):
    r"""Quadratic inner problem with a chosen spectrum, quadratic outer problem.

    .. math::

        G(\theta, \lambda) = \tfrac12 \theta^\top A \theta - \theta^\top B \lambda,
        \qquad
        F(\theta, \lambda) = \tfrac12 \|\theta - t\|^2 + \tfrac{c}{2} \|\lambda\|^2,

    with :math:`A = Q \,\mathrm{diag}(s)\, Q^\top`, :math:`Q` a random orthogonal matrix and
    :math:`s` log-spaced in :math:`[1, \kappa]` (``cond``). Then

    .. math::

        \theta^*(\lambda) = A^{-1} B \lambda,
        \qquad
        \nabla_\lambda F = B^\top A^{-1} (\theta^* - t) + c \lambda,

    and the inner Hessian is :math:`A` everywhere, with :math:`\lambda_{\min} = 1`,
    :math:`\lambda_{\max} = \kappa` (the benchopt "quadratic with set spectrum" problem).

    Args:
        dim: size of :math:`\theta` (params ``{"theta": (dim,)}``).
        hdim: size of :math:`\lambda` (hparams ``{"lam": (hdim,)}``).
        cond: condition number :math:`\kappa \ge 1` of :math:`A`.
        reg: :math:`c \ge 0`, the direct dependence of :math:`F` on :math:`\lambda`.
        seed: seed of the data (a private ``torch.Generator``; global RNG untouched).
        dtype, device: where the data lives.

    Example:
        >>> import torch
        >>> prob = QuadraticProblem(dim=4, hdim=2, cond=5.0)
        >>> lam = prob.init_hparams()
        >>> theta = prob.inner_solution(lam)
        >>> [round(v, 6) for v in prob.hessian_bounds(lam)]
        [1.0, 5.0]
        >>> torch.allclose(prob.inner_grad(theta, lam)["theta"], torch.zeros(4, dtype=torch.float64), atol=1e-12)
        True
    """

    def __init__(
        self,
        dim: int = 20,
        hdim: int = 5,
        cond: float = 10.0,
        reg: float = 0.1,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ):
        gen = self._init_data({"dim": dim, "hdim": hdim}, seed, dtype, device)
        if not (isinstance(cond, (int, float)) and math.isfinite(cond) and cond >= 1):
            raise ValueError(f"QuadraticProblem: `cond` must be a finite number >= 1, got {cond!r}.")
        if not (isinstance(reg, (int, float)) and math.isfinite(reg) and reg >= 0):
            raise ValueError(f"QuadraticProblem: `reg` must be a finite number >= 0, got {reg!r}.")
        self.dim, self.hdim, self.cond, self.reg = dim, hdim, float(cond), float(reg)
        self.param_shapes = {"theta": (dim,)}
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        self.spectrum = self._tensor(torch.logspace(0.0, math.log10(cond), dim, dtype=torch.float64))
        self.A = self._tensor((q * torch.logspace(0.0, math.log10(cond), dim, dtype=torch.float64)) @ q.T)
        self.A = 0.5 * (self.A + self.A.T)
        self.B = self._tensor(torch.randn(dim, hdim, generator=gen, dtype=torch.float64) / math.sqrt(hdim))
        self.target = self._tensor(torch.randn(dim, generator=gen, dtype=torch.float64))
        self._lam0 = self._tensor(torch.randn(hdim, generator=gen, dtype=torch.float64))

    def inner_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        theta, lam = params["theta"], hparams["lam"]
        return 0.5 * theta @ (self.A @ theta) - theta @ (self.B @ lam)

    def outer_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        theta, lam = params["theta"], hparams["lam"]
        return 0.5 * ((theta - self.target) ** 2).sum() + 0.5 * self.reg * (lam**2).sum()

    def init_hparams(self) -> dict[str, Tensor]:
        return {"lam": self._lam0.clone()}

    def inner_grad(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"theta": self.A @ params["theta"] - self.B @ hparams["lam"]}

    def inner_hessian(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        return self.A.clone()

    def inner_solution(self, hparams: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"theta": torch.linalg.solve(self.A, self.B @ hparams["lam"].detach())}

    def exact_hypergradient(self, hparams: dict[str, Tensor]) -> dict[str, Tensor]:
        lam = hparams["lam"].detach()
        theta = self.inner_solution(hparams)["theta"]
        return {"lam": self.B.T @ torch.linalg.solve(self.A, theta - self.target) + self.reg * lam}

    def hessian_bounds(self, hparams: dict[str, Tensor]) -> tuple[float, float]:
        """``(1, cond)``: the set spectrum of :math:`A` (exact, no eigen-decomposition)."""
        return float(self.spectrum[0]), float(self.spectrum[-1])
