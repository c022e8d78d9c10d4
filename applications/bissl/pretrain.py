r"""Stage 1 of BiSSL: SimCLR or BYOL pretraining on the unlabelled images of a dataset.

LARS with linear warm-up + cosine (:mod:`~applications.bissl.optim`), the paper's two-view
augmentations (:class:`~applications.bissl.augment.TwoViewAugment`), DDP under
``torchrun --nproc-per-node N`` (gloo on CPU, NCCL + SyncBatchNorm on CUDA; SimCLR negatives
gathered over all ranks), tqdm progress and CSV/JSONL (optionally TensorBoard) metrics on rank 0,
and an atomic checkpoint every ``checkpoint_every`` steps from which a killed run resumes.

**Exact resumption.** The data order of epoch :math:`e` is a permutation drawn from
``seed + e``; global batch :math:`k` is its slice :math:`[kB, (k+1)B)`, of which rank :math:`r`
takes the :math:`r`-th of :math:`W` equal parts; every image's augmentation has its own seed
(:class:`~applications.bissl.data.TwoViewDataset`). A resumed run therefore sees exactly the
batches the uninterrupted run would have seen, and on CPU reaches bitwise the same final state.
(:class:`~torch.utils.data.DistributedSampler` is not used: it cannot start mid-epoch.)

Output: ``<out_dir>/pretrained.pt``, a dict with the ``backbone``, ``projector``, ``predictor``
(BYOL, else ``None``) and ``target`` (BYOL) state dicts plus the configs, loadable with
``torch.load(path, weights_only=True)``; ``<out_dir>/checkpoint.pt`` for resuming;
``<out_dir>/logs/metrics.{csv,jsonl}``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from hypergrad import load_checkpoint
from hypergrad.distributed import all_reduce_mean, world_size

from . import distributed as du
from .augment import TwoViewAugment
from .config import PipelineConfig
from .data import TwoViewDataset, get_dataset
from .optim import LARS, warmup_cosine
from .ssl_model import SSLModel, build_ssl_model
from .stage_run import StageRun

__all__ = [
    "build_pretrain_model",
    "epoch_batches",
    "pretrain",
    "pretext_dataset",
]


def build_pretrain_model(cfg: PipelineConfig) -> SSLModel:
    """The :class:`~applications.bissl.ssl_model.SSLModel` described by ``cfg.model``/``cfg.pretrain``.

    Example:
        >>> from applications.bissl.config import get_preset
        >>> build_pretrain_model(get_preset("tiny")).pretext_type
        'simclr'
    """
    m, p = cfg.model, cfg.pretrain
    return build_ssl_model(
        p.pretext_type,
        m.arch,
        width=m.width,
        small_stem=m.small_stem,
        in_channels=m.in_channels,
        proj_dims=m.proj_dims,
        pred_hidden=m.pred_hidden,
        temperature=p.temperature,
        ema_decay=p.ema_decay,
    )


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This rank's share of every global batch of ``epoch`` (incomplete last batch dropped).

    Args:
        n: dataset size.
        batch_size: global batch size :math:`B` (divisible by ``world``).
        epoch: epoch number (the permutation is drawn from ``seed + epoch``).
        seed: base seed.
        rank, world: this process and the number of processes.

    Returns:
        ``n // B`` lists of ``B // world`` dataset indices.

    Example:
        >>> full = epoch_batches(8, 4, epoch=0, seed=0)
        >>> halves = [epoch_batches(8, 4, epoch=0, seed=0, rank=r, world=2) for r in (0, 1)]
        >>> [a + b for a, b in zip(*halves)] == full
        True
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_rank = batch_size // world
    return [
        perm[k * batch_size + rank * per_rank : k * batch_size + (rank + 1) * per_rank] for k in range(n // batch_size)
    ]


def pretext_dataset(cfg: PipelineConfig) -> TwoViewDataset:
    """The unlabelled pretext images as two augmented views, at the model's one resolution.

    Used by pretraining and by the BiSSL stage alike (``cfg.pretrain.max_samples`` keeps the first
    images), so both see the same images at ``cfg.model.image_size``.
    """
    p, m = cfg.pretrain, cfg.model
    images = get_dataset(p.dataset, cfg.data_root, "train", image_size=m.image_size)
    if p.max_samples is not None and len(images) > p.max_samples:
        images = images.subset(range(p.max_samples))  # the first max_samples, as the BiSSL stage
    return TwoViewDataset(images, TwoViewAugment(m.image_size, m.in_channels), seed=cfg.seed)


def _state(model: SSLModel, opt: torch.optim.Optimizer, sched: Any, step: int, cfg: PipelineConfig) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": step,
        "config": cfg.to_dict(),
    }


def _check_same_run(saved: dict, current: dict, path: str) -> None:
    """Refuse to resume a checkpoint written with other model/pretraining settings or seed."""
    keys = [("model", k) for k in current["model"]] + [("pretrain", k) for k in current["pretrain"]]
    changed = [
        f"{a}.{b}: {saved.get(a, {}).get(b)!r} -> {current[a][b]!r}"
        for a, b in keys
        if saved.get(a, {}).get(b) != current[a][b]
    ]
    if saved.get("seed") != current["seed"]:
        changed.append(f"seed: {saved.get('seed')!r} -> {current['seed']!r}")
    if changed:
        raise ValueError(
            f"checkpoint {path!r} was written with other settings ({'; '.join(changed)}); pass resume=False "
            "(CLI: --no-resume) to start afresh, or use another output folder."
        )


def pretrain(
    cfg: PipelineConfig,
    out_dir: str | None = None,
    *,
    resume: bool = True,
    checkpoint_every: int | None = None,
    log_every: int = 10,
    final_lr_scale: float = 1e-3,
    tensorboard: bool = False,
    progress: bool = True,
) -> str:
    """Run SimCLR/BYOL pretraining as configured; return the path of ``pretrained.pt``.

    Under torchrun, call it in every process: the process group is initialised here when needed,
    ``cfg.pretrain.batch_size`` is the global batch (split evenly over ranks), and rank 0 writes
    the files.

    Args:
        cfg: pipeline configuration; uses ``cfg.model``, ``cfg.pretrain`` (``pretext_type``,
            ``dataset``, ``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``momentum``,
            ``warmup_epochs``, ``temperature``, ``ema_decay``, ``max_samples``), ``data_root``,
            ``device``, ``num_workers``, ``threads`` (sets ``torch.set_num_threads`` when not
            None), ``seed`` and ``run_dir``.
        out_dir: output folder (default ``<run_dir>/pretrain``).
        resume: continue from ``<out_dir>/checkpoint.pt`` when it exists.
        checkpoint_every: steps between checkpoints (default: once per epoch); the final state is
            always saved.
        log_every: steps between metric rows.
        final_lr_scale: cosine floor as a fraction of ``lr``.
        tensorboard: also write TensorBoard events.
        progress: show a tqdm bar (rank 0).

    Returns:
        Path of ``<out_dir>/pretrained.pt``.
    """
    p = cfg.pretrain
    out_dir = out_dir or os.path.join(cfg.run_dir, "pretrain")
    du.init_distributed()
    rank, world = du.rank(), world_size()
    if p.batch_size % world != 0:
        raise ValueError(f"pretrain.batch_size={p.batch_size} must be divisible by the world size {world}.")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1 (steps), got {checkpoint_every!r}.")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = du.device_of(cfg)
    torch.manual_seed(cfg.seed)
    data = pretext_dataset(cfg)
    steps_per_epoch = len(data) // p.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"pretrain.batch_size={p.batch_size} exceeds the {len(data)} pretext images; lower the batch size."
        )
    total = p.epochs * steps_per_epoch
    every = checkpoint_every or steps_per_epoch

    model = build_pretrain_model(cfg).to(device)
    opt = LARS(
        [q for q in model.parameters() if q.requires_grad],
        lr=p.lr,
        weight_decay=p.weight_decay,
        momentum=p.momentum,
        exclude_bias_and_norm=p.lars_exclude_1d,
    )
    sched = warmup_cosine(opt, p.warmup_epochs * steps_per_epoch, total, final_lr_scale)
    run = StageRun(
        out_dir, log_dir=os.path.join(out_dir, "logs"), tensorboard=tensorboard, resume=resume, progress=progress
    )
    ckpt_path = run.checkpoint_path
    step = 0
    if run.resumable:
        state = load_checkpoint(ckpt_path, map_location=device)
        _check_same_run(state.get("config", {}), cfg.to_dict(), ckpt_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
    net: nn.Module = model
    if world > 1:
        if device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    bar = run.bar(total=total, initial=step, desc=f"pretrain {p.pretext_type}")
    model.train()
    t0, seen = time.perf_counter(), 0
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        data.set_epoch(epoch)
        batches = epoch_batches(len(data), p.batch_size, epoch, cfg.seed, rank, world)[offset:]
        order = [i for b in batches for i in b]
        loader = DataLoader(
            data,
            batch_size=p.batch_size // world,
            sampler=order,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
        )
        for x1, x2 in loader:
            loss = net(x1.to(device, non_blocking=True), x2.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            model.update_target()
            step += 1
            seen += x1.shape[0] * world
            bar.update(1)
            if step % log_every == 0 or step == total:
                mean_loss = float(all_reduce_mean({"loss": loss.detach()})["loss"])
                bar.set_postfix(loss=f"{mean_loss:.4f}", epoch=epoch)
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                run.log(
                    step, {"loss": mean_loss, "lr": opt.param_groups[0]["lr"], "epoch": epoch, "images_per_s": rate}
                )
            if step % every == 0 or step == total:
                run.save(_state(model, opt, sched, step, cfg))
    run.close()
    return run.save(
        {
            **model.checkpoint_state(),
            "pretext_type": p.pretext_type,
            "steps": step,
            "model_config": dataclasses.asdict(cfg.model),
            "pretrain_config": dataclasses.asdict(p),
        },
        "pretrained.pt",
    )
