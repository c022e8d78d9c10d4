"""Configuration of the UMM application: one dataclass and three presets.

* ``tiny``: seconds on a laptop core; what the tests run end to end (sklearn digits, 16 px).
* ``cpu``: the documented CPU run (Fashion-MNIST when installed, else digits), about 10 minutes
  on 2 cores for pretraining + diagnostic + the 4-method comparison over 5 seeds.
* ``gpu``: CIFAR-10 or an ImageNet-100 ``ImageFolder`` under ``--data-root``, a width-64
  ResNet-18, for one GPU (or several under torchrun).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["METHODS", "PRESETS", "UMMConfig", "fashion_mnist_available", "get_preset"]

#: The compared fine-tuning methods (see :mod:`applications.umm.finetune`).
METHODS = ("control", "umm", "umm_fo", "umm_align0")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def fashion_mnist_available(system_dir: str = FASHION_MNIST_DIR) -> bool:
    """Whether the Debian package ``dataset-fashion-mnist`` (or a copy of its files) is installed."""
    return os.path.isfile(os.path.join(system_dir, "train-images-idx3-ubyte.gz"))


@dataclass
class UMMConfig:
    r"""Every setting of pretraining, the diagnostic and the bilevel fine-tuning.

    Data:
        dataset: a :func:`applications.bissl.data.get_dataset` name (``digits``, ``fashion_mnist``,
            ``cifar10``, ``imagefolder``, ...). data_root: its root folder (``--data-root``).
        n_pretrain: images (the first of the train split) used for SSL pretraining and the lower
            level; a small pool trained for many epochs is what makes memorisation visible.
        n_heldout: further train-split images, never seen in pretraining, whose views feed the
            upper level (labels unused).
        n_probe_test: test-split images for probe/kNN accuracy and the class-partition
            :math:`\Delta R`; the probes train on the labelled ``n_pretrain`` images.
        test_split: the split evaluated (``"val"`` for an ImageNet-100 ``ImageFolder``).
        shuffle_subsets: draw the three sets from a seeded permutation instead of taking the
            first images (needed for class-sorted folders such as ``ImageFolder``).
    Model: arch, width, small_stem, in_channels, image_size, proj_dims (see
        :func:`applications.bissl.models.build_backbone`).
    Pretraining (SimCLR): epochs, batch_size, lr, weight_decay, optimizer (``adam`` or ``lars``),
        temperature, save_every (epochs between kept checkpoints).
    Diagnostic: eps2 (:math:`\epsilon^2` of the coding rate), knn_k, probe_steps (L-BFGS steps),
        probe_wd, dr_samples (rows per :math:`\Delta R` evaluation).
    Fine-tuning: num_early (frozen blocks among stem, layer1..layer4), alternations, lower_steps,
        upper_steps per alternation, lower_lr, upper_lr (SGD, momentum 0.9), lam (proximal
        :math:`\lambda`), damping, cg_steps, align_weight (:math:`\beta`), align_tau, upper_ssl_weight
        (:math:`\mu`), gamma (direct :math:`\Delta R(\theta_U)` term), ft_batch, seeds, methods.
    Runtime: view_bank (0: fresh views every epoch; k: a bank of k view pairs per image, see
        :class:`~applications.umm.data.ViewBank`), device, threads, num_workers, seed, run_dir.
    """

    dataset: str = "fashion_mnist"
    data_root: str = "data"
    n_pretrain: int = 2048
    n_heldout: int = 512
    n_probe_test: int = 1000
    test_split: str = "test"
    shuffle_subsets: bool = False
    arch: str = "resnet18"
    width: int = 8
    small_stem: bool = True
    in_channels: int = 1
    image_size: int = 16
    proj_dims: int = 64
    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    optimizer: str = "adam"
    temperature: float = 0.5
    save_every: int = 5
    eps2: float = 0.5
    knn_k: int = 20
    probe_steps: int = 100
    probe_wd: float = 1e-4
    dr_samples: int = 500
    num_early: int = 3
    alternations: int = 10
    lower_steps: int = 4
    upper_steps: int = 2
    lower_lr: float = 0.02
    upper_lr: float = 0.02
    lam: float = 1.0
    damping: float = 1.0
    cg_steps: int = 3
    align_weight: float = 1.0
    align_tau: float = 0.1
    upper_ssl_weight: float = 0.1
    gamma: float = 0.0
    ft_batch: int = 128
    seeds: int = 5
    methods: tuple[str, ...] = METHODS
    view_bank: int = 0
    device: str = "cpu"
    threads: int | None = None
    num_workers: int = 0
    seed: int = 0
    run_dir: str = "runs/umm"
    preset: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ints = ("n_pretrain", "n_heldout", "n_probe_test", "width", "image_size", "proj_dims", "epochs",
                "batch_size", "save_every", "knn_k", "probe_steps", "dr_samples", "alternations",
                "lower_steps", "upper_steps", "ft_batch", "seeds")  # fmt: skip
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"UMMConfig: `{name}` must be a positive int, got {v!r}.")
        for name in ("lr", "eps2", "lower_lr", "upper_lr", "lam", "align_tau", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"UMMConfig: `{name}` must be a number > 0, got {v!r}.")
        for name in ("weight_decay", "probe_wd", "damping", "align_weight", "upper_ssl_weight", "gamma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"UMMConfig: `{name}` must be a number >= 0, got {v!r}.")
        if not isinstance(self.view_bank, int) or self.view_bank < 0:
            raise ValueError(f"UMMConfig: `view_bank` must be an int >= 0, got {self.view_bank!r}.")
        if not isinstance(self.cg_steps, int) or self.cg_steps < 0:
            raise ValueError(f"UMMConfig: `cg_steps` must be an int >= 0, got {self.cg_steps!r}.")
        if not isinstance(self.num_early, int) or not 1 <= self.num_early <= 4:
            raise ValueError(
                f"UMMConfig: `num_early` must be 1..4 (frozen blocks among stem, layer1..layer4; the rest are "
                f"trained), got {self.num_early!r}."
            )
        if self.optimizer not in ("adam", "lars"):
            raise ValueError(f"UMMConfig: `optimizer` must be 'adam' or 'lars', got {self.optimizer!r}.")
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"UMMConfig: `methods` must be a non-empty subset of {METHODS}, got {self.methods!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field."""
        d = dataclasses.asdict(self)
        d["methods"] = list(self.methods)
        return d

    def model_dict(self) -> dict[str, Any]:
        """The fields that define the architecture (stored in every checkpoint and checked on load)."""
        keys = ("arch", "width", "small_stem", "in_channels", "image_size", "proj_dims")
        return {k: getattr(self, k) for k in keys}

    def replace(self, **changes: Any) -> UMMConfig:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)


def _tiny() -> UMMConfig:
    return UMMConfig(
        preset="tiny", dataset="digits", n_pretrain=64, n_heldout=32, n_probe_test=64, width=4, image_size=12,
        proj_dims=16, epochs=1, batch_size=32, save_every=1, probe_steps=10, dr_samples=64, alternations=1,
        lower_steps=2, upper_steps=1, cg_steps=1, ft_batch=16, seeds=2, knn_k=5, threads=1, view_bank=1,
    )  # fmt: skip


def _cpu() -> UMMConfig:
    fm = fashion_mnist_available()
    return UMMConfig(
        preset="cpu", dataset="fashion_mnist" if fm else "digits", n_pretrain=512, n_heldout=256,
        n_probe_test=1000 if fm else 359, width=8, image_size=16, proj_dims=64, epochs=30, batch_size=128,
        save_every=5, alternations=4, lower_steps=3, upper_steps=1, cg_steps=2, ft_batch=64, seeds=5, threads=1,
        view_bank=4,
    )  # fmt: skip


def _gpu() -> UMMConfig:
    return UMMConfig(
        preset="gpu", dataset="cifar10", n_pretrain=10000, n_heldout=5000, n_probe_test=10000, width=64,
        in_channels=3, image_size=32, proj_dims=256, epochs=400, batch_size=512, lr=2e-3, save_every=25,
        dr_samples=2000, alternations=200, lower_steps=10, upper_steps=4, cg_steps=5, ft_batch=256, seeds=5,
        device="cuda", num_workers=8, shuffle_subsets=True,
    )  # fmt: skip


PRESETS = {"tiny": _tiny, "cpu": _cpu, "gpu": _gpu}


def get_preset(name: str) -> UMMConfig:
    """The named preset (``tiny``, ``cpu``, ``gpu``).

    Example:
        >>> get_preset("tiny").dataset
        'digits'
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]()
