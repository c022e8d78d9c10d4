r"""The BiSSL stage: linear-head warm-up, then alternations of lower and upper steps.

Started from the pretext checkpoint (backbone + projector [+ predictor]):

1. **Head warm-up**: ``head_warmup_epochs`` epochs of the downstream linear head :math:`\phi` on
   frozen backbone features, SGD with the upper lr / wd.
2. **Alternations** (``alternations`` times):

   * ``lower_steps`` steps of LARS (lr 1.0, wd 1e-6, warm-up then cosine to 0.001x) on
     :math:`L_P(\theta_P) + \frac{\lambda}{2}\|\theta_P - \theta_D\|^2` over the lower backbone,
     projector and predictor (the proximal term covers the backbone only); BYOL's EMA target
     follows the online network after each lower step.
   * one pretext batch is drawn and fixed: the Hessian :math:`H = \nabla^2_{\theta_P} L_P` of the
     alternation is taken on it (:class:`~applications.bissl.bilevel.ImplicitJacobian`);
   * ``upper_steps`` steps of SGD (momentum 0.9, cosine to 0.001x) on :math:`\theta_D, \phi` with
     :math:`g_{\theta_D} = \lambda_e (H + \lambda_e I)^{-1} \nabla_{\theta_P} L_D + \gamma
     \nabla_{\theta_D} L_D` (see :mod:`applications.bissl.bilevel`).

   Both levels clip the gradient norm at ``clip_norm``. Under ``torchrun`` every gradient and every
   Hessian-vector product is averaged over ranks.

The stage checkpoints after every alternation (``hypergrad.save_checkpoint``) and resumes from it,
logs to CSV / JSONL / TensorBoard (``hypergrad.MetricsLogger``) and saves the **lower** backbone
:math:`\theta_P` - the one fine-tuned afterwards - to ``<out>/lower_backbone.pt``.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from hypergrad import MetricsLogger, get_rng_state, load_checkpoint, save_checkpoint, set_rng_state

from . import distributed as dist_utils
from .augment import TwoViewAugment, eval_transform, train_transform
from .bilevel import HESSIAN, build_problem
from .config import PipelineConfig, upper_hparams
from .data import TwoViewDataset, get_dataset
from .models import LinearHead
from .optim import LARS, warmup_cosine
from .pretrain import build_pretrain_model, epoch_batches
from .tasks import build_task, parse_task, task_classes

__all__ = ["run_bissl", "pretext_dataset"]


def pretext_dataset(cfg: PipelineConfig, seed: int = 0) -> TwoViewDataset:
    """The unlabelled pretext images as two augmented views (``cfg.pretrain.max_samples`` caps it)."""
    m = cfg.model
    ds = get_dataset(cfg.pretrain.dataset, cfg.data_root, "train", None, image_size=m.image_size)
    if cfg.pretrain.max_samples is not None and len(ds) > cfg.pretrain.max_samples:
        ds = ds.subset(range(cfg.pretrain.max_samples))
    return TwoViewDataset(ds, TwoViewAugment(m.image_size, m.in_channels), seed=seed)


def _batches(ds: Dataset, first: int, count: int, batch: int, seed: int, workers: int) -> Iterator:
    """Global batches ``first .. first + count - 1`` of an endless stream of seeded epochs.

    Epoch :math:`e` is the permutation :func:`~applications.bissl.pretrain.epoch_batches` draws from
    ``seed + e`` (this rank's share of each global batch), so batch :math:`k` is the same whether a
    run was interrupted or not; a resumed run sees exactly the batches it would have seen.
    """
    b = min(batch, len(ds))
    per_epoch = len(ds) // b
    k, end = first, first + count
    while k < end:
        epoch, j = divmod(k, per_epoch)
        n = min(end - k, per_epoch - j)
        idx = epoch_batches(len(ds), b, epoch, seed, dist_utils.rank(), dist_utils.world_size())[j : j + n]
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        yield from DataLoader(ds, batch_sampler=idx, num_workers=workers)
        k += n


def _reduce_grads(params) -> None:
    if dist_utils.is_distributed():
        for p in params:
            if p.grad is not None:
                p.grad = dist_utils.all_reduce_mean(p.grad)


def _warmup_head(cfg: PipelineConfig, backbone: nn.Module, head: nn.Module, ds: Dataset, lr: float, wd: float) -> float:
    b = cfg.bissl
    device = next(head.parameters()).device
    loader = DataLoader(
        ds,
        batch_size=min(b.downstream_batch, len(ds)),
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
        num_workers=cfg.num_workers,
    )
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=b.momentum, weight_decay=wd)
    backbone.eval()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(
        range(b.head_warmup_epochs), desc="head warm-up", leave=False, disable=not dist_utils.is_main_process()
    ):
        for x, y in loader:
            with torch.no_grad():
                h = backbone(x.to(device))
            loss = F.cross_entropy(head(h), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _reduce_grads(head.parameters())
            opt.step()
    backbone.train()
    return loss.item()


def run_bissl(cfg: PipelineConfig, pretrained_path: str, out_dir: str | None = None, *, resume: bool = True) -> str:
    """Run the BiSSL stage for ``cfg.bissl.downstream``; return the path of the lower backbone.

    Args:
        cfg: the pipeline configuration (``cfg.bissl`` holds this stage's settings).
        pretrained_path: the pretext checkpoint (dict with ``backbone``, ``projector`` and for BYOL
            ``predictor`` state dicts).
        out_dir: output directory (default ``run_dir/bissl/<task>``).
        resume: continue from ``<out_dir>/checkpoint.pt`` when it exists.
    """
    b, kind = cfg.bissl, cfg.pretrain.pretext_type
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and dist_utils.is_distributed():
        dev = torch.device("cuda", dist_utils.local_rank())
    task = b.downstream
    out_dir = out_dir or os.path.join(cfg.run_dir, "bissl", task.replace("@", "_at"))
    main = dist_utils.is_main_process()
    if not os.path.exists(pretrained_path):
        raise FileNotFoundError(f"Pretext checkpoint {pretrained_path!r} not found; run the `pretrain` stage first.")
    torch.manual_seed(cfg.seed)
    upper_lr, upper_wd = upper_hparams(parse_task(task).dataset, kind)
    upper_lr = b.upper_lr if b.upper_lr is not None else upper_lr
    upper_wd = b.upper_wd if b.upper_wd is not None else upper_wd

    ssl = build_pretrain_model(cfg)
    pre = torch.load(pretrained_path, map_location="cpu", weights_only=True)
    for part in ("backbone", "projector", "predictor"):
        if getattr(ssl, part) is not None:
            getattr(ssl, part).load_state_dict(pre[part])
    ssl.to(dev)
    ssl.reset_target()  # BYOL: the target is re-created from the online network when the stage starts
    upper = copy.deepcopy(ssl.backbone)
    head = LinearHead(ssl.projector[0].in_features, task_classes(task)).to(dev)

    m = cfg.model
    cap = cfg.max_train_samples
    pre_ds = pretext_dataset(cfg, seed=cfg.seed)
    down_ds = build_task(
        task,
        cfg.data_root,
        "train",
        train_transform(m.image_size, m.in_channels),
        image_size=m.image_size,
        max_samples=cap,
    )
    warm_ds = build_task(
        task,
        cfg.data_root,
        "train",
        eval_transform(m.image_size, m.in_channels),
        image_size=m.image_size,
        max_samples=cap,
    )

    lower_opt = LARS(
        [p for p in ssl.parameters() if p.requires_grad], lr=b.lower_lr, weight_decay=b.lower_wd, momentum=b.momentum
    )
    n_low, n_up = b.alternations * b.lower_steps, b.alternations * b.upper_steps
    lower_sched = warmup_cosine(lower_opt, min(b.lower_warmup_steps, n_low), n_low, b.final_lr_factor)
    upper_opt = torch.optim.SGD(
        [*upper.parameters(), *head.parameters()], lr=upper_lr, momentum=b.momentum, weight_decay=upper_wd
    )
    upper_sched = warmup_cosine(upper_opt, 0, n_up, b.final_lr_factor)
    problem = build_problem(
        ssl, upper, head, b, lower_opt=lower_opt, upper_opt=upper_opt, lower_sched=lower_sched, upper_sched=upper_sched
    )

    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    start = 0
    if resume and os.path.exists(ckpt_path):
        st = load_checkpoint(ckpt_path)
        problem.load_state_dict(st["problem"])
        if "rng" in st:  # saved next to the problem's state (hypergrad keeps no RNG in state_dict)
            set_rng_state(st["rng"])
        start = st["alternation"]
    else:
        _warmup_head(cfg, ssl.backbone, head, warm_ds, upper_lr, upper_wd)  # backbone frozen, SGD with the upper lr/wd

    logger = (
        MetricsLogger(os.path.join(cfg.logs, "bissl", task.replace("@", "_at")), tensorboard=True) if main else None
    )
    bar = tqdm(
        range(start, b.alternations), desc=f"bissl {task}", disable=not main, initial=start, total=b.alternations
    )
    for alt in bar:
        t0 = time.perf_counter()
        pre_it = _batches(
            pre_ds, alt * (b.lower_steps + 1), b.lower_steps + 1, b.pretext_batch, cfg.seed, cfg.num_workers
        )
        down_it = _batches(
            down_ds, alt * b.upper_steps, b.upper_steps, b.downstream_batch, cfg.seed + 1, cfg.num_workers
        )
        ssl.train()
        inner_losses = []
        for _ in range(b.lower_steps):
            x1, x2 = (v.to(dev) for v in next(pre_it))
            inner_losses += problem.inner_step((x1, x2)).inner_losses
            ssl.update_target()  # BYOL EMA after every lower step; Hessian passes never touch it
        # One pretext batch for every Hessian product of this alternation, declared once: the
        # operator can be reused across the upper steps when `reuse_operator` is on.
        x1, x2 = (v.to(dev) for v in next(pre_it))
        problem.new_hessian_batch((x1, x2, HESSIAN))
        t_low = time.perf_counter() - t0
        hvps, outer_losses, res, failed, status = 0, [], float("nan"), 0, ""
        for _ in range(b.upper_steps):
            x, y = next(down_it)
            rec = problem.hypergradient((x.to(dev), y.to(dev)))
            problem.outer_step()
            hvps += rec.num_hvps
            if rec.outer_loss is not None:
                outer_losses.append(rec.outer_loss)
            if rec.solve is not None:
                res = rec.solve.residual_norm if rec.solve.residual_norm is not None else res
                failed += int(rec.solve.failed)  # e.g. negative curvature: I + H/lam_e not positive definite
                status = rec.solve.status
        if main:
            logger.log(
                alt,
                {
                    "lower_loss": inner_losses[-1],
                    "upper_loss": outer_losses[-1] if outer_losses else float("nan"),
                    "hvps": hvps,
                    "residual_last": res,
                    "solves_failed": failed,
                    "inner_skipped": problem.inner_skipped,
                    "outer_skipped": problem.outer_skipped,
                    "lower_lr": lower_sched.get_last_lr()[0],
                    "upper_lr": upper_sched.get_last_lr()[0],
                    "time_lower_s": t_low,
                    "time_s": time.perf_counter() - t0,
                },
            )
            bar.set_postfix(
                lower=f"{inner_losses[-1]:.3f}",
                upper=f"{outer_losses[-1] if outer_losses else float('nan'):.3f}",
                hvp=hvps,
                solve=status,
            )
            save_checkpoint(
                {"alternation": alt + 1, "problem": problem.state_dict(), "rng": get_rng_state()}, ckpt_path
            )
        dist_utils.barrier()
    out_path = os.path.join(out_dir, "lower_backbone.pt")
    if main:
        logger.close()
        save_checkpoint(
            {"backbone": ssl.backbone.state_dict(), "upper_backbone": upper.state_dict(), "head": head.state_dict()},
            out_path,
        )
    dist_utils.barrier()
    return out_path
