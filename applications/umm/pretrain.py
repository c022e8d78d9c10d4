r"""SimCLR pretraining that keeps a checkpoint every ``save_every`` epochs (the diagnostic's input).

The BiSSL ``pretrain`` stage writes only its final ``pretrained.pt`` and an overwritten resume
file, so it cannot show *when* memorisation sets in. This loop trains the same backbone,
projector and NT-Xent loss (imported from :mod:`applications.bissl`) on the ``pretrain`` images
of :func:`~applications.umm.data.load_splits` and keeps ``checkpoints/epoch_XXXX.pt`` (epoch 0 =
the random initialisation) with the architecture fields, so that
:func:`~applications.umm.model.load_pretrained` can refuse a mismatching model. A killed run
resumes from ``state.pt`` (written after every epoch) under the same settings.
"""

from __future__ import annotations

import glob
import math
import os
import time

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from applications.bissl.losses import NTXentLoss
from applications.bissl.optim import LARS
from hypergrad import MetricsLogger, load_checkpoint, save_checkpoint

from . import runtime
from .config import UMMConfig
from .data import load_splits, view_batches
from .model import build_model

__all__ = ["SimCLR", "list_checkpoints", "pretrain"]


class SimCLR(nn.Module):
    """Backbone + projector whose ``forward(x1, x2)`` is the NT-Xent loss (negatives over all ranks)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, temperature: float = 0.5) -> None:
        super().__init__()
        self.backbone, self.projector = backbone, projector
        self.loss_fn = NTXentLoss(temperature=temperature, gather=True)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return self.loss_fn(self.projector(self.backbone(x1)), self.projector(self.backbone(x2)))


def _pretrain_keys(cfg: UMMConfig) -> dict:
    keys = ("dataset", "n_pretrain", "epochs", "batch_size", "lr", "weight_decay", "optimizer", "temperature", "seed")
    return {**cfg.model_dict(), **{k: getattr(cfg, k) for k in keys}}


def list_checkpoints(folder: str) -> list[str]:
    """The ``epoch_XXXX.pt`` files of a pretraining run folder (or of its ``checkpoints/``), by epoch."""
    sub = os.path.join(folder, "checkpoints")
    folder = sub if os.path.isdir(sub) else folder
    return sorted(glob.glob(os.path.join(folder, "epoch_*.pt")))


def pretrain(cfg: UMMConfig, out_dir: str | None = None, *, resume: bool = True, progress: bool = True) -> list[str]:
    """Pretrain with SimCLR and return the list of kept checkpoints (epoch 0, every ``save_every``, last).

    Args:
        cfg: uses the data, model and pretraining fields.
        out_dir: default ``<run_dir>/pretrain``.
        resume: continue from ``state.pt`` if present (refused when its settings differ).
        progress: tqdm bar on rank 0.
    """
    dev = runtime.setup(cfg)
    out_dir = out_dir or os.path.join(cfg.run_dir, "pretrain")
    main, world = runtime.is_main(), runtime.world()
    if cfg.batch_size % world:
        raise ValueError(f"`batch_size`={cfg.batch_size} must be divisible by the world size {world}.")
    torch.manual_seed(cfg.seed)
    backbone, projector = build_model(cfg)
    model = SimCLR(backbone, projector, cfg.temperature).to(dev)
    params = list(model.parameters())
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = LARS(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.9)
    splits = load_splits(cfg)
    steps_per_epoch = len(splits.pretrain) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"`batch_size`={cfg.batch_size} exceeds the {len(splits.pretrain)} pretraining images.")
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    state_path = os.path.join(out_dir, "state.pt")
    ck_dir = os.path.join(out_dir, "checkpoints")
    start = 0
    if resume and os.path.exists(state_path):
        st = load_checkpoint(state_path)
        if st["settings"] != _pretrain_keys(cfg):
            changed = {
                k: (st["settings"].get(k), v) for k, v in _pretrain_keys(cfg).items() if st["settings"].get(k) != v
            }
            raise ValueError(
                f"{state_path!r} was written with other settings {changed}; pass --no-resume or another --run-dir."
            )
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start = st["epoch"]

    def keep(epoch: int) -> None:
        if main:
            save_checkpoint(
                {"backbone": backbone.state_dict(), "projector": projector.state_dict(), "model": cfg.model_dict(),
                 "epoch": epoch, "config": cfg.to_dict()},
                os.path.join(ck_dir, f"epoch_{epoch:04d}.pt"),
            )  # fmt: skip

    if start == 0:
        keep(0)
    net: nn.Module = DistributedDataParallel(model) if world > 1 else model
    logger = MetricsLogger(os.path.join(out_dir, "logs"), tensorboard=_has_tensorboard()) if main else None
    bar = tqdm(
        range(start, cfg.epochs), desc="umm pretrain", disable=not (main and progress), initial=start, total=cfg.epochs
    )
    for epoch in bar:
        t0, losses = time.perf_counter(), []
        model.train()
        for x1, x2 in view_batches(splits.pretrain, cfg, batch=cfg.batch_size, epoch=epoch, seed=cfg.seed,
                                   rank=runtime.rank(), world=world):  # fmt: skip
            loss = net(x1.to(dev), x2.to(dev))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretraining loss is {loss.item()} at epoch {epoch + 1}; lower --lr.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        if main and logger is not None:
            mean = sum(losses) / len(losses)
            logger.log(epoch + 1, {"ssl_loss": mean, "lr": sched.get_last_lr()[0], "time_s": time.perf_counter() - t0})
            bar.set_postfix(loss=f"{mean:.3f}")
            if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
                keep(epoch + 1)
            save_checkpoint(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "epoch": epoch + 1, "settings": _pretrain_keys(cfg)},
                state_path,
            )  # fmt: skip
        if world > 1:
            torch.distributed.barrier()
    if logger is not None:
        logger.close()
    return list_checkpoints(out_dir)


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True
