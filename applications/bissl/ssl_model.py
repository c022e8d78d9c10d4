"""The pretext network of the pretraining stage: backbone + projector (+ BYOL predictor and target).

:class:`SSLModel` returns the pretext loss from ``forward(x1, x2)``, so that it can be wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel` as is. Its ``backbone``/``projector``/
``predictor`` state dicts are what the pretraining checkpoint stores and what the BiSSL stage loads.
"""

from __future__ import annotations

import torch
from torch import nn

from .losses import EMA, BYOLLoss, NTXentLoss, create_target
from .models import Predictor, Projector, build_backbone

__all__ = ["PRETEXT_TYPES", "SSLModel", "build_ssl_model"]

PRETEXT_TYPES = ("simclr", "byol")


class SSLModel(nn.Module):
    r"""SimCLR or BYOL pretext model: ``forward(x1, x2)`` is the pretext loss :math:`L_P`.

    * SimCLR: :math:`z_v = g(f(x_v))`, loss :class:`~applications.bissl.losses.NTXentLoss` on
      :math:`(z_1, z_2)` with negatives gathered over all ranks.
    * BYOL: :math:`p_v = q(g(f(x_v)))` and target projections :math:`t_v = g_\xi(f_\xi(x_v))`
      (no gradient), loss :class:`~applications.bissl.losses.BYOLLoss`; call :meth:`update_target`
      after every optimiser step (EMA with constant decay).

    The two views go through the backbone in separate passes (BatchNorm statistics per view).

    Args:
        pretext_type: ``"simclr"`` or ``"byol"``.
        backbone: :math:`f`, images ``(B, C, H, W)`` -> features ``(B, D)``.
        projector: :math:`g`, ``(B, D) -> (B, K)``.
        predictor: :math:`q` (BYOL only), ``(B, K) -> (B, K)``.
        temperature: NT-Xent temperature (SimCLR).
        ema_decay: target decay (BYOL).

    Example:
        >>> model = build_ssl_model("byol", "resnet18", width=4, small_stem=True, in_channels=1,
        ...                         proj_dims=8, pred_hidden=8)
        >>> loss = model(torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8))
        >>> loss.shape, sorted(k.split(".")[0] for k in model.checkpoint_state())
        (torch.Size([]), ['backbone', 'predictor', 'projector', 'target'])
    """

    def __init__(
        self,
        pretext_type: str,
        backbone: nn.Module,
        projector: nn.Module,
        predictor: nn.Module | None = None,
        *,
        temperature: float = 0.5,
        ema_decay: float = 0.9995,
    ) -> None:
        super().__init__()
        if pretext_type not in PRETEXT_TYPES:
            raise ValueError(f"pretext_type must be one of {PRETEXT_TYPES}, got {pretext_type!r}.")
        if (pretext_type == "byol") != (predictor is not None):
            raise ValueError(f"pass a predictor for BYOL and none for SimCLR (pretext_type={pretext_type!r}).")
        self.pretext_type = pretext_type
        self.backbone, self.projector, self.predictor = backbone, projector, predictor
        if pretext_type == "simclr":
            self.loss_fn: nn.Module = NTXentLoss(temperature=temperature, gather=True)
            self.target: nn.Module | None = None
        else:
            self.loss_fn = BYOLLoss()
            self.target = create_target(self._online())
            self.ema = EMA(ema_decay)

    def _online(self) -> nn.ModuleList:
        return nn.ModuleList([self.backbone, self.projector])

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Pretext loss (scalar) of two views ``x1``, ``x2`` of shape ``(B, C, H, W)``."""
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        if self.predictor is None or self.target is None:
            return self.loss_fn(z1, z2)
        with torch.no_grad():
            t1 = self.target[1](self.target[0](x1))
            t2 = self.target[1](self.target[0](x2))
        return self.loss_fn(self.predictor(z1), self.predictor(z2), t1, t2)

    @torch.no_grad()
    def update_target(self) -> None:
        """BYOL: move the target towards the online backbone + projector (no-op for SimCLR)."""
        if self.target is not None:
            self.ema(self.target, self._online())

    def reset_target(self) -> None:
        """BYOL: re-create the target as a copy of the online network (no-op for SimCLR)."""
        if self.target is not None:
            self.target = create_target(self._online())

    def checkpoint_state(self) -> dict[str, dict[str, torch.Tensor] | None]:
        """State dicts of the parts, keyed ``backbone``, ``projector``, ``predictor``, ``target``."""

        def sd(m: nn.Module | None) -> dict[str, torch.Tensor] | None:
            return None if m is None else {k: v.detach().clone() for k, v in m.state_dict().items()}

        return {
            "backbone": sd(self.backbone),
            "projector": sd(self.projector),
            "predictor": sd(self.predictor),
            "target": sd(self.target),
        }


def build_ssl_model(
    pretext_type: str,
    arch: str = "resnet18",
    *,
    width: int = 64,
    small_stem: bool = False,
    in_channels: int = 3,
    proj_dims: int = 256,
    pred_hidden: int = 256,
    temperature: float = 0.5,
    ema_decay: float = 0.9995,
) -> SSLModel:
    """Build backbone, projector ``D-K-K-K`` and (BYOL) predictor ``K-H-H-K`` as in the paper.

    Args:
        pretext_type: ``"simclr"`` or ``"byol"``.
        arch, width, small_stem, in_channels: see :func:`~applications.bissl.models.build_backbone`.
        proj_dims: projector hidden/output width :math:`K` (paper: 256).
        pred_hidden: predictor hidden width :math:`H` (paper: 256).
        temperature: NT-Xent temperature (0.5).
        ema_decay: BYOL target decay (0.9995).

    Returns:
        The :class:`SSLModel`.

    Example:
        >>> build_ssl_model("simclr", width=4, small_stem=True, in_channels=1, proj_dims=8).predictor is None
        True
    """
    backbone, dim = build_backbone(arch, small_stem=small_stem, width=width, in_channels=in_channels)
    projector = Projector(dim, hidden=proj_dims, out=proj_dims)
    predictor = Predictor(proj_dims, hidden=pred_hidden) if pretext_type == "byol" else None
    return SSLModel(pretext_type, backbone, projector, predictor, temperature=temperature, ema_decay=ema_decay)
