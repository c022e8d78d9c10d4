r"""BiSSL as a :class:`hypergrad.BilevelProblem`: the two losses and the coupling.

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

import dataclasses
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hypergrad import BilevelProblem, Level

from .config import BiSSLConfig
from .optim import warmup_cosine

__all__ = ["PretextBatch", "local_negatives", "inner_loss", "make_outer_loss", "build_problem", "stage_schedules"]


class PretextBatch(NamedTuple):
    """Two augmented views of a pretext batch, and whether SimCLR's negatives stay on this rank.

    ``local_negatives=True`` marks the Hessian batch: inside ``torch.func`` transforms the loss
    cannot ``all_gather``, so each rank uses its own negatives there (plain ``(x1, x2)`` tuples are
    ordinary batches with negatives gathered over all ranks).
    """

    x1: Tensor
    x2: Tensor
    local_negatives: bool = False


@contextmanager
def local_negatives(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Within the block, ``model.loss_fn`` (SimCLR) uses this rank's negatives only (no-op for BYOL)."""
    loss_fn = getattr(model, "loss_fn", None)
    if not on or not hasattr(loss_fn, "gather"):
        yield
        return
    gather, loss_fn.gather = loss_fn.gather, False
    try:
        yield
    finally:
        loss_fn.gather = gather


def inner_loss(inner: nn.Module, outer: nn.Module, batch: Any) -> Tensor:
    r""":math:`L_P`: the SSL model's pretext loss on a two-view batch (a :class:`PretextBatch` or ``(x1, x2)``).

    ``outer`` is unused: the lower level sees :math:`\theta_D` only through the proximal term,
    which :class:`hypergrad.Proximal` adds.
    """
    with local_negatives(inner, bool(getattr(batch, "local_negatives", False))):
        return inner(batch[0], batch[1])


def make_outer_loss(gamma: float) -> Callable[[nn.Module, nn.Module, Any], Tensor]:
    r""":math:`F = L_D(\theta_P, \phi) + \gamma L_D(\theta_D, \phi)` on a labelled batch ``(x, y)``.

    Example:
        >>> inner = nn.Module(); inner.backbone = nn.Linear(2, 3)
        >>> outer = nn.ModuleDict({"backbone": nn.Linear(2, 3), "head": nn.Linear(3, 2)})
        >>> loss = make_outer_loss(0.0)(inner, outer, (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)))
        >>> loss.shape, bool(loss.detach() > 0)
        (torch.Size([]), True)
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0 <= gamma < float("inf")):
        raise ValueError(f"`gamma` must be a finite number >= 0 (--gamma), got {gamma!r}.")

    def outer_loss(inner: nn.Module, outer: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        head = outer["head"]
        loss = F.cross_entropy(head(inner.backbone(x)), y)
        if gamma:
            loss = loss + gamma * F.cross_entropy(head(outer["backbone"](x)), y)
        return loss

    return outer_loss


def stage_schedules(cfg: BiSSLConfig, lower_opt: torch.optim.Optimizer, upper_opt: torch.optim.Optimizer) -> tuple:
    r"""The BiSSL stage's learning-rate schedules ``(lower_sched, upper_sched)`` for :func:`build_problem`.

    Over :math:`A` alternations the lower level takes :math:`A N_L` steps (linear warm-up over
    ``min(lower_warmup_steps, A N_L)`` of them, then cosine decay to ``final_lr_factor``) and the
    upper level :math:`A N_U` steps (cosine decay, no warm-up); see
    :func:`~applications.bissl.optim.warmup_cosine`. The image and the text stage both use them.

    Example:
        >>> cfg = BiSSLConfig(alternations=2, lower_steps=3, upper_steps=1, lower_warmup_steps=10)
        >>> lower_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> upper_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> low, up = stage_schedules(cfg, lower_opt, upper_opt)
        >>> [(s.lr_lambdas[0].warmup_steps, s.lr_lambdas[0].total_steps) for s in (low, up)]
        [(6, 6), (0, 2)]
    """
    n_low, n_up = cfg.alternations * cfg.lower_steps, cfg.alternations * cfg.upper_steps
    lower_sched = warmup_cosine(lower_opt, min(cfg.lower_warmup_steps, n_low), n_low, cfg.final_lr_factor)
    return lower_sched, warmup_cosine(upper_opt, 0, n_up, cfg.final_lr_factor)


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
    lam: float | None = None,
    damping: float | None = None,
    dense_inner: nn.Module | None = None,
) -> BilevelProblem:
    r"""The BiSSL :class:`hypergrad.BilevelProblem`.

    Args:
        ssl: lower level, an :class:`~applications.bissl.ssl_model.SSLModel` (its ``backbone`` is
            :math:`\theta_P`).
        upper: :math:`\theta_D`, a backbone with the same parameter names as ``ssl.backbone``.
        head: :math:`\phi`.
        cfg: the problem runs ``cfg.method`` (the :class:`hypergrad.Proximal` holding ``lam``,
            ``damping``, ``solver``, ``hvp_mode``, ``warm_start``, ``reuse_operator``); ``gamma`` and
            ``clip_norm`` are read from it too.
        lower_opt, upper_opt: optimisers over ``ssl``'s trainable parameters and over
            ``upper`` + ``head``; ``lower_sched``, ``upper_sched`` their schedulers.
        callbacks: passed to :class:`hypergrad.BilevelProblem`.
        lam, damping: override ``cfg.method.lam`` / ``cfg.method.damping`` (adaptive settings of the stage).
        dense_inner: ``--fsdp`` only: an unsharded twin of ``ssl`` (meta device) for exact Hessian products
            of the sharded backbone (``hypergrad.BilevelProblem(dense_inner=...)``).
    """
    method = cfg.method
    if lam is not None or damping is not None:
        method = dataclasses.replace(
            method,
            lam=lam if lam is not None else method.lam,
            damping=damping if damping is not None else method.damping,
        )
    return BilevelProblem(
        inner=Level(ssl, lower_opt, lower_sched, max_grad_norm=cfg.clip_norm),
        outer=Level({"backbone": upper, "head": head}, upper_opt, upper_sched, max_grad_norm=cfg.clip_norm),
        inner_loss=inner_loss,
        outer_loss=make_outer_loss(cfg.gamma),
        method=method,
        callbacks=callbacks,
        dense_inner=dense_inner,
    )
