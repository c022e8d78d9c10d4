"""Image transforms of BiSSL (torchvision ``transforms.v2``): two-view SSL views, train and eval.

The two pretext views follow the VICReg-style recipe of the BiSSL paper:

============================  ==========  ==========
operation                     view 1      view 2
============================  ==========  ==========
random resized crop + flip    yes         yes
colour jitter .4/.4/.2/.1     p = 0.8     p = 0.8
grayscale                     p = 0.2     p = 0.2
Gaussian blur                 p = 1.0     p = 0.1
solarize                      never       p = 0.2
============================  ==========  ==========

**Grayscale data** (``channels=1``): saturation and hue have no meaning for one channel (torchvision
leaves such images unchanged) and random grayscale is the identity, so the 1-channel pipeline keeps
brightness/contrast jitter (p = 0.8), crop, flip, blur and solarize, and drops the rest. Any input
image is first converted to the requested channel count (``RGB`` or ``Grayscale``), so mixed-mode
datasets (e.g. Caltech101 with some grayscale images) yield uniform tensors.

All randomness comes from torch's global generator: seeding it makes the views reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

__all__ = ["TwoViewAugment", "eval_transform", "normalize_stats", "train_transform"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Default per-channel (mean, std) for normalisation: ImageNet's for RGB, (0.5, 0.5) for gray.

    Example:
        >>> normalize_stats(1)
        ((0.5,), (0.5,))
    """
    _check_channels(channels)
    return (_IMAGENET_MEAN, _IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}.")


def _check_size_and_channels(image_size: int, channels: int) -> None:
    if not isinstance(image_size, int) or image_size < 4:
        raise ValueError(f"image_size must be an int >= 4 (pixels), got {image_size!r}.")
    _check_channels(channels)


def _to_channels(channels: int) -> v2.Transform:
    return v2.RGB() if channels == 3 else v2.Grayscale(num_output_channels=1)


def _finish(channels: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> list[v2.Transform]:
    d_mean, d_std = normalize_stats(channels)
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean or d_mean), std=list(std or d_std)),
    ]


def _crop_flip(image_size: int, channels: int, crop_scale: tuple[float, float]) -> list[v2.Transform]:
    """To a uint8 image of ``channels`` channels, random resized crop, horizontal flip (p = 0.5)."""
    return [
        v2.ToImage(),
        _to_channels(channels),
        v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
    ]


def _blur_kernel(image_size: int) -> int:
    """Odd kernel of about 10% of the image side (23 px at 224), at least 3."""
    k = max(3, int(round(0.1 * image_size)))
    return k if k % 2 == 1 else k + 1


def _ssl_view(
    image_size: int,
    channels: int,
    blur_p: float,
    solarize_p: float,
    crop_scale: tuple[float, float],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> v2.Compose:
    ops = _crop_flip(image_size, channels, crop_scale)
    if channels == 3:
        ops.append(v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8))
        ops.append(v2.RandomGrayscale(p=0.2))
    else:
        ops.append(v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8))
    if blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(_blur_kernel(image_size), sigma=(0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=solarize_p))  # uint8 images: threshold 128
    return v2.Compose(ops + _finish(channels, mean, std))


class TwoViewAugment:
    r"""Two random views of one image for SimCLR/BYOL pretraining (the table in the module doc).

    Args:
        image_size: output side in pixels (96 in the paper).
        channels: 1 (grayscale data) or 3 (RGB).
        crop_scale: area range of the random resized crop (paper/VICReg: (0.08, 1.0)).
        mean, std: normalisation statistics (default: :func:`normalize_stats`).

    Returns:
        Called on a PIL image or a ``(C, H, W)`` uint8 tensor, returns ``(view1, view2)``, each a
        float tensor of shape ``(channels, image_size, image_size)``.

    Example:
        >>> from PIL import Image
        >>> aug = TwoViewAugment(16, channels=1)
        >>> v1, v2_ = aug(Image.new("L", (28, 28)))
        >>> v1.shape, v2_.shape
        (torch.Size([1, 16, 16]), torch.Size([1, 16, 16]))
    """

    def __init__(
        self,
        image_size: int,
        channels: int = 3,
        *,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        _check_size_and_channels(image_size, channels)
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale!r}.")
        self.image_size, self.channels = image_size, channels
        self.view1 = _ssl_view(image_size, channels, 1.0, 0.0, crop_scale, mean, std)
        self.view2 = _ssl_view(image_size, channels, 0.1, 0.2, crop_scale, mean, std)

    def __call__(self, image: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independently augmented views ``(C, S, S)`` of ``image`` (PIL or uint8 tensor)."""
        return self.view1(image), self.view2(image)

    def __repr__(self) -> str:
        return f"TwoViewAugment(image_size={self.image_size}, channels={self.channels})"


def eval_transform(
    image_size: int,
    channels: int = 3,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    r"""Test-time transform: resize to :math:`\mathrm{round}(s \cdot 109/96)`, centre-crop :math:`s`.

    The paper resizes to 109 and centre-crops 96; the same ratio is kept at other sizes.

    Args:
        image_size: output side :math:`s`.
        channels: 1 or 3.
        mean, std: normalisation statistics (default: :func:`normalize_stats`).

    Returns:
        A transform mapping an image to a ``(channels, s, s)`` float tensor.

    Example:
        >>> from PIL import Image
        >>> eval_transform(32, 3)(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """
    _check_size_and_channels(image_size, channels)
    resize = int(round(image_size * 109 / 96))
    ops = [v2.ToImage(), _to_channels(channels), v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(ops + _finish(channels, mean, std))


def train_transform(
    image_size: int,
    channels: int = 3,
    *,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    """Downstream training transform (head warm-up, BiSSL upper level, fine-tuning).

    Random resized crop + horizontal flip, then normalisation.

    Args:
        image_size: output side.
        channels: 1 or 3.
        crop_scale: area range of the random resized crop.
        mean, std: normalisation statistics (default: :func:`normalize_stats`).

    Returns:
        A transform mapping an image to a ``(channels, image_size, image_size)`` float tensor.

    Example:
        >>> from PIL import Image
        >>> train_transform(24, 1)(Image.new("L", (28, 28))).shape
        torch.Size([1, 24, 24])
    """
    _check_size_and_channels(image_size, channels)
    return v2.Compose(_crop_flip(image_size, channels, crop_scale) + _finish(channels, mean, std))
