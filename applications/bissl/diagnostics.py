r"""Per-alternation diagnostics of the BiSSL stage and the adaptive settings built on them.

* :func:`pretext_grad_norm` - :math:`\|\nabla_{\theta_P} L_P\|` on the Hessian batch (backbone only).
* :func:`proximal_share` - :math:`\lambda \|\theta_P - \theta_D\| / \|\nabla_{\theta_P} L_P\|`, the size of
  the proximal term relative to the pretext gradient in the lower step.
* :func:`lanczos_extremes` - the extreme Ritz values of a symmetric operator after ``k`` Lanczos steps.
* :func:`adaptive_damping` - the damping that makes :math:`I + H/(\lambda + d)` positive definite
  on the Krylov space, with a margin.
* :func:`target_lam` - the :math:`\lambda` that gives the proximal term a target share.

All run through public ``hypergrad`` functions (``stateless``, ``HessianOperator``) and never touch
the models' BatchNorm running statistics.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from hypergrad import HessianOperator, stateless, tree_norm

from .bilevel import local_negatives

__all__ = [
    "backbone_loss_fn",
    "pretext_grad_norm",
    "sharded_pretext_grad_norm",
    "param_distance",
    "proximal_share",
    "lanczos_extremes",
    "hessian_extremes",
    "adaptive_damping",
    "target_lam",
]


def backbone_loss_fn(ssl: nn.Module, x1: Tensor, x2: Tensor) -> tuple[Callable[[dict], Tensor], dict[str, Tensor]]:
    """``(fn, params)``: the pretext loss as a pure function of the backbone parameters.

    Batch statistics in BatchNorm, running statistics untouched, negatives of this rank only (as
    in the stage's Hessian products).
    """
    f = stateless(ssl)
    params = {"backbone." + k: v.detach() for k, v in ssl.backbone.named_parameters() if v.requires_grad}

    def fn(p: dict) -> Tensor:
        with local_negatives(ssl):
            return f(p, x1, x2)

    return fn, params


def pretext_grad_norm(ssl: nn.Module, x1: Tensor, x2: Tensor) -> float:
    r""":math:`\|\nabla_{\theta_P} L_P\|_2` over the backbone on one batch."""
    fn, params = backbone_loss_fn(ssl, x1, x2)
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        grads = torch.autograd.grad(fn(p), list(p.values()))
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


def sharded_pretext_grad_norm(ssl: nn.Module, x1: Tensor, x2: Tensor) -> float:
    r""":math:`\|\nabla_{\theta_P} \bar L_P\|_2` over a ``fully_shard``-ed backbone (``--fsdp``) on one batch.

    One ``backward()`` through the sharded SSL model (``torch.func`` cannot see through
    ``fully_shard``): batch statistics in BatchNorm, negatives of this rank only, the gradient
    averaged over ranks by FSDP2; the running statistics and the models' ``.grad`` are left as they were.
    """
    params = [p for p in ssl.backbone.parameters() if p.requires_grad]
    grads = [(p, p.grad) for p in ssl.parameters()]
    buffers = [(b, b.detach().clone()) for b in ssl.buffers()]
    try:
        for p, _ in grads:
            p.grad = None
        with torch.enable_grad(), local_negatives(ssl):
            ssl(x1, x2).backward()
        return float(tree_norm({str(i): p.grad.double() for i, p in enumerate(params) if p.grad is not None}))
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, g in grads:
            p.grad = g


def param_distance(a: nn.Module, b: nn.Module) -> float:
    r""":math:`\|\theta_a - \theta_b\|_2` over the parameters of two modules with the same names."""
    pb = dict(b.named_parameters())
    if any(isinstance(p, DTensor) for p in pb.values()):  # --fsdp: shards reduced over ranks (hypergrad.tree_norm)
        diff = {k: p.detach().double() - pb[k].detach().double() for k, p in a.named_parameters()}
        return float(tree_norm(diff))
    total = sum(((p.detach().double() - pb[k].detach().double()) ** 2).sum() for k, p in a.named_parameters())
    return float(torch.sqrt(torch.as_tensor(total)))


def proximal_share(lam: float, distance: float, grad_norm: float) -> float:
    r""":math:`\lambda\,\|\theta_P - \theta_D\| / \|\nabla L_P\|` (``nan`` when the gradient is zero).

    Example:
        >>> proximal_share(1e-3, 2.0, 0.5)
        0.004
    """
    return lam * distance / grad_norm if grad_norm > 0 else float("nan")


def lanczos_extremes(matvec: Callable[[Tensor], Tensor], v0: Tensor, steps: int) -> tuple[float, float]:
    r"""``(min, max)`` Ritz values of a symmetric operator after ``steps`` Lanczos steps from ``v0``.

    Full re-orthogonalisation (``steps`` is small); stops early on an invariant subspace. The
    smallest Ritz value is an upper bound of the smallest eigenvalue and converges to it from above.

    Example:
        >>> A = torch.diag(torch.tensor([-2.0, 1.0, 3.0], dtype=torch.float64))
        >>> lo, hi = lanczos_extremes(lambda v: A @ v, torch.ones(3, dtype=torch.float64), 3)
        >>> round(lo, 6), round(hi, 6)
        (-2.0, 3.0)
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an int >= 1, got {steps!r}.")
    q = v0 / torch.linalg.vector_norm(v0)
    basis, alphas, betas = [q], [], []
    for k in range(steps):
        w = matvec(basis[-1])
        alphas.append(float(torch.dot(w, basis[-1])))
        for b in basis:  # full re-orthogonalisation
            w = w - torch.dot(w, b) * b
        beta = float(torch.linalg.vector_norm(w))
        if k == steps - 1 or beta <= 1e-10 * max(1.0, abs(alphas[-1])) or not math.isfinite(beta):
            break
        betas.append(beta)
        basis.append(w / beta)
    n = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    for i, b in enumerate(betas[: n - 1]):
        t[i, i + 1] = t[i + 1, i] = b
    ev = torch.linalg.eigvalsh(t)
    return float(ev[0]), float(ev[-1])


def hessian_extremes(ssl: nn.Module, x1: Tensor, x2: Tensor, steps: int, *, seed: int = 0) -> tuple[float, float]:
    r"""Extreme Ritz values of :math:`H = \nabla^2_{\theta_P} L_P` (backbone) on one batch."""
    fn, params = backbone_loss_fn(ssl, x1, x2)
    op = HessianOperator(fn, params)
    keys = list(params)
    shapes = [params[k].shape for k in keys]
    sizes = [params[k].numel() for k in keys]

    def mv(v: Tensor) -> Tensor:
        tree = {k: c.reshape(s).to(params[k].dtype) for k, c, s in zip(keys, torch.split(v, sizes), shapes)}
        out = op(tree)
        return torch.cat([out[k].reshape(-1).double() for k in keys])

    g = torch.Generator().manual_seed(seed)
    v0 = torch.randn(sum(sizes), generator=g, dtype=torch.float64).to(params[keys[0]].device)
    return lanczos_extremes(mv, v0, steps)


def adaptive_damping(min_ritz: float, lam: float, base: float, margin: float) -> float:
    r"""Damping :math:`d = \max(d_0, m\,(-\mu) - \lambda)` for the most negative Ritz value :math:`\mu`.

    Then :math:`1 + \mu/(\lambda + d) \ge 1 - 1/m > 0` on the Krylov space (margin :math:`m > 1`).

    Example:
        >>> adaptive_damping(-46.0, 1e-3, 10.0, 2.0)
        91.999
        >>> adaptive_damping(3.0, 1e-3, 10.0, 2.0)
        10.0
    """
    if not math.isfinite(min_ritz):
        return base
    return max(base, margin * max(0.0, -min_ritz) - lam)


def target_lam(share: float, grad_norm: float, distance: float, lo: float, hi: float) -> float:
    r""":math:`\lambda = s\,\|\nabla L_P\| / \|\theta_P - \theta_D\|`, clipped to ``[lo, hi]``.

    Example:
        >>> target_lam(0.05, 2.0, 1.0, 1e-3, 1.0)
        0.1
        >>> target_lam(0.05, 2.0, 0.0, 1e-3, 1.0)  # theta_P = theta_D: no distance yet, keep lo
        0.001
    """
    if not (distance > 0 and math.isfinite(grad_norm)):
        return lo
    return min(hi, max(lo, share * grad_norm / distance))
