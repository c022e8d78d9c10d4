"""Two-view augmentation: the paper's recipe per view, shapes, grayscale handling, seeded determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from applications.bissl.augment import TwoViewAugment, eval_transform, normalize_stats, train_transform
from applications.bissl.data import TwoViewDataset


def _rgb(size=(40, 30), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def _gray(size=28, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L")


def _ops(compose: v2.Compose) -> list[v2.Transform]:
    return list(compose.transforms)


def _random_apply_p(compose: v2.Compose, inner: type) -> float | None:
    for op in _ops(compose):
        if isinstance(op, v2.RandomApply) and isinstance(op.transforms[0], inner):
            return op.p
    return None


def test_rgb_views_follow_the_paper_recipe() -> None:
    aug = TwoViewAugment(96, channels=3)
    for view in (aug.view1, aug.view2):
        crop = next(op for op in _ops(view) if isinstance(op, v2.RandomResizedCrop))
        assert crop.size == (96, 96) and crop.scale == (0.08, 1.0)
        assert any(isinstance(op, v2.RandomHorizontalFlip) and op.p == 0.5 for op in _ops(view))
        assert _random_apply_p(view, v2.ColorJitter) == 0.8
        jitter = next(
            op.transforms[0]
            for op in _ops(view)
            if isinstance(op, v2.RandomApply) and isinstance(op.transforms[0], v2.ColorJitter)
        )
        assert jitter.brightness == (0.6, 1.4) and jitter.contrast == (0.6, 1.4)
        assert jitter.saturation == (0.8, 1.2) and jitter.hue == (-0.1, 0.1)
        assert any(isinstance(op, v2.RandomGrayscale) and op.p == 0.2 for op in _ops(view))
    assert _random_apply_p(aug.view1, v2.GaussianBlur) == 1.0
    assert _random_apply_p(aug.view2, v2.GaussianBlur) == 0.1
    assert not any(isinstance(op, v2.RandomSolarize) for op in _ops(aug.view1))
    solarize = [op for op in _ops(aug.view2) if isinstance(op, v2.RandomSolarize)]
    assert len(solarize) == 1 and solarize[0].p == 0.2


def test_grayscale_views_drop_colour_only_ops() -> None:
    aug = TwoViewAugment(24, channels=1)
    jitter = next(
        op.transforms[0]
        for op in _ops(aug.view1)
        if isinstance(op, v2.RandomApply) and isinstance(op.transforms[0], v2.ColorJitter)
    )
    assert jitter.saturation is None and jitter.hue is None and jitter.brightness == (0.6, 1.4)
    assert not any(isinstance(op, v2.RandomGrayscale) for op in _ops(aug.view1))
    assert _random_apply_p(aug.view1, v2.GaussianBlur) == 1.0


@pytest.mark.parametrize(("channels", "image"), [(3, _rgb()), (1, _gray()), (1, _rgb()), (3, _gray())])
def test_view_shapes_and_dtype(channels: int, image: Image.Image) -> None:
    v1, v2_ = TwoViewAugment(16, channels=channels)(image)
    for v in (v1, v2_):
        assert v.shape == (channels, 16, 16) and v.dtype == torch.float32
        assert torch.isfinite(v).all()
    if channels == 3 and image.mode == "L":
        e = eval_transform(16, 3)(image)  # grayscale promoted to 3 equal channels (before normalising)
        mean, std = normalize_stats(3)
        raw = e * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
        torch.testing.assert_close(raw[0], raw[1], atol=1e-5, rtol=0)


def test_views_are_deterministic_under_a_seed_and_differ_between_views() -> None:
    aug = TwoViewAugment(16, channels=3)
    img = _rgb()
    torch.manual_seed(3)
    a1, a2 = aug(img)
    torch.manual_seed(3)
    b1, b2 = aug(img)
    torch.manual_seed(4)
    c1, _ = aug(img)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2) and not torch.equal(a1, c1)


def test_eval_transform_resizes_by_109_over_96_then_centre_crops() -> None:
    img = _rgb((200, 150))
    out = eval_transform(96, 3)(img)
    assert out.shape == (3, 96, 96)
    # same pixels as an explicit resize of the short side to 109 and a centre crop of 96
    ref = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(109, antialias=True),
            v2.CenterCrop(96),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(*normalize_stats(3)),
        ]
    )(img)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(eval_transform(96, 3)(img), out)  # deterministic
    assert eval_transform(28, 1)(_gray(40)).shape == (1, 28, 28)


def test_train_transform_shape_and_randomness() -> None:
    t = train_transform(20, 1)
    torch.manual_seed(0)
    a = t(_gray())
    torch.manual_seed(1)
    b = t(_gray())
    assert a.shape == (1, 20, 20) and not torch.equal(a, b)


def test_two_view_dataset_seeds_each_item_and_epoch() -> None:
    items = [(_gray(seed=i), i) for i in range(3)]
    ds = TwoViewDataset(items, TwoViewAugment(12, channels=1), seed=7)
    first = ds[1]
    torch.manual_seed(123)  # the global generator state does not matter
    again = ds[1]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], first[0])
    ds.set_epoch(0)
    assert torch.equal(ds[1][0], first[0])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: TwoViewAugment(16, channels=2), "channels must be 1"),
        (lambda: TwoViewAugment(2), "image_size"),
        (lambda: TwoViewAugment(16, crop_scale=(0.5, 0.2)), "crop_scale"),
        (lambda: eval_transform(16, 4), "channels"),
    ],
)
def test_augment_errors(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_two_view_batches_do_not_depend_on_the_number_of_workers() -> None:
    from torch.utils.data import DataLoader

    items = [(_gray(seed=i), i) for i in range(6)]
    ds = TwoViewDataset(items, TwoViewAugment(12, channels=1), seed=1)
    ds.set_epoch(2)
    order = [4, 0, 5, 1, 3, 2]
    serial = list(DataLoader(ds, batch_size=3, sampler=order, num_workers=0))
    parallel = list(DataLoader(ds, batch_size=3, sampler=order, num_workers=2))
    for (a1, a2), (b1, b2) in zip(serial, parallel, strict=True):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
