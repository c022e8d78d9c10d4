"""Backbones are real torchvision ResNets; projector/predictor/head have the paper's layout."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from applications.bissl.models import LinearHead, Predictor, Projector, build_backbone, count_parameters
from applications.bissl.ssl_model import build_ssl_model


def _shapes(module: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    ("arch", "factory", "dim"),
    [("resnet18", torchvision.models.resnet18, 512), ("resnet50", torchvision.models.resnet50, 2048)],
)
def test_width_64_is_torchvision_resnet_without_fc(arch, factory, dim) -> None:
    net, feature_dim = build_backbone(arch)
    reference = factory(weights=None)
    reference.fc = nn.Identity()
    assert feature_dim == dim
    assert isinstance(net, torchvision.models.ResNet)
    assert _shapes(net) == _shapes(reference)
    assert isinstance(net.maxpool, nn.MaxPool2d) and net.conv1.kernel_size == (7, 7)


def test_small_width_small_stem_grayscale() -> None:
    net, dim = build_backbone("resnet18", width=16, small_stem=True, in_channels=1)
    assert dim == 128
    assert net.conv1.in_channels == 1 and net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    assert [
        net.layer1[0].conv1.out_channels,
        net.layer2[0].conv1.out_channels,
        net.layer3[0].conv1.out_channels,
        net.layer4[0].conv1.out_channels,
    ] == [16, 32, 64, 128]
    assert all(isinstance(b, BasicBlock) for layer in (net.layer1, net.layer4) for b in layer)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 1 + 4 * 2 * 2 + 3
    x = torch.randn(2, 1, 28, 28)
    net.eval()
    out = net(x)
    assert out.shape == (2, 128)
    # small stem keeps full resolution into layer1 (28 -> 28), the ImageNet stem divides by 4
    feats = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    assert feats.shape[-1] == 28


def test_tiny_resnet50_uses_bottlenecks() -> None:
    net, dim = build_backbone("resnet50", width=8, small_stem=True)
    assert dim == 8 * 8 * 4
    assert isinstance(net.layer3[0], Bottleneck)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, dim)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "vgg11"}, "arch must be one of"),
        ({"width": 0}, "width must be a positive int"),
        ({"in_channels": 4}, "in_channels must be 1"),
    ],
)
def test_backbone_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_backbone(**kwargs)


def test_projector_layout_matches_paper() -> None:
    proj = Projector(2048, hidden=256, out=256, layers=3)
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 256), (256, 256), (256, 256)]
    assert linears[-1].bias is None and all(m.bias is not None for m in linears[:-1])
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert proj(torch.randn(4, 2048)).shape == (4, 256)


def test_predictor_and_head() -> None:
    pred = Predictor(256, hidden=256)
    dims = [(m.in_features, m.out_features) for m in pred if isinstance(m, nn.Linear)]
    assert dims == [(256, 256)] * 3
    head = LinearHead(512, 37)
    assert head(torch.randn(3, 512)).shape == (3, 37)
    assert count_parameters(head) == 512 * 37 + 37
    with pytest.raises(ValueError, match="num_classes"):
        LinearHead(4, 0)
    with pytest.raises(ValueError, match="layers"):
        Projector(4, layers=0)


def test_ssl_model_parts_and_target() -> None:
    simclr = build_ssl_model("simclr", width=4, small_stem=True, in_channels=1, proj_dims=8)
    assert simclr.predictor is None and simclr.target is None
    byol = build_ssl_model("byol", width=4, small_stem=True, in_channels=1, proj_dims=8, pred_hidden=6)
    trainable = {n.split(".")[0] for n, p in byol.named_parameters() if p.requires_grad}
    assert trainable == {"backbone", "projector", "predictor"}
    assert all(not p.requires_grad for p in byol.target.parameters())
    x1, x2 = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    byol(x1, x2).backward()
    assert all(p.grad is None for p in byol.target.parameters())
    with pytest.raises(ValueError, match="pretext_type"):
        build_ssl_model("moco")
