"""Pretext losses of BiSSL: SimCLR's NT-Xent and BYOL's symmetric cosine loss with an EMA target.

References:
    Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020.
    Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hypergrad.distributed import world_size

from .distributed import all_gather_with_grad, rank

__all__ = ["EMA", "BYOLLoss", "NTXentLoss", "create_target"]


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must both have shape (batch, dim); got {tuple(a.shape)} and {tuple(b.shape)}."
        )


class NTXentLoss(nn.Module):
    r"""SimCLR's normalised temperature-scaled cross-entropy over the global batch.

    With :math:`\hat z = z / \|z\|` for the :math:`2N` embeddings of a global batch of :math:`N`
    images (two views each) and temperature :math:`\tau`, each embedding :math:`i` with positive
    partner :math:`p(i)` (its other view) contributes

    .. math::

        \ell_i = -\log \frac{\exp(\hat z_i^\top \hat z_{p(i)} / \tau)}
                          {\sum_{k \ne i} \exp(\hat z_i^\top \hat z_k / \tau)}

    and the loss is the mean of :math:`\ell_i`. Under torch.distributed (``gather=True``) every rank
    gathers all ranks' embeddings as negatives with :func:`~applications.bissl.distributed.all_gather_with_grad`
    and averages :math:`\ell_i` over its local :math:`2B` rows; the mean over ranks (what DDP's
    gradient averaging optimises) equals the single-process loss on the concatenated batch.

    Args:
        temperature: :math:`\tau > 0` (0.5 in BiSSL).
        gather: gather negatives over all ranks when a process group is initialised.

    Shapes:
        ``forward(z1, z2)``: ``z1``, ``z2`` of shape ``(B, D)``, row ``i`` of both from image ``i``;
        returns a scalar.

    Example:
        >>> loss = NTXentLoss(temperature=0.5)
        >>> z = torch.randn(4, 8)
        >>> bool(loss(z, z) < loss(z, torch.randn(4, 8)))
        True

    References:
        Chen et al., ICML 2020 (arXiv 2002.05709), Eq. (1).
    """

    def __init__(self, temperature: float = 0.5, gather: bool = True) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r} (BiSSL uses 0.5).")
        self.temperature = float(temperature)
        self.gather = bool(gather)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Mean NT-Xent of this rank's ``2B`` rows; ``z1``, ``z2``: ``(B, D)`` (any scale)."""
        _check_pair(z1, z2, ("z1", "z2"))
        b = z1.shape[0]
        z1 = F.normalize(z1, dim=1)
        z2 = F.normalize(z2, dim=1)
        if self.gather and world_size() > 1:
            w, r = world_size(), rank()
            keys = torch.cat([all_gather_with_grad(z1), all_gather_with_grad(z2)], dim=0)
        else:
            w, r = 1, 0
            keys = torch.cat([z1, z2], dim=0)
        queries = torch.cat([z1, z2], dim=0)  # (2B, D)
        logits = queries @ keys.T / self.temperature  # (2B, 2WB)
        local = torch.arange(b, device=z1.device) + r * b  # positions of this rank's rows in a gather
        self_idx = torch.cat([local, local + w * b])
        pos_idx = torch.cat([local + w * b, local])
        rows = torch.arange(2 * b, device=z1.device)
        logits = logits.masked_fill(
            torch.zeros_like(logits, dtype=torch.bool).index_put_((rows, self_idx), torch.tensor(True)),
            float("-inf"),
        )
        return F.cross_entropy(logits, pos_idx)


class BYOLLoss(nn.Module):
    r"""BYOL's symmetric loss :math:`2 - 2\cos` between online predictions and target projections.

    .. math::

        \mathcal L = \frac1B \sum_{i=1}^B \Big[(2 - 2\cos(p^{(1)}_i, t^{(2)}_i))
                     + (2 - 2\cos(p^{(2)}_i, t^{(1)}_i))\Big]

    where :math:`p^{(v)}` are the online network's predictions for view :math:`v` and
    :math:`t^{(v)}` the target network's projections (treated as constants).

    Shapes:
        ``forward(p1, p2, t1, t2)``: four ``(B, D)`` tensors; returns a scalar in ``[0, 8]``.

    Example:
        >>> p = torch.randn(4, 8)
        >>> abs(float(BYOLLoss()(p, p, p, p))) < 1e-6  # identical directions: zero loss
        True

    References:
        Grill et al., NeurIPS 2020 (arXiv 2006.07733), Eq. (2) and the symmetrised loss.
    """

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
        """Symmetric loss; ``p1``, ``p2`` online predictions, ``t1``, ``t2`` target projections, ``(B, D)``."""
        _check_pair(p1, t2, ("p1", "t2"))
        _check_pair(p2, t1, ("p2", "t1"))
        t1, t2 = t1.detach(), t2.detach()
        cos12 = F.cosine_similarity(p1, t2, dim=1)
        cos21 = F.cosine_similarity(p2, t1, dim=1)
        return (2 - 2 * cos12).mean() + (2 - 2 * cos21).mean()


def create_target(online: nn.Module) -> nn.Module:
    """A frozen copy of ``online`` to serve as a BYOL target network.

    Used at the start of pretraining and again when the BiSSL stage starts (BISSL.md: the target is
    re-created from the online network).

    Args:
        online: the online module (e.g. a ``Sequential(backbone, projector)``).

    Returns:
        A deep copy with ``requires_grad=False`` on every parameter, in the same train/eval mode.

    Example:
        >>> t = create_target(nn.Linear(2, 2))
        >>> any(p.requires_grad for p in t.parameters())
        False
    """
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@dataclass(frozen=True)
class EMA:
    r"""Exponential moving average update of a target network (BYOL), constant decay.

    .. math:: \xi \leftarrow \tau \xi + (1 - \tau) \theta

    for every parameter; buffers (BatchNorm running statistics) are copied from the online network.

    Args:
        decay: :math:`\tau \in [0, 1]` (0.9995 in BiSSL, no schedule).

    Example:
        >>> online, target = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
        >>> _ = online.weight.data.fill_(1.0); _ = target.weight.data.fill_(0.0)
        >>> EMA(decay=0.75)(target, online)
        >>> float(target.weight.detach())
        0.25
    """

    decay: float = 0.9995

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {self.decay!r} (BiSSL uses 0.9995).")

    @torch.no_grad()
    def __call__(self, target: nn.Module, online: nn.Module) -> None:
        t_params, o_params = list(target.parameters()), list(online.parameters())
        if len(t_params) != len(o_params):
            raise ValueError(
                f"target has {len(t_params)} parameters but online has {len(o_params)}; build the "
                "target with create_target(online)."
            )
        for tp, op in zip(t_params, o_params, strict=True):
            tp.lerp_(op.detach(), 1.0 - self.decay)
        for tb, ob in zip(target.buffers(), online.buffers(), strict=True):
            tb.copy_(ob)
