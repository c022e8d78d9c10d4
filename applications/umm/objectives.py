r"""The UMM bilevel problem: lower = SSL + alignment to the early layers, upper = max coding-rate reduction.

Notation. :math:`f_E` the frozen early blocks (the prior), :math:`e = f_E(x)` their feature map;
:math:`f_L(\cdot;\theta)` the late blocks + global pooling, :math:`h = f_L(e;\theta)` the
last-layer feature; :math:`g` the projector, :math:`z = g(h)`. A batch holds two views
:math:`x^{(1)}, x^{(2)}` of :math:`B` images; :math:`H(\theta) = [h^{(1)}; h^{(2)}] \in
\mathbb{R}^{2B \times D}`; :math:`\Pi_2` is the two-views partition (image :math:`i`'s views form
group :math:`i`).

**Lower level** (variables: late blocks :math:`\theta_L` and projector :math:`g`), minimised:

.. math::

    G(\theta_L, g) = L_{\text{SSL}}(\theta_L, g) + \beta\, A(\theta_L)
                    + \frac{\lambda}{2} \|\theta_L - \theta_U\|^2

with SimCLR's NT-Xent :math:`L_{\text{SSL}}` and the **alignment** :math:`A` (below); the proximal
term is added by :class:`hypergrad.Proximal`.

**Upper level** (variables: a second copy of the late blocks, :math:`\theta_U`), minimised:

.. math::

    F(\theta_U) = -\Delta R\big(H(\theta_L^*(\theta_U)), \Pi_2; \epsilon^2\big)
                  + \mu\, L_{\text{SSL}}(\theta_L^*(\theta_U), g)
                  - \gamma\, \Delta R\big(H(\theta_U), \Pi_2; \epsilon^2\big)

on views of held-out images: minimising :math:`F` **maximises** the coding-rate reduction of the
last-layer features of the lower solution (the sign the published code gets wrong). By the
implicit function theorem (:math:`\partial\theta_L^*/\partial\theta_U = \lambda(\nabla^2 G_0 +
\lambda I)^{-1}` with :math:`G_0 = G` without the proximal term, Hessian over :math:`\theta_L`)

.. math::

    \nabla_{\theta_U} F = \lambda(\nabla^2_{\theta_L} G_0 + \lambda I)^{-1}\,\nabla_{\theta_L} F
                          + \partial_{\theta_U} F,

solved by CG (:class:`hypergrad.CG`); the first-order baseline (:class:`hypergrad.Identity`)
replaces the inverse by :math:`I`, i.e. :math:`\nabla_{\theta_U} F \approx \nabla_{\theta_L} F` - the
one-step DARTS-style approximation of the UMM paper.

**Alignment** :math:`A`. The early and late features have different widths, so they are compared
through their *neighbour distributions* within the batch (stochastic neighbour embedding). For
:math:`n = 2B` rows, with :math:`\bar e_i` the pooled, L2-normalised early feature and
:math:`\bar h_i` the L2-normalised last-layer feature,

.. math::

    P_{ij} = \frac{\exp(\bar e_i^\top \bar e_j/\tau)}{\sum_{k\ne i}\exp(\bar e_i^\top \bar e_k/\tau)},\quad
    Q_{ij}(\theta_L) = \frac{\exp(\bar h_i^\top \bar h_j/\tau)}{\sum_{k\ne i}\exp(\bar h_i^\top \bar h_k/\tau)},\quad
    A = \frac1n \sum_i \mathrm{KL}(P_{i\cdot}\,\|\,Q_{i\cdot}).

It is defined for any widths, invariant to rotations and scale of either feature space,
differentiable in :math:`\theta_L` (:math:`P` is a constant: the early blocks are frozen), zero
exactly when the last layer ranks neighbours like the prior, and computed from log-probabilities
(``log_softmax``) with the graph kept - the two defects that make the published term a no-op.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from applications.bissl.losses import NTXentLoss
from hypergrad import CG, BilevelProblem, Identity, Level, Proximal

from .coding_rate import coding_rate_reduction, two_view_labels

__all__ = [
    "encode_early",
    "inner_loss_fn",
    "make_levels",
    "neighbour_alignment",
    "outer_loss_fn",
    "build_problem",
    "views_dr",
]


def _pool(e: Tensor) -> Tensor:
    return e.mean(dim=(2, 3)) if e.ndim == 4 else e


def neighbour_alignment(early: Tensor, late: Tensor, tau: float = 0.1) -> Tensor:
    r"""Mean :math:`\mathrm{KL}(P_i \| Q_i)` of early (target, no gradient) vs late neighbour distributions.

    Args:
        early: ``(n, d_e)`` or ``(n, C, H, W)`` early features (pooled if 4-d); treated as constant.
        late: ``(n, d_l)`` last-layer features.
        tau: temperature :math:`\tau > 0` of both softmaxes.

    Returns:
        A scalar :math:`\ge 0`, zero when both induce the same neighbour distributions.

    Example:
        >>> e = torch.randn(6, 3)
        >>> float(neighbour_alignment(e, e)) < 1e-6, bool(neighbour_alignment(e, torch.randn(6, 5)) > 0)
        (True, True)
    """
    if not tau > 0:
        raise ValueError(f"`tau` must be > 0, got {tau!r}.")
    a, b = F.normalize(_pool(early).detach(), dim=1), F.normalize(late, dim=1)
    n = a.shape[0]
    if b.shape[0] != n or n < 3:
        raise ValueError(f"`early` and `late` must have the same number (>= 3) of rows, got {n} and {b.shape[0]}.")
    off = ~torch.eye(n, dtype=torch.bool, device=a.device)
    log_p = F.log_softmax((a @ a.T / tau)[off].view(n, n - 1), dim=1)
    log_q = F.log_softmax((b @ b.T / tau)[off].view(n, n - 1), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


def views_dr(h1: Tensor, h2: Tensor, eps2: float) -> Tensor:
    r""":math:`\Delta R([h_1; h_2], \Pi_2; \epsilon^2)`: the two-views coding-rate reduction."""
    return coding_rate_reduction(torch.cat([h1, h2]), two_view_labels(h1.shape[0], device=h1.device), eps2)


@torch.no_grad()
def encode_early(early: nn.Module, *views: Tensor) -> tuple[Tensor, ...]:
    """Early feature maps of each view (the frozen prior, in eval mode: a fixed function)."""
    early.eval()
    return tuple(early(v) for v in views)


def inner_loss_fn(align_weight: float, tau: float, temperature: float = 0.5) -> Callable[[Any, Any, Any], Tensor]:
    r"""Lower loss :math:`L_{\text{SSL}} + \beta A` on an early-feature batch ``(e1, e2)`` (no proximal term)."""
    ntxent = NTXentLoss(temperature=temperature, gather=False)

    def inner_loss(inner: nn.Module, outer: nn.Module, batch: Any) -> Tensor:
        e1, e2 = batch[0], batch[1]
        h1, h2 = inner["late"](e1), inner["late"](e2)
        loss = ntxent(inner["projector"](h1), inner["projector"](h2))
        if align_weight:
            loss = loss + align_weight * neighbour_alignment(torch.cat([e1, e2]), torch.cat([h1, h2]), tau)
        return loss

    return inner_loss


def outer_loss_fn(
    eps2: float, ssl_weight: float, gamma: float = 0.0, temperature: float = 0.5
) -> Callable[[Any, Any, Any], Tensor]:
    r"""Upper loss :math:`F = -\Delta R(H(\theta_L)) + \mu L_{\text{SSL}}(\theta_L) - \gamma\Delta R(H(\theta_U))`."""
    ntxent = NTXentLoss(temperature=temperature, gather=False)

    def outer_loss(inner: nn.Module, outer: nn.Module, batch: Any) -> Tensor:
        e1, e2 = batch[0], batch[1]
        h1, h2 = inner["late"](e1), inner["late"](e2)
        loss = -views_dr(h1, h2, eps2)
        if ssl_weight:
            loss = loss + ssl_weight * ntxent(inner["projector"](h1), inner["projector"](h2))
        if gamma:
            loss = loss - gamma * views_dr(outer["late"](e1), outer["late"](e2), eps2)
        return loss

    return outer_loss


def make_levels(late: nn.Module, projector: nn.Module) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    r"""``(inner, outer)`` modules: ``{"late": theta_L, "projector": g}`` and ``{"late": theta_U}`` (a copy)."""
    return nn.ModuleDict({"late": late, "projector": projector}), nn.ModuleDict({"late": copy.deepcopy(late)})


def build_problem(
    inner: nn.ModuleDict,
    outer: nn.ModuleDict,
    *,
    lam: float,
    damping: float,
    cg_steps: int,
    align_weight: float,
    align_tau: float,
    eps2: float,
    upper_ssl_weight: float,
    gamma: float = 0.0,
    first_order: bool = False,
    lower_lr: float = 0.02,
    upper_lr: float = 0.02,
    temperature: float = 0.5,
    clip_norm: float | None = 10.0,
) -> BilevelProblem:
    r"""The UMM :class:`hypergrad.BilevelProblem` (proximal coupling ``{"late": "late"}``).

    Both levels use SGD with momentum 0.9 over their trained parameters (``requires_grad``).
    ``first_order=True`` uses :class:`hypergrad.Identity` instead of ``CG(max_steps=cg_steps)``.

    Example:
        >>> late, proj = nn.Sequential(nn.Linear(4, 3), nn.Tanh()), nn.Linear(3, 2)
        >>> inner, outer = make_levels(late, proj)
        >>> p = build_problem(inner, outer, lam=1.0, damping=0.0, cg_steps=2, align_weight=1.0, align_tau=0.1,
        ...                   eps2=0.5, upper_ssl_weight=0.0)
        >>> e = torch.randn(5, 4)
        >>> rec = p.inner_step((e, e + 0.1)); rec = p.hypergradient((e, e - 0.1)); p.outer_step().outer_steps
        1
    """
    solver = Identity() if first_order else CG(max_steps=max(1, cg_steps))
    method = Proximal(lam=lam, damping=damping, coupling={"late": "late"}, solver=solver)
    lower_params = [p for p in inner.parameters() if p.requires_grad]
    upper_params = [p for p in outer.parameters() if p.requires_grad]
    return BilevelProblem(
        inner=Level(inner, torch.optim.SGD(lower_params, lr=lower_lr, momentum=0.9), max_grad_norm=clip_norm),
        outer=Level(outer, torch.optim.SGD(upper_params, lr=upper_lr, momentum=0.9), max_grad_norm=clip_norm),
        inner_loss=inner_loss_fn(align_weight, align_tau, temperature),
        outer_loss=outer_loss_fn(eps2, upper_ssl_weight, gamma, temperature),
        method=method,
    )
