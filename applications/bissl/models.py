"""Backbones and heads of BiSSL: torchvision ResNets, the SSL projector/predictor, the linear head.

The paper uses a torchvision ResNet-50 with ``fc`` removed (2048-d features), a projector MLP
2048-256-256-256 with BatchNorm + ReLU on the hidden layers and no bias on the last linear, and (for
BYOL) a predictor MLP 256-256-256-256. For CPU runs :func:`build_backbone` can shrink the base width
of the very same torchvision ResNet class, and swap the ImageNet stem (7x7 stride-2 conv + max-pool)
for a 3x3 stride-1 conv without pooling, which suits 28-96 px images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch  # noqa: F401  (the doctests below use it)
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["ARCHS", "MLP", "LinearHead", "Predictor", "Projector", "WidthResNet", "build_backbone", "count_parameters"]

#: Supported backbone names -> (block type, blocks per stage).
ARCHS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class WidthResNet(ResNet):
    r"""torchvision :class:`~torchvision.models.ResNet` with a configurable base width and stem.

    The stage widths are :math:`(w, 2w, 4w, 8w)` instead of :math:`(64, 128, 256, 512)`; with
    ``width=64``, ``small_stem=False`` and ``in_channels=3`` the module has exactly the layers and
    parameter shapes of ``torchvision.models.resnet18/50(weights=None)``. ``fc`` is an
    :class:`~torch.nn.Identity`, so the output is the pooled feature vector of size
    :math:`8 w \cdot \text{expansion}`.

    Args:
        block: :class:`~torchvision.models.resnet.BasicBlock` or ``Bottleneck``.
        layers: number of blocks in each of the four stages.
        width: base width :math:`w` (channels of the stem and the first stage).
        small_stem: use a 3x3 stride-1 stem convolution and no max-pool (small images).
        in_channels: channels of the input images.

    Example:
        >>> net = WidthResNet(BasicBlock, [1, 1, 1, 1], width=8, small_stem=True, in_channels=1)
        >>> net(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        *,
        width: int = 64,
        small_stem: bool = False,
        in_channels: int = 3,
    ) -> None:
        # Read by ``_make_layer`` during ``ResNet.__init__``; a plain int may be set before it.
        self._base = int(width)
        super().__init__(block, layers)
        if small_stem:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = self._norm_layer(width)
        self.fc = nn.Identity()
        self.feature_dim = 8 * width * block.expansion

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        if planes == 64:  # first stage: its input is the (re-sized) stem
            self.inplanes = self._base
        return super()._make_layer(block, planes * self._base // 64, blocks, stride, dilate)


def build_backbone(
    arch: str = "resnet18", *, small_stem: bool = False, width: int = 64, in_channels: int = 3
) -> tuple[nn.Module, int]:
    r"""Build a torchvision ResNet backbone with ``fc`` removed.

    Args:
        arch: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"`` (the paper uses ResNet-50).
        small_stem: 3x3 stride-1 stem conv and no max-pool, for small images (e.g. 28-32 px).
        width: base width (64 is torchvision's; 8-32 gives a tiny ResNet for CPU runs).
        in_channels: channels of the input images (1 for grayscale data).

    Returns:
        ``(backbone, feature_dim)``: the module maps images ``(B, in_channels, H, W)`` to features
        ``(B, feature_dim)``; ``feature_dim`` is 512 for ResNet-18 and 2048 for ResNet-50 at
        width 64.

    Example:
        >>> net, dim = build_backbone("resnet18", width=8, small_stem=True, in_channels=1)
        >>> dim, net(torch.zeros(2, 1, 16, 16)).shape
        (64, torch.Size([2, 64]))
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}.")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int (64 is torchvision's ResNet), got {width!r}.")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels!r}.")
    block, layers = ARCHS[arch]
    net = WidthResNet(block, layers, width=width, small_stem=small_stem, in_channels=in_channels)
    return net, net.feature_dim


class MLP(nn.Sequential):
    r"""Linear layers with BatchNorm + ReLU between them: ``dims[0] -> ... -> dims[-1]``.

    Hidden layers are ``Linear -> BatchNorm1d -> ReLU``; the last layer is a plain linear map,
    without bias when ``last_bias=False`` (the BiSSL projector).

    Args:
        dims: layer sizes, at least two.
        last_bias: whether the last linear layer has a bias.

    Example:
        >>> MLP([4, 8, 3], last_bias=False)(torch.zeros(5, 4)).shape
        torch.Size([5, 3])
    """

    def __init__(self, dims: Sequence[int], *, last_bias: bool = False) -> None:
        dims = [int(d) for d in dims]
        if len(dims) < 2 or min(dims) < 1:
            raise ValueError(f"dims must hold at least two positive sizes, got {dims!r}.")
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-2], dims[1:-1], strict=True):
            layers += [nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
        super().__init__(*layers)


class Projector(MLP):
    r"""SSL projector: ``in_dim -> hidden -> ... -> out`` with ``layers`` linear maps.

    The paper's projector is 2048-256-256-256 (``hidden=256, out=256, layers=3``), BN + ReLU on the
    hidden layers and no bias on the last linear.

    Args:
        in_dim: backbone feature size.
        hidden: hidden width.
        out: output (embedding) size.
        layers: number of linear layers (>= 1).

    Example:
        >>> Projector(32, hidden=16, out=8)(torch.randn(4, 32)).shape
        torch.Size([4, 8])
    """

    def __init__(self, in_dim: int, hidden: int = 256, out: int = 256, layers: int = 3) -> None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers!r}.")
        super().__init__([in_dim] + [hidden] * (layers - 1) + [out], last_bias=False)
        self.out_dim = out


class Predictor(MLP):
    r"""BYOL predictor: ``dim -> hidden -> ... -> dim`` (256-256-256-256 in the paper).

    Same layer pattern as :class:`Projector` (BN + ReLU on hidden layers, no bias on the last linear).

    Args:
        dim: projection size (input and output).
        hidden: hidden width.
        layers: number of linear layers.

    Example:
        >>> Predictor(8, hidden=16)(torch.randn(4, 8)).shape
        torch.Size([4, 8])
    """

    def __init__(self, dim: int = 256, hidden: int = 256, layers: int = 3) -> None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers!r}.")
        super().__init__([dim] + [hidden] * (layers - 1) + [dim], last_bias=False)


class LinearHead(nn.Linear):
    r"""Downstream classification head :math:`\phi`: logits :math:`= W h + b`.

    Args:
        in_dim: backbone feature size.
        num_classes: number of classes (or labels, for multi-label VOC07).

    Example:
        >>> LinearHead(64, 10)(torch.zeros(3, 64)).shape
        torch.Size([3, 10])
    """

    def __init__(self, in_dim: int, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}.")
        super().__init__(in_dim, num_classes)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``.

    Example:
        >>> count_parameters(LinearHead(4, 2))
        10
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
