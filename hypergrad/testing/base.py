r"""The interface every toy bilevel problem shares, and the few generic methods built on it.

A toy problem is :math:`\min_\lambda F(\theta^*(\lambda), \lambda)` with
:math:`\theta^*(\lambda) = \arg\min_\theta G(\theta, \lambda)` where everything needed to *check*
a hypergradient is known exactly: the inner solution, the inner gradient and Hessian in closed
form, and the exact hypergradient. None of these references use :mod:`hypergrad`; tests and
benchmarks compare the library against them.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

__all__ = ["ToyProblem"]


class ToyProblem(abc.ABC):
    r"""A bilevel problem with known answers; subclasses define the losses and closed forms.

    Subclasses set ``dtype``, ``device``, ``param_shapes`` (dict name -> shape of :math:`\theta`)
    and implement the abstract methods. Losses are pure functions of their arguments (the data is
    held on the object), so they are safe under ``torch.func`` transforms.
    """

    dtype: torch.dtype
    device: torch.device
    param_shapes: dict[str, tuple[int, ...]]

    @abc.abstractmethod
    def inner_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        r""":math:`G(\theta, \lambda)`, a scalar."""

    @abc.abstractmethod
    def outer_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        r""":math:`F(\theta, \lambda)`, a scalar."""

    @abc.abstractmethod
    def init_hparams(self) -> dict[str, Tensor]:
        r"""A starting :math:`\lambda` (deterministic for a given seed)."""

    @abc.abstractmethod
    def inner_grad(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> dict[str, Tensor]:
        r""":math:`\nabla_\theta G(\theta, \lambda)` in closed form (differentiable)."""

    @abc.abstractmethod
    def inner_hessian(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        r"""The dense inner Hessian :math:`\nabla^2_\theta G`, shape ``(n, n)`` over the flattened params."""

    @abc.abstractmethod
    def inner_solution(self, hparams: dict[str, Tensor]) -> dict[str, Tensor]:
        r""":math:`\theta^*(\lambda)` (closed form or Newton to machine precision), detached."""

    @abc.abstractmethod
    def exact_hypergradient(self, hparams: dict[str, Tensor]) -> dict[str, Tensor]:
        r""":math:`\nabla_\lambda F(\theta^*(\lambda), \lambda)` from a dense formula, keyed like ``hparams``."""

    @property
    def num_params(self) -> int:
        """Number of inner unknowns :math:`n` (the size of the linear system)."""
        n = 0
        for shape in self.param_shapes.values():
            size = 1
            for s in shape:
                size *= s
            n += size
        return n

    def init_params(self) -> dict[str, Tensor]:
        r"""A starting :math:`\theta_0 = 0` for inner optimisation or unrolling."""
        return {k: torch.zeros(s, dtype=self.dtype, device=self.device) for k, s in self.param_shapes.items()}

    def hessian_bounds(self, hparams: dict[str, Tensor]) -> tuple[float, float]:
        r"""``(lambda_min, lambda_max)`` of :math:`\nabla^2_\theta G` at :math:`\theta^*(\lambda)`.

        Use them to set a stable Neumann step (:math:`\alpha = 1/\lambda_{\max}`) or gradient step.
        """
        h = self.inner_hessian(self.inner_solution(hparams), hparams)
        eig = torch.linalg.eigvalsh(h)
        return float(eig[0]), float(eig[-1])

    def inner_step(self, params: dict[str, Tensor], hparams: dict[str, Tensor], lr: float) -> dict[str, Tensor]:
        r"""One gradient-descent step :math:`\theta - \eta \nabla_\theta G(\theta, \lambda)` (differentiable).

        With ``lr`` :math:`= \eta < 2/\lambda_{\max}` it is a contraction whose fixed point is
        :math:`\theta^*`: the map for :func:`hypergrad.fixed_point_grad` and
        :func:`hypergrad.unrolled_grad`.
        """
        g = self.inner_grad(params, hparams)
        return {k: params[k] - lr * g[k] for k in params}

    def finite_difference_hypergradient(self, hparams: dict[str, Tensor], eps: float = 1e-5) -> dict[str, Tensor]:
        r"""Central differences of :math:`\lambda \mapsto F(\theta^*(\lambda), \lambda)`, re-solving the inner problem.

        .. math:: \frac{\partial F}{\partial \lambda_i} \approx
            \frac{F(\theta^*(\lambda + \epsilon e_i), \lambda + \epsilon e_i)
                 - F(\theta^*(\lambda - \epsilon e_i), \lambda - \epsilon e_i)}{2\epsilon}

        Two inner solves per hyper-parameter entry; error :math:`O(\epsilon^2)` plus rounding
        :math:`O(\epsilon_{\text{mach}}/\epsilon)`. Independent of :mod:`hypergrad`.
        """
        out = {}
        for key, value in hparams.items():
            base = value.detach().reshape(-1)
            grad = torch.empty_like(base)
            for i in range(base.numel()):
                losses = []
                for sign in (1.0, -1.0):
                    shifted = base.clone()
                    shifted[i] += sign * eps
                    h = {**hparams, key: shifted.reshape(value.shape)}
                    losses.append(self.outer_loss(self.inner_solution(h), h))
                grad[i] = (losses[0] - losses[1]) / (2 * eps)
            out[key] = grad.reshape(value.shape)
        return out

    def _init_data(
        self, sizes: dict[str, int], seed: int, dtype: torch.dtype, device: str | torch.device
    ) -> torch.Generator:
        """Validate the integer sizes, record dtype/device/seed; return the private data generator."""
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}: `{name}` must be an integer >= 1, got {value!r}.")
        self.dtype, self.device, self.seed = dtype, torch.device(device), seed
        return torch.Generator().manual_seed(seed)

    def _tensor(self, x: Tensor) -> Tensor:
        return x.to(dtype=self.dtype, device=self.device)
