r"""BiSSL as a :class:`hypergrad.BilevelProblem`: the two losses, the coupling, exact BatchNorm.

Notation (BISSL.md): :math:`\theta_P` lower (pretext) backbone, :math:`\theta_D` upper (downstream)
backbone, :math:`\phi` downstream head, :math:`L_P` pretext loss, :math:`L_D` downstream loss.

* Lower level (inner): the :class:`~applications.bissl.ssl_model.SSLModel` (backbone, projector,
  predictor; the BYOL target is a constant), loss :math:`L_P(\theta_P) + \frac{\lambda}{2}
  \|\theta_P - \theta_D\|^2` - the proximal term is added by :class:`hypergrad.Proximal` over the
  coupled parameters ``{"backbone": "backbone"}`` only.
* Upper level (outer): ``{"backbone": theta_D, "head": phi}``, loss
  :math:`L_D(\theta_P, \phi) + \gamma L_D(\theta_D, \phi)` (:func:`make_outer_loss`).

``hypergrad.Proximal`` then writes into ``theta_D.grad``

.. math::

    g_{\theta_D} = \lambda_e (H + \lambda_e I)^{-1}\, \nabla_{\theta_P} L_D(\theta_P, \phi)
                   + \gamma\, \nabla_{\theta_D} L_D(\theta_D, \phi),\qquad
    \lambda_e = \lambda + \text{damping},

with :math:`H = \nabla^2_{\theta_P} L_P` (backbone only) on the Hessian batch, and into
``phi.grad`` the sum of both terms' ordinary gradients.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hypergrad import BilevelProblem, Level, Proximal

from .config import BiSSLConfig

__all__ = ["HESSIAN", "exact_batch_norm", "inner_loss", "make_outer_loss", "build_problem"]

#: Tag a pretext batch ``(x1, x2, HESSIAN)`` to mark it as the Hessian batch: its SimCLR loss then
#: uses this rank's negatives only (no ``all_gather`` inside ``torch.func`` transforms).
HESSIAN = "hessian"
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _bn_forward(self: nn.Module, x: Tensor) -> Tensor:
    if self.running_mean is not None:  # an ordinary call: torch's kernel, running statistics updated
        return self._hg_original_forward(x)
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + self.eps)
    if self.weight is not None:
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
    return y


def exact_batch_norm(module: nn.Module) -> nn.Module:
    r"""Make BatchNorm layers differentiable twice under ``torch.func``; returns ``module``.

    With torch 2.15, the second derivatives that ``torch.func`` (``jvp``/``vjp`` of ``grad``, hence
    every hypergrad HVP mode but ``finite_diff``) produces through ``F.batch_norm`` in training
    mode are wrong by O(1), while first derivatives and classic double backward are right
    (``tests/bissl/test_upper_gradient.py`` checks both). After this call, a BatchNorm layer
    whose running statistics are hidden - as :func:`hypergrad.stateless` does with
    ``buffers="batch_stats"`` in every hypergradient pass - normalises with the explicit formula
    :math:`(x - \mu_B)/\sqrt{\sigma_B^2 + \epsilon}\,w + b`, the same function built from
    elementwise ops. Ordinary calls (running statistics present) are unchanged: they still use
    ``F.batch_norm`` and update the running statistics.

    Example:
        >>> import hypergrad
        >>> bn = exact_batch_norm(nn.BatchNorm1d(3))
        >>> x = torch.randn(8, 3)
        >>> y = hypergrad.stateless(bn)({}, x)  # functional pass: explicit formula
        >>> torch.allclose(y, bn(x), atol=1e-5), int(bn.num_batches_tracked)  # ordinary call updates stats
        (True, 1)
    """
    for m in module.modules():
        if isinstance(m, _BN_TYPES) and not hasattr(m, "_hg_original_forward"):
            m._hg_original_forward = m.forward
            m.forward = types.MethodType(_bn_forward, m)
    return module


def inner_loss(inner: nn.Module, outer: nn.Module, batch: Any) -> Tensor:
    r""":math:`L_P`: the SSL model's pretext loss on a two-view batch ``(x1, x2[, HESSIAN])``.

    ``outer`` is unused: the lower level sees :math:`\theta_D` only through the proximal term,
    which :class:`hypergrad.Proximal` adds.
    """
    x1, x2 = batch[0], batch[1]
    loss_fn = getattr(inner, "loss_fn", None)
    local = len(batch) > 2 and batch[2] == HESSIAN and hasattr(loss_fn, "gather")
    if not local:
        return inner(x1, x2)
    gather, loss_fn.gather = loss_fn.gather, False
    try:
        return inner(x1, x2)
    finally:
        loss_fn.gather = gather


def make_outer_loss(gamma: float) -> Callable[[nn.Module, nn.Module, Any], Tensor]:
    r""":math:`F = L_D(\theta_P, \phi) + \gamma L_D(\theta_D, \phi)` on a labelled batch ``(x, y)``.

    Example:
        >>> inner = nn.Module(); inner.backbone = nn.Linear(2, 3)
        >>> outer = nn.ModuleDict({"backbone": nn.Linear(2, 3), "head": nn.Linear(3, 2)})
        >>> loss = make_outer_loss(0.0)(inner, outer, (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)))
        >>> loss.shape, bool(loss.detach() > 0)
        (torch.Size([]), True)
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0:
        raise ValueError(f"`gamma` must be a number >= 0, got {gamma!r}.")

    def outer_loss(inner: nn.Module, outer: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        head = outer["head"]
        loss = F.cross_entropy(head(inner.backbone(x)), y)
        if gamma:
            loss = loss + gamma * F.cross_entropy(head(outer["backbone"](x)), y)
        return loss

    return outer_loss


def build_problem(
    ssl: nn.Module,
    upper: nn.Module,
    head: nn.Module,
    cfg: BiSSLConfig,
    *,
    lower_opt: torch.optim.Optimizer,
    upper_opt: torch.optim.Optimizer,
    lower_sched: Any = None,
    upper_sched: Any = None,
    callbacks: tuple = (),
) -> BilevelProblem:
    r"""The BiSSL :class:`hypergrad.BilevelProblem`.

    Args:
        ssl: lower level, an :class:`~applications.bissl.ssl_model.SSLModel` (its ``backbone`` is
            :math:`\theta_P`).
        upper: :math:`\theta_D`, a backbone with the same parameter names as ``ssl.backbone``.
        head: :math:`\phi`.
        cfg: ``lam``, ``damping``, ``gamma``, ``solver``, ``hvp_mode``, ``warm_start``,
            ``reuse_operator``, ``clip_norm`` are read from it.
        lower_opt, upper_opt: optimisers over ``ssl``'s trainable parameters and over
            ``upper`` + ``head``; ``lower_sched``, ``upper_sched`` their schedulers.
        callbacks: passed to :class:`hypergrad.BilevelProblem`.
    """
    exact_batch_norm(ssl)
    exact_batch_norm(upper)
    method = Proximal(lam=cfg.lam, damping=cfg.damping, coupling={"backbone": "backbone"}, solver=cfg.solver,
                      hvp_mode=cfg.hvp_mode, warm_start=cfg.warm_start, reuse_operator=cfg.reuse_operator)
    return BilevelProblem(
        inner=Level(ssl, lower_opt, lower_sched, max_grad_norm=cfg.clip_norm),
        outer=Level({"backbone": upper, "head": head}, upper_opt, upper_sched, max_grad_norm=cfg.clip_norm),
        inner_loss=inner_loss,
        outer_loss=make_outer_loss(cfg.gamma),
        method=method,
        callbacks=callbacks,
    )
