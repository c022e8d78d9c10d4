"""LARS and the linear warm-up + cosine learning-rate schedule used by BiSSL's pretext level."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LARS", "WarmupCosine", "warmup_cosine"]


class LARS(Optimizer):
    r"""Layer-wise adaptive rate scaling with momentum (You et al., 2017), as used by SimCLR/BYOL.

    For each parameter tensor :math:`\theta` with gradient :math:`g` (one "layer"):

    .. math::

        \begin{aligned}
        &g \leftarrow g + \lambda \theta \\
        &r \leftarrow \begin{cases} \eta \, \|\theta\| / \|g\| & \|\theta\| > 0,\ \|g\| > 0 \\
                                    1 & \text{otherwise} \end{cases} \\
        &m \leftarrow \mu m + r g \\
        &\theta \leftarrow \theta - \gamma m
        \end{aligned}

    with learning rate :math:`\gamma`, weight decay :math:`\lambda`, momentum :math:`\mu` and trust
    coefficient :math:`\eta`. By default (the BiSSL authors' LARS) there are no parameter filters:
    every tensor, BatchNorm weights and biases included, is decayed and trust-ratio scaled. With
    ``exclude_bias_and_norm=True`` one-dimensional tensors (biases, BatchNorm weights) skip both
    the weight decay and the trust ratio (:math:`\lambda = 0`, :math:`r = 1`), as in the
    SimCLR/BYOL/VICReg recipes.

    Args:
        params: parameters or parameter groups (each group may override every option).
        lr: :math:`\gamma` (BiSSL: 4.8 for pretraining at batch 1024, 1.0 in the lower level).
        weight_decay: :math:`\lambda` (BiSSL: 1e-6).
        momentum: :math:`\mu` (0.9).
        eta: trust coefficient :math:`\eta` (0.001).
        exclude_bias_and_norm: skip weight decay and adaptation for 1-D tensors (default ``False``,
            the BiSSL authors' choice).

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]).reshape(1, 2))
        >>> opt = LARS([w], lr=1.0, weight_decay=0.0, momentum=0.0, eta=0.1)
        >>> w.grad = torch.tensor([[0.0, 1.0]])
        >>> opt.step()  # r = 0.1 * 5 / 1 = 0.5
        >>> w.detach()
        tensor([[3.0000, 3.5000]])

    References:
        You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks", arXiv 1708.03888.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
        exclude_bias_and_norm: bool = False,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: lr={lr!r}; pass lr >= 0.")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay!r}; pass weight_decay >= 0.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum!r}; pass 0 <= momentum < 1.")
        if not eta > 0.0:
            raise ValueError(f"Invalid eta: {eta!r}; pass a trust coefficient eta > 0 (e.g. 0.001).")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            eta=eta,
            exclude_bias_and_norm=exclude_bias_and_norm,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not (group["exclude_bias_and_norm"] and p.ndim <= 1):
                    if group["weight_decay"] != 0:
                        g = g.add(p, alpha=group["weight_decay"])
                    p_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    ratio = torch.where(
                        (p_norm > 0) & (g_norm > 0),
                        group["eta"] * p_norm / g_norm,
                        torch.ones_like(p_norm),
                    )
                    g = g.mul(ratio)
                if group["momentum"] != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(g).detach()
                    else:
                        buf.mul_(group["momentum"]).add_(g)
                    g = buf
                p.add_(g, alpha=-group["lr"])
        return loss


class WarmupCosine:
    r"""LR factor: linear warm-up to 1, then cosine decay to ``final_lr_scale``.

    .. math::

        f(s) = \begin{cases} (s + 1) / W & s < W \\
        c + (1 - c) \tfrac12 \big(1 + \cos(\pi \min(1, (s - W) / (T - W)))\big) & s \ge W
        \end{cases}

    with warm-up steps :math:`W`, total steps :math:`T` and final scale :math:`c`. A callable
    object (not a closure) so that :class:`~torch.optim.lr_scheduler.LambdaLR` can save it.

    Example:
        >>> f = WarmupCosine(2, 6, 0.0)
        >>> [round(f(s), 3) for s in range(7)]
        [0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0]
    """

    def __init__(self, warmup_steps: int, total_steps: int, final_lr_scale: float) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}.")
        if total_steps < max(1, warmup_steps):
            raise ValueError(f"total_steps must be >= max(1, warmup_steps={warmup_steps}), got {total_steps!r}.")
        if not 0.0 <= final_lr_scale <= 1.0:
            raise ValueError(f"final_lr_scale must lie in [0, 1], got {final_lr_scale!r}.")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.final_lr_scale = float(final_lr_scale)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        c = self.final_lr_scale
        return c + (1.0 - c) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int, final_lr_scale: float = 0.0) -> LambdaLR:
    r"""Linear warm-up then cosine decay of every group's base lr (see :class:`WarmupCosine`).

    Call ``scheduler.step()`` once after each ``optimizer.step()``.

    Args:
        optimizer: any torch optimizer.
        warmup_steps: :math:`W` (0 for no warm-up, e.g. fine-tuning).
        total_steps: :math:`T`, the step at which the factor reaches ``final_lr_scale``.
        final_lr_scale: :math:`c`, final lr as a fraction of the base lr (BiSSL lower level: 0.001).

    Returns:
        A :class:`~torch.optim.lr_scheduler.LambdaLR`.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        >>> sched = warmup_cosine(opt, warmup_steps=0, total_steps=2, final_lr_scale=0.5)
        >>> lrs = []
        >>> for _ in range(3):
        ...     lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
        >>> lrs
        [2.0, 1.5, 1.0]
    """
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, final_lr_scale))
