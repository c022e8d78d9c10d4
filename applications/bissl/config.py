r"""Configuration of the BiSSL pipeline: one dataclass per stage, and named presets.

Settings live on the stage that uses them (solver *objects*, not ``cg_*`` strings):

* :class:`ModelConfig` - backbone, projector and predictor sizes.
* :class:`PretrainConfig` - the self-supervised pretext stage (SimCLR / BYOL, LARS).
* :class:`BiSSLConfig` - the bilevel stage: head warm-up, alternations of ``lower_steps`` lower and
  ``upper_steps`` upper steps, :math:`\gamma`, and the implicit-gradient method it runs: a
  :class:`hypergrad.Proximal` holding :math:`\lambda`, damping, the linear solver and the HVP settings
  (:func:`paper_method`).
* :class:`FinetuneConfig` - the evaluation protocol: random-search HPO then seeded runs.
* :class:`PipelineConfig` - all of the above plus the data sets, directories and device.

Presets (:func:`get_preset`):

* ``paper`` - the authors' protocol (ResNet-50, 96 px, batch 1024/256, 500 epochs, 500 alternations,
  100 HPO trials, 10 runs, per-data-set upper lr/wd); needs GPUs and the data sets on disk.
* ``mini`` - the small replication protocol on CPU: pretext on Fashion-MNIST (train split, labels
  unused); three arms from the same checkpoint (baseline, compute-matched control, BiSSL); three
  downstream tasks that differ from the pretext data - digits with 30 labels per class, the same
  inverted, and inverted Fashion-MNIST with 20 labels per class; 10 paired seeds.
* ``demo`` - the end-to-end job on offline data, a transfer experiment on every machine: pretext
  on Fashion-MNIST when its files are installed (``bash run.sh demo`` installs them where it can),
  otherwise on patches of scikit-learn's sample photographs; downstream sklearn digits. A few
  minutes on 2 CPU cores.
* ``tiny`` - seconds; used by the tests.

Example:
    >>> cfg = get_preset("paper")
    >>> cfg.bissl.method.solver
    CG(max_steps=5, rtol=0.0, atol=0.0)
    >>> cfg.bissl.method.lam, cfg.bissl.method.damping
    (0.001, 10.0)
    >>> upper_hparams("pets", "simclr")
    (0.03, 0.001)
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from hypergrad import CG, Proximal

__all__ = [
    "ModelConfig",
    "PretrainConfig",
    "BiSSLConfig",
    "COUPLING",
    "paper_method",
    "method_dict",
    "FinetuneConfig",
    "PipelineConfig",
    "PRESETS",
    "PAPER_DOWNSTREAM",
    "UPPER_HPARAMS",
    "upper_hparams",
    "get_preset",
    "fashion_mnist_available",
]

# Per-data-set upper-level (lr, wd) of the authors: {dataset: {pretext_type: (lr, wd)}} (BISSL.md).
UPPER_HPARAMS: dict[str, dict[str, tuple[float, float]]] = {
    "aircraft": {"simclr": (0.03, 5e-3), "byol": (0.015, 3e-3)},
    "caltech101": {"simclr": (0.03, 1e-4), "byol": (0.015, 2e-4)},
    "cars": {"simclr": (0.035, 1e-3), "byol": (0.04, 2e-3)},
    "cifar10": {"simclr": (0.015, 1e-3), "byol": (0.01, 1e-3)},
    "cifar100": {"simclr": (0.01, 1e-4), "byol": (0.01, 1e-3)},
    "cub200": {"simclr": (0.03, 1e-3), "byol": (0.015, 1e-4)},
    "dtd": {"simclr": (0.03, 1e-3), "byol": (0.015, 1e-4)},
    "flowers": {"simclr": (0.05, 5e-4), "byol": (0.035, 2e-3)},
    "food": {"simclr": (0.03, 1e-3), "byol": (0.035, 2e-3)},
    "pets": {"simclr": (0.03, 1e-3), "byol": (0.02, 2e-3)},
    "sun397": {"simclr": (0.015, 5e-5), "byol": (0.01, 5e-5)},
    "voc07": {"simclr": (0.015, 5e-3), "byol": (0.005, 6e-3)},
}
PAPER_DOWNSTREAM: tuple[str, ...] = tuple(UPPER_HPARAMS)
# Upper (lr, wd) for the small offline tasks of the mini/demo/tiny presets: not tuned, the most
# frequent pair among the authors' SimCLR values (0.03 / 1e-3: cub200, dtd, food, pets).
SMALL_UPPER = (0.03, 1e-3)
PRETEXT_TYPES = ("simclr", "byol")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
OFFLINE_ROOT = os.path.join("results", "data")  # git-ignored; Fashion-MNIST files are copied here


def fashion_mnist_available(root: str = FASHION_MNIST_DIR) -> bool:
    """True when the Fashion-MNIST idx files (Debian ``dataset-fashion-mnist``) are present."""
    return os.path.exists(os.path.join(root, "train-images-idx3-ubyte.gz"))


def upper_hparams(dataset: str, pretext_type: str = "simclr") -> tuple[float, float]:
    """The authors' upper-level ``(lr, wd)`` for a paper data set, or the small-task default.

    Example:
        >>> upper_hparams("cifar10", "byol")
        (0.01, 0.001)
        >>> upper_hparams("digits")
        (0.03, 0.001)
    """
    if pretext_type not in PRETEXT_TYPES:
        raise ValueError(f"`pretext_type` must be one of {PRETEXT_TYPES}, got {pretext_type!r}.")
    return UPPER_HPARAMS.get(dataset, {}).get(pretext_type, SMALL_UPPER)


#: ``--hvp-mode`` values ``--fsdp`` takes (see :mod:`applications.bissl.fsdp`).
FSDP_HVP_MODES: tuple[str, ...] = ("auto", "rev_rev", "rev_rev_cached", "finite_diff")

#: BiSSL's proximal coupling: the lower backbone :math:`\theta_P` to the upper backbone :math:`\theta_D`.
COUPLING: dict[str, str] = {"backbone": "backbone"}


def paper_method(**changes: Any) -> Proximal:
    r"""The authors' implicit-gradient method, a :class:`hypergrad.Proximal`, with ``changes`` applied.

    ``Proximal(lam=1e-3, damping=10, coupling=COUPLING, solver=CG(max_steps=5))``: the lower level
    :math:`L_P(\theta_P) + \frac{\lambda}{2}\|\theta_P - \theta_D\|^2` over the backbone, and
    :math:`(I + H/(\lambda + \text{damping}))\,x = \nabla_{\theta_P} L_D` solved by five CG steps.
    Any other field of :class:`hypergrad.Proximal` (``hvp_mode``, ``warm_start``,
    ``reuse_operator``, ``on_failure``) can be given.

    Example:
        >>> m = paper_method(solver=CG(max_steps=2), reuse_operator=True)
        >>> m.lam, m.damping, dict(m.coupling), m.solver.max_steps, m.reuse_operator
        (0.001, 10.0, {'backbone': 'backbone'}, 2, True)
    """
    return Proximal(**{"lam": 1e-3, "damping": 10.0, "coupling": dict(COUPLING), "solver": CG(max_steps=5), **changes})


def _pos(owner: str, name: str, value: Any, *, allow_zero: bool = False, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    bad = isinstance(value, bool) or not isinstance(value, kind)
    bad = bad or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero)
    if bad:
        need = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"{owner}: `{name}` must be a finite {'integer' if integer else 'number'} {need}, got {value!r}."
        )


@dataclass
class ModelConfig:
    """Backbone and heads.

    Args:
        arch: ``"resnet18"`` or ``"resnet50"`` (torchvision).
        small_stem: 3x3 stride-1 first conv, no max-pool (small images).
        width: channels of the first ResNet stage (64 in torchvision; smaller for CPU runs).
        in_channels: 1 (grayscale) or 3.
        image_size: side of the square input image in pixels.
        proj_dims: projector hidden and output width (paper: 256).
        pred_hidden: BYOL predictor hidden width (paper: 256).
    """

    arch: str = "resnet50"
    small_stem: bool = False
    width: int = 64
    in_channels: int = 3
    image_size: int = 96
    proj_dims: int = 256
    pred_hidden: int = 256

    def __post_init__(self) -> None:
        if self.arch not in ("resnet18", "resnet50"):
            raise ValueError(f"ModelConfig: `arch` must be 'resnet18' or 'resnet50', got {self.arch!r}.")
        if self.in_channels not in (1, 3):
            raise ValueError(f"ModelConfig: `in_channels` must be 1 or 3, got {self.in_channels!r}.")
        for name in ("width", "image_size", "proj_dims", "pred_hidden"):
            _pos("ModelConfig", name, getattr(self, name), integer=True)


@dataclass
class PretrainConfig:
    """Self-supervised pretext training (SimCLR or BYOL with LARS, warm-up + cosine).

    ``lars_exclude_1d=False`` (the authors' LARS: one group, every tensor decayed and trust-ratio
    scaled, BatchNorm and bias included); ``True`` exempts 1-D tensors as the SimCLR/VICReg recipes do.
    """

    pretext_type: str = "simclr"
    dataset: str = "imagefolder"
    epochs: int = 500
    batch_size: int = 1024
    lr: float = 4.8
    weight_decay: float = 1e-6
    momentum: float = 0.9
    warmup_epochs: int = 10
    temperature: float = 0.5
    ema_decay: float = 0.9995
    max_samples: int | None = None
    lars_exclude_1d: bool = False

    def __post_init__(self) -> None:
        if self.pretext_type not in PRETEXT_TYPES:
            raise ValueError(
                f"PretrainConfig: `pretext_type` must be one of {PRETEXT_TYPES}, got {self.pretext_type!r}."
            )
        for name in ("epochs", "batch_size"):
            _pos("PretrainConfig", name, getattr(self, name), integer=True)
        _pos("PretrainConfig", "warmup_epochs", self.warmup_epochs, integer=True, allow_zero=True)
        for name in ("lr", "temperature"):
            _pos("PretrainConfig", name, getattr(self, name))
        _pos("PretrainConfig", "weight_decay", self.weight_decay, allow_zero=True)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"PretrainConfig: `ema_decay` must be in [0, 1), got {self.ema_decay!r}.")


@dataclass
class BiSSLConfig:
    r"""The bilevel stage.

    Lower level: :math:`\min_{\theta_P} L_P(\theta_P) + \frac{\lambda}{2}\|\theta_P - \theta_D\|^2`
    (backbone only). Upper level: :math:`L_D(\theta_P^*, \phi) + \gamma L_D(\theta_D, \phi)`, with
    :math:`\nabla_{\theta_D}` through :math:`\lambda_e (H + \lambda_e I)^{-1}`,
    :math:`\lambda_e = \lambda + \text{damping}`. The stage runs ``method`` as it is: the settings of
    the implicit gradient live on that :class:`hypergrad.Proximal`, not here.

    Args:
        alternations: number of (lower, upper) rounds (paper: 500).
        lower_steps, upper_steps: :math:`N_L` and :math:`N_U` per alternation (paper: 20 and 8).
        gamma: :math:`\gamma` (paper: 1).
        method: the :class:`hypergrad.Proximal` of the stage (default :func:`paper_method`): ``lam``
            :math:`\lambda` (1e-3), ``damping`` (10), ``solver`` for :math:`(I + H/\lambda_e) x = g`
            (``CG(max_steps=5)``), ``warm_start`` (start each upper step's solve from the previous
            solution), ``reuse_operator`` (keep the pretext gradient graph for the whole alternation:
            one backward pass per HVP, no forward re-run), ``hvp_mode`` (see ``hypergrad.HVP_MODES``).
            Its ``coupling`` must be :data:`COUPLING`. The stage replaces its ``lam`` / ``damping``
            under ``lam_mode`` / ``damping_mode`` other than ``"constant"``.
        head_warmup_epochs: linear-head warm-up epochs, backbone frozen (paper: 20).
        lower_lr, lower_wd, lower_warmup_steps: LARS settings of the lower level (1.0, 1e-6, 200).
        upper_lr, upper_wd: SGD settings of the upper level; ``None`` takes :func:`upper_hparams`.
        momentum: SGD / LARS momentum (0.9). final_lr_factor: cosine floor (0.001).
        clip_norm: gradient-norm clipping on both levels (10).
        pretext_batch, downstream_batch: batch sizes (1024 and 256).
        downstream: the downstream task the upper level optimises (``--d-dset``).
        head_warmup_mode: ``"train"`` (the authors: a copy of the downstream backbone, frozen but in
            train mode so BatchNorm uses batch statistics, on train-transformed images) or ``"eval"``
            (frozen backbone in eval mode on eval-transformed images).
        lars_exclude_1d: LARS of the lower level exempts 1-D tensors (``False``: the authors' LARS).
        damping_mode: ``"constant"`` (the paper's ``damping``) or ``"adaptive"``: before the upper
            steps of each alternation, ``curvature_steps`` Lanczos steps on :math:`H` estimate its
            most negative Ritz value :math:`\mu`, and the damping becomes
            :math:`\max(d, m\,(-\mu) - \lambda)` with margin :math:`m` = ``damping_margin``, so that
            :math:`I + H/(\lambda + d)` is positive definite on the Krylov space.
        lam_mode: ``"constant"`` (the paper's ``lam``) or ``"target_share"``: each alternation sets
            :math:`\lambda = s\,\|\nabla L_P\| / \|\theta_P - \theta_D\|` (clipped to
            ``[lam, lam_max]``) so that the proximal term is a share :math:`s` = ``target_share`` of
            the lower gradient.
        continue_stream: the stage's pretext views continue the pretraining stream (epochs after the
            pretraining epochs) instead of replaying pretraining's epoch 0.
        upper_split: ``"train"`` (the authors: the upper level and the head warm-up use only the
            train part of the shared train/val split, so fine-tuning's validation images stay unseen)
            or ``"all"`` (every labelled training image; leaks fine-tuning's validation labels).
        fsdp: shard the backbones with ``fully_shard`` (FSDP2) under torchrun (``--fsdp``; see
            :mod:`applications.bissl.fsdp`); needs ``method.hvp_mode`` in :data:`FSDP_HVP_MODES`
            and ``damping_mode="constant"``.
    """

    downstream: str = "pets"
    alternations: int = 500
    lower_steps: int = 20
    upper_steps: int = 8
    gamma: float = 1.0
    method: Proximal = field(default_factory=paper_method)
    head_warmup_epochs: int = 20
    lower_lr: float = 1.0
    lower_wd: float = 1e-6
    lower_warmup_steps: int = 200
    upper_lr: float | None = None
    upper_wd: float | None = None
    momentum: float = 0.9
    final_lr_factor: float = 1e-3
    clip_norm: float = 10.0
    pretext_batch: int = 1024
    downstream_batch: int = 256
    head_warmup_mode: str = "train"
    lars_exclude_1d: bool = False
    damping_mode: str = "constant"
    curvature_steps: int = 8
    damping_margin: float = 2.0
    lam_mode: str = "constant"
    target_share: float = 0.05
    lam_max: float = 1.0
    continue_stream: bool = True
    upper_split: str = "train"
    fsdp: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (
            ("head_warmup_mode", ("train", "eval")),
            ("damping_mode", ("constant", "adaptive")),
            ("lam_mode", ("constant", "target_share")),
            ("upper_split", ("train", "all")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"BiSSLConfig: `{name}` must be one of {allowed}, got {getattr(self, name)!r}.")
        _pos("BiSSLConfig", "curvature_steps", self.curvature_steps, integer=True)
        for name in ("damping_margin", "target_share", "lam_max"):
            _pos("BiSSLConfig", name, getattr(self, name))
        for name in ("alternations", "lower_steps", "upper_steps", "pretext_batch", "downstream_batch"):
            _pos("BiSSLConfig", name, getattr(self, name), integer=True)
        for name in ("head_warmup_epochs", "lower_warmup_steps"):
            _pos("BiSSLConfig", name, getattr(self, name), integer=True, allow_zero=True)
        for name in ("lower_lr", "clip_norm", "final_lr_factor"):
            _pos("BiSSLConfig", name, getattr(self, name))
        for name in ("gamma", "lower_wd", "momentum"):
            _pos("BiSSLConfig", name, getattr(self, name), allow_zero=True)
        for name in ("upper_lr", "upper_wd"):
            if getattr(self, name) is not None:
                _pos("BiSSLConfig", name, getattr(self, name), allow_zero=name == "upper_wd")
        if not isinstance(self.method, Proximal):
            raise TypeError(
                f"BiSSLConfig: `method` must be a hypergrad.Proximal such as paper_method(lam=1e-3), got {self.method!r}."
            )
        if not isinstance(self.fsdp, bool):
            raise ValueError(f"BiSSLConfig: `fsdp` must be True or False, got {self.fsdp!r}.")
        if self.fsdp and self.method.hvp_mode not in FSDP_HVP_MODES:
            raise ValueError(
                f"BiSSLConfig: --fsdp needs --hvp-mode one of {FSDP_HVP_MODES} (auto and rev_rev_cached: exact products "
                "on the gathered weights; finite_diff: finite differences of backward passes), got "
                f"{self.method.hvp_mode!r}."
            )
        if self.fsdp and self.damping_mode == "adaptive":
            raise ValueError(
                "BiSSLConfig: --fsdp with --damping-mode adaptive is not supported: its Lanczos estimate of H's "
                "spectrum runs torch.func Hessian products, which cannot see through fully_shard. Use --damping-mode "
                "constant (with enough --damping), or drop --fsdp."
            )
        if dict(self.method.coupling) != COUPLING:
            raise ValueError(
                f"BiSSLConfig: `method.coupling` must be {COUPLING} (BiSSL couples the two backbones), got "
                f"{dict(self.method.coupling)!r}; build the method with paper_method(...)."
            )

    @property
    def lam_eff(self) -> float:
        """:math:`\\lambda + \\text{damping}`, the constant of the solved system."""
        return self.method.lam + self.method.damping


@dataclass
class FinetuneConfig:
    """Evaluation protocol: full fine-tuning (SGD momentum 0.9, cosine, no warm-up).

    Random search over ``lr ~ logU(lr_range)``, ``wd ~ logU(wd_range)`` with ``hpo_trials`` trials
    selected on a seeded validation split of ``val_fraction`` of the training set (``hpo_trials=0``
    uses ``lr``/``wd`` as given), then ``num_runs`` seeded runs on the full training set.
    """

    epochs: int = 400
    batch_size: int = 256
    hpo_trials: int = 100
    num_runs: int = 10
    lr_range: tuple[float, float] = (1e-4, 1.0)
    wd_range: tuple[float, float] = (1e-5, 1e-2)
    lr: float = 0.01
    weight_decay: float = 1e-4
    momentum: float = 0.9
    val_fraction: float = 0.2
    hpo_epochs: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "num_runs"):
            _pos("FinetuneConfig", name, getattr(self, name), integer=True)
        _pos("FinetuneConfig", "hpo_trials", self.hpo_trials, integer=True, allow_zero=True)
        _pos("FinetuneConfig", "lr", self.lr)  # --lr / --wd (used with --use-hpo 0)
        _pos("FinetuneConfig", "weight_decay", self.weight_decay, allow_zero=True)
        for name in ("lr_range", "wd_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(
                    f"FinetuneConfig: `{name}` must be (low, high) with 0 < low <= high, got {(lo, hi)!r}."
                )
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"FinetuneConfig: `val_fraction` must be in (0, 1), got {self.val_fraction!r}.")


@dataclass
class PipelineConfig:
    """Everything one ``run`` needs: stage configs, data sets, directories and device.

    ``downstream`` lists the downstream tasks (names understood by the task loader, e.g.
    ``"digits"``, ``"fashion_mnist@20"`` = 20 labels per class, ``"fashion_mnist_inv@20"``).
    ``threads`` sets ``torch.set_num_threads`` (``None``: torch's default); one thread is faster
    for the tiny convolutions of the CPU presets, especially on a shared machine. ``arms`` are the
    backbones fine-tuned per task: ``pretext`` (baseline), ``control`` (continued pretraining with
    the stage's lower steps, no upper level) and ``bissl``.
    """

    name: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    bissl: BiSSLConfig = field(default_factory=BiSSLConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    downstream: tuple[str, ...] = PAPER_DOWNSTREAM
    data_root: str = "data"
    out_dir: str = "results"
    log_dir: str | None = None
    device: str = "cpu"
    num_workers: int = 0
    threads: int | None = None
    seed: int = 0
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    arms: tuple[str, ...] = ("pretext", "bissl")

    def __post_init__(self) -> None:
        bad = [a for a in self.arms if a not in ("pretext", "control", "bissl")]
        if bad or not self.arms:
            raise ValueError(
                f"PipelineConfig: `arms` must be a non-empty subset of ('pretext', 'control', 'bissl'), got {self.arms!r}."
            )

    @property
    def run_dir(self) -> str:
        """``out_dir/<preset name>``: where every stage of this pipeline writes."""
        return os.path.join(self.out_dir, self.name)

    @property
    def logs(self) -> str:
        """The log directory (``log_dir`` or ``run_dir/logs``)."""
        return self.log_dir or os.path.join(self.run_dir, "logs")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (the stage's method as :func:`method_dict`)."""
        d = dataclasses.asdict(self)
        d["bissl"]["method"] = method_dict(self.bissl.method)
        return d


def method_dict(method: Proximal) -> dict[str, Any]:
    """A JSON-friendly view of a :class:`hypergrad.Proximal`: its fields, the solver as its repr.

    Example:
        >>> method_dict(paper_method())["solver"], method_dict(paper_method())["lam"]
        ('CG(max_steps=5, rtol=0.0, atol=0.0)', 0.001)
    """
    d = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
    return {"type": type(method).__name__, **d, "coupling": dict(method.coupling), "solver": repr(method.solver)}


def _paper() -> PipelineConfig:
    return PipelineConfig(name="paper", device="cuda", num_workers=8)


def _mini() -> PipelineConfig:
    return PipelineConfig(
        name="mini",
        data_root=OFFLINE_ROOT,
        model=ModelConfig(
            arch="resnet18", small_stem=True, width=8, in_channels=1, image_size=16, proj_dims=64, pred_hidden=64
        ),
        pretrain=PretrainConfig(
            dataset="fashion_mnist", epochs=10, batch_size=256, lr=1.0, warmup_epochs=1, max_samples=8000
        ),
        bissl=BiSSLConfig(
            downstream="digits@30",
            alternations=12,
            lower_steps=10,
            upper_steps=4,
            head_warmup_epochs=5,
            lower_warmup_steps=10,
            pretext_batch=128,
            downstream_batch=64,
            method=paper_method(reuse_operator=True),
        ),
        finetune=FinetuneConfig(epochs=15, batch_size=32, hpo_trials=6, hpo_epochs=8, num_runs=10),
        downstream=("digits@30", "digits_inv@30", "fashion_mnist_inv@20"),
        max_test_samples=2000,
        threads=1,
        arms=("pretext", "control", "bissl"),
    )


def _demo() -> PipelineConfig:
    fm = fashion_mnist_available()
    return PipelineConfig(
        name="demo",
        data_root=OFFLINE_ROOT,
        model=ModelConfig(
            arch="resnet18", small_stem=True, width=8, in_channels=1, image_size=16, proj_dims=64, pred_hidden=64
        ),
        pretrain=PretrainConfig(
            dataset="fashion_mnist" if fm else "photo_patches",
            epochs=3,
            batch_size=128,
            lr=1.0,
            warmup_epochs=1,
            max_samples=2000,
        ),
        bissl=BiSSLConfig(
            downstream="digits",
            alternations=5,
            lower_steps=8,
            upper_steps=4,
            head_warmup_epochs=2,
            lower_warmup_steps=8,
            pretext_batch=64,
            downstream_batch=64,
            method=paper_method(reuse_operator=True),
        ),
        finetune=FinetuneConfig(epochs=5, batch_size=64, hpo_trials=3, hpo_epochs=2, num_runs=3),
        downstream=("digits",),
        threads=1,
    )


def _tiny() -> PipelineConfig:
    return PipelineConfig(
        name="tiny",
        data_root=OFFLINE_ROOT,
        model=ModelConfig(
            arch="resnet18", small_stem=True, width=4, in_channels=1, image_size=8, proj_dims=16, pred_hidden=16
        ),
        pretrain=PretrainConfig(dataset="digits", epochs=1, batch_size=32, lr=0.5, warmup_epochs=0, max_samples=64),
        bissl=BiSSLConfig(
            downstream="digits",
            alternations=1,
            lower_steps=2,
            upper_steps=2,
            head_warmup_epochs=1,
            lower_warmup_steps=1,
            pretext_batch=32,
            downstream_batch=32,
            method=paper_method(solver=CG(max_steps=2)),
        ),
        finetune=FinetuneConfig(epochs=1, batch_size=32, hpo_trials=2, hpo_epochs=1, num_runs=2),
        downstream=("digits",),
        max_train_samples=64,
        threads=1,
    )


PRESETS = {"paper": _paper, "mini": _mini, "demo": _demo, "tiny": _tiny}


def get_preset(name: str) -> PipelineConfig:
    """A fresh :class:`PipelineConfig` for preset ``name`` (``paper``, ``mini``, ``demo``, ``tiny``)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]()
