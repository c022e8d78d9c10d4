r"""The BiSSL stage: linear-head warm-up, then alternations of lower and upper steps.

Started from the pretext checkpoint (backbone + projector [+ predictor]):

1. **Head warm-up** (the authors' way, ``head_warmup_mode="train"``): ``head_warmup_epochs`` epochs
   of the downstream linear head :math:`\phi` on a *copy* of the downstream backbone, frozen but in
   train mode (BatchNorm uses batch statistics, as in the upper steps that follow) on
   train-transformed images, SGD with the upper lr / wd. ``"eval"`` keeps the backbone in eval mode
   on eval-transformed images.
2. **Alternations** (``alternations`` times):

   * ``lower_steps`` steps of LARS (lr 1.0, wd 1e-6, warm-up then cosine to 0.001x) on
     :math:`L_P(\theta_P) + \frac{\lambda}{2}\|\theta_P - \theta_D\|^2` over the lower backbone,
     projector and predictor (the proximal term covers the backbone only); BYOL's EMA target
     follows the online network after each lower step. The pretext batches continue the
     pretraining stream (epochs after the pretraining epochs; ``continue_stream``).
   * one pretext batch is drawn and fixed: the Hessian :math:`H = \nabla^2_{\theta_P} L_P` of the
     alternation is taken on it (negatives of this rank only);
   * diagnostics on that batch: :math:`\|\nabla L_P\|`, :math:`\|\theta_P - \theta_D\|`, the proximal
     share :math:`\lambda\|\theta_P - \theta_D\|/\|\nabla L_P\|`; with ``damping_mode="adaptive"``
     the extreme Ritz values of :math:`H` and the damping derived from them; with
     ``lam_mode="target_share"`` the :math:`\lambda` of the next alternation;
   * ``upper_steps`` steps of SGD (momentum 0.9, cosine to 0.001x) on :math:`\theta_D, \phi` with
     :math:`g_{\theta_D} = \lambda_e (H + \lambda_e I)^{-1} \nabla_{\theta_P} L_D + \gamma
     \nabla_{\theta_D} L_D` (see :mod:`applications.bissl.bilevel`), on the ``train`` part of the
     shared train/val split (:mod:`applications.bissl.splits`).

   Both levels clip the gradient norm at ``clip_norm``. Under ``torchrun`` every gradient and every
   Hessian-vector product is averaged over ranks.

**Failed solves are never applied silently**: every solve whose status is a failure (negative
curvature, non-finite, ...) is counted, the fraction per alternation is logged
(``solves_failed_frac``) and summed up in ``summary.json``, and a warning is printed at the end of
the stage when any failed; ``damping_mode="adaptive"`` is the remedy. A stage in which every upper
step was skipped raises :class:`RuntimeError` with the reason.

The **control arm** (``arm="control"``) runs the same lower steps (same batches, optimiser and
schedule) without the upper level and without the proximal term: continued pretraining, the
compute-matched control of the replication.

The stage checkpoints after every alternation (``hypergrad.save_checkpoint``) and resumes from it
(refused when the configuration or the pretext checkpoint differ from those the checkpoint records),
logs to CSV / JSONL / TensorBoard (``hypergrad.MetricsLogger``) and saves the **lower** backbone
:math:`\theta_P` - the one fine-tuned afterwards - to ``<out>/lower_backbone.pt``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from hypergrad import Identity, get_rng_state, set_rng_state, sharded_clip_grad_norm_
from hypergrad.distributed import all_reduce_mean, world_size

from . import distributed as dist_utils
from .augment import eval_transform, train_transform
from .bilevel import PretextBatch, build_problem, inner_loss, stage_schedules
from .checkpoints import check_same_settings, file_digest, load_into, pretext_checkpoint, read_checkpoint, run_settings
from .config import PipelineConfig, upper_hparams
from .data import TwoViewDataset
from .diagnostics import (
    adaptive_damping,
    hessian_extremes,
    param_distance,
    pretext_grad_norm,
    proximal_share,
    sharded_pretext_grad_norm,
    target_lam,
)
from .fsdp import (
    check_fsdp,
    check_fsdp_fresh,
    dense_twin,
    exact_method,
    fsdp_mesh,
    full_state_dict,
    param_groups,
    shard_stage,
    warn_kinked_fd,
)
from .models import LinearHead
from .optim import LARS
from .pretrain import build_pretrain_model, epoch_batches, pretext_dataset
from .splits import task_split
from .stage_run import StageRun
from .supervised import supervised_epoch
from .tasks import build_task, parse_task, task_classes

__all__ = ["run_bissl", "pretext_dataset", "stage_dir", "ARMS"]

ARMS = ("bissl", "control")


def stage_dir(cfg: PipelineConfig, task: str, arm: str = "bissl") -> str:
    """``<run_dir>/<arm>/<task>``: where the stage of ``arm`` writes for ``task``."""
    return os.path.join(cfg.run_dir, arm, task.replace("@", "_at"))


def _batches(ds: Dataset, first: int, count: int, batch: int, seed: int, workers: int, epoch0: int = 0) -> Iterator:
    """Global batches ``first .. first + count - 1`` of an endless stream of seeded epochs.

    Epoch :math:`e` of the stream is epoch ``epoch0 + e`` of
    :func:`~applications.bissl.pretrain.epoch_batches` (its permutation drawn from
    ``seed + epoch0 + e``, its views from :meth:`TwoViewDataset.set_epoch`), this rank's share of
    each global batch; batch :math:`k` is the same whether a run was interrupted or not.
    ``epoch0`` = the number of pretraining epochs makes the stage continue pretraining's stream.
    """
    b = min(batch, len(ds))
    per_epoch = len(ds) // b
    k, end = first, first + count
    while k < end:
        epoch, j = divmod(k, per_epoch)
        epoch += epoch0
        n = min(end - k, per_epoch - j)
        idx = epoch_batches(len(ds), b, epoch, seed, dist_utils.rank(), world_size())[j : j + n]
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        yield from DataLoader(ds, batch_sampler=idx, num_workers=workers)
        k += n


def _warmup_head(cfg: PipelineConfig, backbone: nn.Module, head: nn.Module, task: str, lr: float, wd: float) -> float:
    """Train ``head`` on frozen features of a copy of ``backbone``; return the last loss.

    ``head_warmup_mode="train"`` (authors): train mode (batch statistics), train transform;
    ``"eval"``: eval mode, eval transform. ``backbone`` itself is never modified.
    """
    b, m = cfg.bissl, cfg.model
    tf = train_transform if b.head_warmup_mode == "train" else eval_transform
    ds = _upper_data(cfg, task, tf(m.image_size, m.in_channels))
    device = next(head.parameters()).device
    loader = DataLoader(
        ds,
        batch_size=min(b.downstream_batch, len(ds)),
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
        num_workers=cfg.num_workers,
    )
    frozen = copy.deepcopy(backbone)
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen.train(b.head_warmup_mode == "train")
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=b.momentum, weight_decay=wd)
    model = nn.Sequential(frozen, head)
    loss = float("nan")
    for _ in tqdm(
        range(b.head_warmup_epochs), desc="head warm-up", leave=False, disable=not dist_utils.is_main_process()
    ):
        loss, _finite = supervised_epoch(
            model, loader, opt, device, after_backward=lambda: dist_utils.average_gradients(head.parameters())
        )
    return loss


def _upper_data(cfg: PipelineConfig, task: str, transform: Any) -> Dataset:
    """The labelled images the stage may see: the ``train`` part of the shared split (or all)."""
    m = cfg.model
    if cfg.bissl.upper_split == "train":
        return task_split(cfg, task, transform, save=dist_utils.is_main_process())[0]
    return build_task(
        task, cfg.data_root, "train", transform, image_size=m.image_size, max_samples=cfg.max_train_samples
    )


def _pretrain_epochs(pre: dict, cfg: PipelineConfig) -> int:
    """Epochs the pretraining stream already used (from the checkpoint, else the configuration)."""
    pc = pre.get("pretrain_config")
    if isinstance(pc, dict) and isinstance(pc.get("epochs"), int):
        return pc["epochs"]
    return cfg.pretrain.epochs


def _all_reduce(value: float, op: str) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if op == "mean":
        return float(all_reduce_mean({"v": t})["v"])
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t)


def summarize(history: list[dict[str, float]], arm: str = "bissl") -> dict[str, Any]:
    """Totals over the per-alternation rows of a stage (what ``summary.json`` holds).

    Example:
        >>> s = summarize([{"solves": 4, "solves_failed": 1, "upper_steps_skipped": 0, "proximal_share": 0.1}])
        >>> s["solves_failed_frac"], s["final_proximal_share"]
        (0.25, 0.1)
    """
    solves = sum(r.get("solves", 0) for r in history)
    failed = sum(r.get("solves_failed", 0) for r in history)
    last = history[-1] if history else {}
    return {
        "arm": arm,
        "alternations": len(history),
        "solves": solves,
        "solves_failed": failed,
        "solves_failed_frac": failed / solves if solves else 0.0,
        "upper_steps_skipped": sum(r.get("upper_steps_skipped", 0) for r in history),
        "final_proximal_share": last.get("proximal_share", float("nan")),
        "final_distance": last.get("distance", float("nan")),
        "final_damping": last.get("damping", float("nan")),
        "final_lam": last.get("lam", float("nan")),
    }


def run_bissl(
    cfg: PipelineConfig,
    pretrained_path: str,
    out_dir: str | None = None,
    *,
    resume: bool = True,
    arm: str = "bissl",
) -> str:
    """Run the BiSSL stage (or its control arm) for ``cfg.bissl.downstream``; return the lower backbone's path.

    Args:
        cfg: the pipeline configuration (``cfg.bissl`` holds this stage's settings).
        pretrained_path: the pretext checkpoint (dict with ``backbone``, ``projector`` and for BYOL
            ``predictor`` state dicts).
        out_dir: output directory (default :func:`stage_dir`).
        resume: continue from ``<out_dir>/checkpoint.pt`` when it exists.
        arm: ``"bissl"`` or ``"control"`` (the same lower steps, no upper level, no proximal term).

    Raises:
        RuntimeError: every upper step of the run was skipped (non-finite values); the message says why.
    """
    if arm not in ARMS:
        raise ValueError(f"`arm` must be one of {ARMS}, got {arm!r}.")
    b, kind = cfg.bissl, cfg.pretrain.pretext_type
    if b.fsdp:
        check_fsdp()  # a process group (torchrun) before anything is loaded
    dev = dist_utils.device_of(cfg)
    task = b.downstream
    out_dir = out_dir or stage_dir(cfg, task, arm)
    main = dist_utils.is_main_process()
    pre = pretext_checkpoint(pretrained_path)
    torch.manual_seed(cfg.seed)
    upper_lr, upper_wd = upper_hparams(parse_task(task).dataset, kind)
    upper_lr = b.upper_lr if b.upper_lr is not None else upper_lr
    upper_wd = b.upper_wd if b.upper_wd is not None else upper_wd

    ssl = build_pretrain_model(cfg)
    for part in ("backbone", "projector", "predictor"):
        if getattr(ssl, part) is not None:
            if pre.get(part) is None:
                raise ValueError(
                    f"pretext checkpoint {pretrained_path!r} has no {part!r} (pretext type other than "
                    f"{kind!r}?): pass --p-pretext-type as it was pretrained."
                )
            load_into(getattr(ssl, part), pre[part], f"the {part}", pretrained_path)
    ssl.to(dev)
    ssl.reset_target()  # BYOL: the target is re-created from the online network when the stage starts
    upper = copy.deepcopy(ssl.backbone)
    head = LinearHead(ssl.projector[0].in_features, task_classes(task, cfg.data_root)).to(dev)

    m = cfg.model
    pre_ds: TwoViewDataset = pretext_dataset(cfg)
    epoch0 = _pretrain_epochs(pre, cfg) if b.continue_stream else 0
    down_ds = _upper_data(cfg, task, train_transform(m.image_size, m.in_channels)) if arm == "bissl" else None

    run = StageRun(
        out_dir, log_dir=os.path.join(cfg.logs, arm, task.replace("@", "_at")), tensorboard=True, resume=resume
    )
    twin = None
    if b.fsdp:  # --fsdp: shard the backbones (the heads stay replicated), see applications/bissl/fsdp.py
        check_fsdp_fresh(run)
        if arm == "bissl":  # on the unsharded backbone (a frozen copy), as without --fsdp
            _warmup_head(cfg, upper, head, task, upper_lr, upper_wd)
        uses_fd = b.method.hvp_mode == "finite_diff" and not isinstance(b.method.solver, Identity)
        if arm == "bissl" and uses_fd:  # (Identity takes no Hessian product)
            warn_kinked_fd(ssl.backbone)
        shard_stage(ssl, upper, fsdp_mesh(dev))
        if b.method.hvp_mode != "finite_diff":  # exact products on the gathered weights (applications/bissl/fsdp.py)
            twin = dense_twin(cfg)
            b = dataclasses.replace(b, method=exact_method(b.method))
    lower_opt = LARS(
        [p for p in ssl.parameters() if p.requires_grad],
        lr=b.lower_lr,
        weight_decay=b.lower_wd,
        momentum=b.momentum,
        exclude_bias_and_norm=b.lars_exclude_1d,
    )
    upper_opt = torch.optim.SGD(  # sharded and plain tensors in separate groups (CUDA's foreach step)
        param_groups([*upper.parameters(), *head.parameters()]), lr=upper_lr, momentum=b.momentum, weight_decay=upper_wd
    )
    lower_sched, upper_sched = stage_schedules(b, lower_opt, upper_opt)
    problem = build_problem(
        ssl,
        upper,
        head,
        b,
        lower_opt=lower_opt,
        upper_opt=upper_opt,
        lower_sched=lower_sched,
        upper_sched=upper_sched,
        dense_inner=twin,
    )
    lam, damping = b.method.lam, b.method.damping

    ckpt_path = run.checkpoint_path
    start, history = 0, []
    # what the saved progress depends on: a re-run with other settings or another pretext checkpoint
    # is refused (never continued from, or reported as, the old run's state)
    full = cfg.to_dict()
    settings = run_settings(
        arm=arm,
        **{k: full[k] for k in ("model", "pretrain", "bissl", "seed", "max_train_samples")},
        pretrained=file_digest(pretrained_path),
    )
    if run.resumable:
        st = read_checkpoint(ckpt_path, "stage checkpoint", "Pass --no-resume to start the stage afresh.")
        check_same_settings(st.get("settings") if isinstance(st, dict) else None, settings, ckpt_path)
        try:
            problem.load_state_dict(st["problem"])
            if "rng" in st:  # saved next to the problem's state (hypergrad keeps no RNG in state_dict)
                set_rng_state(st["rng"])
            start, history = int(st["alternation"]), list(st.get("history", []))
            lam, damping = float(st.get("lam", lam)), float(st.get("damping", damping))
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"stage checkpoint {ckpt_path!r} does not match this run ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:160] if str(err) else ''}); pass --no-resume to start the stage afresh."
            ) from err
    elif arm == "bissl" and not b.fsdp:
        _warmup_head(cfg, upper, head, task, upper_lr, upper_wd)  # backbone frozen, SGD with the upper lr/wd

    bar = run.bar(range(start, b.alternations), desc=f"{arm} {task}", initial=start, total=b.alternations)
    skipped_reasons: list[str] = []
    run_upper = 0
    for alt in bar:
        t0 = time.perf_counter()
        if arm == "bissl" and (lam, damping) != (problem.method.lam, problem.method.damping):
            problem.method = dataclasses.replace(problem.method, lam=lam, damping=damping)
        pre_it = _batches(
            pre_ds, alt * (b.lower_steps + 1), b.lower_steps + 1, b.pretext_batch, cfg.seed, cfg.num_workers, epoch0
        )
        ssl.train()
        inner_losses: list[float] = []
        for _ in range(b.lower_steps):
            x1, x2 = (v.to(dev) for v in next(pre_it))
            if arm == "bissl":
                inner_losses += problem.inner_step((x1, x2)).inner_losses
            else:
                inner_losses.append(_plain_lower_step(ssl, (x1, x2), lower_opt, lower_sched, b.clip_norm))
            ssl.update_target()  # BYOL EMA after every lower step; Hessian passes never touch it
        # One pretext batch for every Hessian product of this alternation, declared once: the
        # operator can be reused across the upper steps when `reuse_operator` is on.
        x1, x2 = (v.to(dev) for v in next(pre_it))
        h_batch = PretextBatch(x1, x2, local_negatives=True)
        t_low = time.perf_counter() - t0
        row: dict[str, float] = {"lower_loss": inner_losses[-1], "lower_lr": lower_sched.get_last_lr()[0]}
        gnorm = _all_reduce(
            sharded_pretext_grad_norm(ssl, x1, x2) if b.fsdp else pretext_grad_norm(ssl, x1, x2), "mean"
        )
        dist = param_distance(ssl.backbone, upper)
        row.update(pretext_grad_norm=gnorm, distance=dist, lam=lam, proximal_share=proximal_share(lam, dist, gnorm))
        if arm == "bissl":
            if b.damping_mode == "adaptive":
                lo, hi = hessian_extremes(ssl, x1, x2, b.curvature_steps, seed=cfg.seed + alt)
                lo = _all_reduce(lo, "min")
                damping = adaptive_damping(lo, lam, b.method.damping, b.damping_margin)
                problem.method = dataclasses.replace(problem.method, damping=damping)
                row.update(ritz_min=lo, ritz_max=hi)
            row["damping"] = damping
            row.update(_upper_steps(problem, b, down_ds, h_batch, alt, cfg, dev, skipped_reasons))
            row["upper_lr"] = upper_sched.get_last_lr()[0]
            run_upper += b.upper_steps
            if b.lam_mode == "target_share":  # the next alternation's lambda (theta_D moved: re-measure)
                lam = target_lam(b.target_share, gnorm, param_distance(ssl.backbone, upper), b.method.lam, b.lam_max)
        row.update(time_lower_s=t_low, time_s=time.perf_counter() - t0)
        history.append(row)
        run.log(alt, row)
        bar.set_postfix(
            lower=f"{row['lower_loss']:.3f}",
            upper=f"{row.get('upper_loss', float('nan')):.3f}",
            failed=f"{row.get('solves_failed_frac', 0.0):.2f}",
        )
        if b.fsdp:
            continue  # no stage checkpoint under --fsdp (see the refusal of resume above)
        run.save(
            lambda: {
                "alternation": alt + 1,
                "problem": problem.state_dict(),
                "history": history,
                "lam": lam,
                "damping": damping,
                "rng": get_rng_state(),
                "settings": settings,
            }
        )
    run.close()
    if b.fsdp:  # gathered on every rank (a collective), written by the main process
        parts = {"backbone": full_state_dict(ssl.backbone), "upper_backbone": full_state_dict(upper)}
        out_path = run.save({**parts, "head": head.state_dict()}, "lower_backbone.pt")
    else:
        out_path = run.save(
            lambda: {
                "backbone": ssl.backbone.state_dict(),
                "upper_backbone": upper.state_dict(),
                "head": head.state_dict(),
            },
            "lower_backbone.pt",
        )
    summary = summarize(history, arm)
    run.write_json("summary.json", summary)
    if main and summary["solves_failed"]:
        print(
            f"[bissl] warning: {summary['solves_failed']} of {summary['solves']} implicit-gradient solves failed "
            f"({100 * summary['solves_failed_frac']:.0f} %; e.g. I + H/(lam+damping) not positive definite); "
            "their steps were applied as the authors do. "
            + (
                "Use more --damping to avoid it (--damping-mode adaptive is not available with --fsdp)."
                if b.fsdp
                else "Use --damping-mode adaptive (or more damping) to avoid it."
            ),
            file=sys.stderr,
        )
    dist_utils.barrier()
    if run_upper and len(skipped_reasons) >= run_upper:
        raise RuntimeError(
            f"every one of the {run_upper} upper steps of the BiSSL stage was skipped ({skipped_reasons[-1]}); "
            "theta_D was never updated. Check --gamma, --upper-lr/--upper-wd and the data for non-finite values."
        )
    return out_path


def _plain_lower_step(ssl: nn.Module, batch: tuple, opt: torch.optim.Optimizer, sched: Any, clip: float) -> float:
    """One step of continued pretraining (the control arm): the pretext loss alone, clipped, LARS."""
    loss = inner_loss(ssl, None, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in ssl.parameters() if p.grad is not None]
    dist_utils.average_gradients(params)  # the replicated ones (FSDP2 averaged the sharded ones)
    sharded_clip_grad_norm_(params, clip)  # torch.nn.utils.clip_grad_norm_ when nothing is sharded
    opt.step()
    sched.step()
    return float(loss.detach())


def _upper_steps(problem, b, down_ds, h_batch, alt, cfg, dev, skipped_reasons: list[str]) -> dict[str, float]:
    """The ``upper_steps`` upper steps of one alternation; returns their diagnostics.

    ``solves_failed`` counts solves whose status is a failure (their steps are applied, as the
    authors do, but never silently: the fraction is logged); ``upper_steps_skipped`` counts steps
    the problem refused (non-finite hypergradient), whose reasons go to ``skipped_reasons``.
    """
    down_it = _batches(down_ds, alt * b.upper_steps, b.upper_steps, b.downstream_batch, cfg.seed + 1, cfg.num_workers)
    hvps, losses, res, failed, solves, skipped = 0, [], float("nan"), 0, 0, 0
    # One Hessian batch for the whole alternation, declared once: with `reuse_operator` the
    # linearisation (and a recycling solver's basis) serves every upper step.
    problem.new_hessian_batch(h_batch)
    for _ in range(b.upper_steps):
        x, y = next(down_it)
        rec = problem.hypergradient((x.to(dev), y.to(dev)))
        out = problem.outer_step()
        hvps += rec.num_hvps
        if rec.outer_loss is not None:
            losses.append(rec.outer_loss)
        if rec.solve is not None:
            solves += 1
            res = rec.solve.residual_norm if rec.solve.residual_norm is not None else res
            failed += int(rec.solve.failed)  # e.g. negative curvature: I + H/lam_e not positive definite
        for r in (rec, out):
            if getattr(r, "skipped", False):
                skipped += 1
                skipped_reasons.append(str(r.reason))
                break
    return {
        "upper_loss": losses[-1] if losses else float("nan"),
        "hvps": hvps,
        "residual_last": res,
        "solves": solves,
        "solves_failed": failed,
        "solves_failed_frac": failed / solves if solves else 0.0,
        "upper_steps_skipped": skipped,
    }
