r"""The backbone seen as blocks: taps for the diagnostic, an early/late split for fine-tuning.

The BiSSL application's torchvision ResNet (:func:`applications.bissl.models.build_backbone`) and
SSL projector are reused as they are. UMM looks at them as a chain of blocks

.. math::

    x \xrightarrow{\text{stem}} \xrightarrow{\text{layer1}} \xrightarrow{\text{layer2}}
      \xrightarrow{\text{layer3}} \xrightarrow{\text{layer4}} \xrightarrow{\text{pool}} h
      \xrightarrow{\text{projector}} z

(stem = conv1, bn1, relu, maxpool). A *tap* is the globally average-pooled output of a block
(``stem``, ``layer1`` ... ``layer4``) or the projector output. ``num_early`` blocks form the frozen
prior :math:`f_E`; the rest, with the pooling, form the trained late part :math:`f_L`, so
:math:`h = f_L(f_E(x))`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from applications.bissl.checkpoints import read_checkpoint
from applications.bissl.models import Projector, build_backbone

from .config import UMMConfig

__all__ = ["BLOCKS", "TAPS", "build_model", "load_pretrained", "split_backbone", "tap_features"]

#: Backbone blocks in order (``num_early`` counts from the stem).
BLOCKS = ("stem", "layer1", "layer2", "layer3", "layer4")
#: Diagnostic taps: every block plus the projector.
TAPS = (*BLOCKS, "projector")


def build_model(cfg: UMMConfig) -> tuple[nn.Module, nn.Module]:
    """``(backbone, projector)`` as configured (SimCLR projector ``D-K-K-K``, BiSSL's layout).

    Example:
        >>> from applications.umm.config import get_preset
        >>> backbone, projector = build_model(get_preset("tiny"))
        >>> projector(backbone(torch.zeros(2, 1, 12, 12))).shape
        torch.Size([2, 16])
    """
    backbone, dim = build_backbone(cfg.arch, small_stem=cfg.small_stem, width=cfg.width, in_channels=cfg.in_channels)
    return backbone, Projector(dim, hidden=cfg.proj_dims, out=cfg.proj_dims)


def _stem(backbone: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(conv1=backbone.conv1, bn1=backbone.bn1, relu=backbone.relu, maxpool=backbone.maxpool)
    )


def split_backbone(backbone: nn.Module, num_early: int) -> tuple[nn.Sequential, nn.Sequential]:
    """Split a ResNet backbone into ``(early, late)`` modules sharing its parameters.

    Args:
        backbone: a torchvision-style ResNet (``conv1, bn1, relu, maxpool, layer1..layer4``).
        num_early: blocks in the early part, 1..4 (1 = the stem only; 3 = stem, layer1, layer2).

    Returns:
        ``early`` maps images to the feature map after block ``num_early``; ``late`` maps that
        map to the pooled feature vector :math:`h` (the backbone's output). Parameter names are
        ``early.<block>...`` / ``late.<block>...``; the modules are shared with ``backbone``, so
        training them trains it.

    Example:
        >>> from applications.umm.config import get_preset
        >>> b, _ = build_model(get_preset("tiny"))
        >>> early, late = split_backbone(b, 3)
        >>> x = torch.randn(2, 1, 12, 12)
        >>> _ = b.eval()
        >>> bool(torch.allclose(late(early(x)), b(x)))
        True
    """
    if not isinstance(num_early, int) or not 1 <= num_early <= 4:
        raise ValueError(f"`num_early` must be 1..4 (blocks among {BLOCKS} kept frozen), got {num_early!r}.")
    parts: list[tuple[str, nn.Module]] = [("stem", _stem(backbone))]
    parts += [(f"layer{i}", getattr(backbone, f"layer{i}")) for i in range(1, 5)]
    early = nn.Sequential(OrderedDict(parts[:num_early]))
    late = nn.Sequential(OrderedDict(parts[num_early:] + [("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten())]))
    return early, late


def tap_features(backbone: nn.Module, projector: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Pooled output of every tap (:data:`TAPS`) for images ``x``; no gradient, modules as they are.

    Example:
        >>> from applications.umm.config import get_preset
        >>> b, p = build_model(get_preset("tiny"))
        >>> {k: v.shape[1] for k, v in tap_features(b.eval(), p.eval(), torch.zeros(2, 1, 12, 12)).items()}
        {'stem': 4, 'layer1': 4, 'layer2': 8, 'layer3': 16, 'layer4': 32, 'projector': 16}
    """
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        h = _stem(backbone)(x)
        out["stem"] = h.mean(dim=(2, 3))
        for i in range(1, 5):
            h = getattr(backbone, f"layer{i}")(h)
            out[f"layer{i}"] = h.mean(dim=(2, 3))
        out["projector"] = projector(out["layer4"])
    return out


def _saved_model_dict(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    if isinstance(ckpt.get("model"), dict) and "arch" in ckpt["model"]:
        return ckpt["model"]
    cfg = ckpt.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):  # a BiSSL `pretrain` checkpoint
        return cfg["model"]
    return None


def load_pretrained(path: str, cfg: UMMConfig, device: str | torch.device = "cpu") -> tuple[nn.Module, nn.Module, dict]:
    """Build the configured model and load a pretraining checkpoint into it.

    Accepts this application's checkpoints (``applications.umm pretrain``) and the BiSSL
    ``pretrain`` stage's ``pretrained.pt`` (SimCLR), both dicts with ``backbone`` and
    ``projector`` state dicts.

    Args:
        path: the checkpoint file (the ``checkpoint`` argument of the CLI).
        cfg: the configuration whose architecture the checkpoint must have.
        device: where to put the modules.

    Returns:
        ``(backbone, projector, checkpoint_dict)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not such a checkpoint, fails its checksums (corrupted or edited after
            saving), or was written for another architecture
            (the message lists the differing fields or the first mismatching tensors).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"`checkpoint` {path!r} does not exist; run `python -m applications.umm pretrain` first."
        )
    # hypergrad.load_checkpoint underneath: every tensor's checksum is verified, so a corrupted or
    # edited-after-saving file is refused (ValueError naming the checksum) instead of loaded quietly.
    ckpt = read_checkpoint(path, "`checkpoint`", "Pass a file written by `pretrain`.")
    if (
        not isinstance(ckpt, dict)
        or not isinstance(ckpt.get("backbone"), dict)
        or not isinstance(ckpt.get("projector"), dict)
    ):
        raise ValueError(
            f"`checkpoint` {path!r} holds no 'backbone' and 'projector' state dicts; is it a pretraining checkpoint?"
        )
    saved = _saved_model_dict(ckpt)
    want = cfg.model_dict()
    if saved is not None:
        diff = [f"{k}: {saved[k]!r} (file) vs {want[k]!r} (config)" for k in want if k in saved and saved[k] != want[k]]
        if diff:
            raise ValueError(
                f"`checkpoint` {path!r} was written for another architecture ({'; '.join(diff)}); pass the same "
                "--arch/--width/--image-size/... (or the preset) it was trained with."
            )
    backbone, projector = build_model(cfg)
    for name, module in (("backbone", backbone), ("projector", projector)):
        try:
            module.load_state_dict(ckpt[name])
        except RuntimeError as err:
            first = str(err).splitlines()[1:3]
            raise ValueError(
                f"`checkpoint` {path!r}: its {name} does not fit the configured architecture "
                f"({cfg.arch}, width {cfg.width}, proj_dims {cfg.proj_dims}): {' '.join(first).strip()}"
            ) from None
    return backbone.to(device), projector.to(device), ckpt
