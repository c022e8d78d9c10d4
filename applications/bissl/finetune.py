r"""Fine-tuning, the BiSSL evaluation protocol: random-search HPO, then seeded runs.

Full fine-tuning of backbone + linear head with SGD (momentum 0.9), cosine learning-rate decay
per step and no warm-up. Hyper-parameters are chosen by random search,

.. math:: \log \text{lr} \sim \mathcal U[\log 10^{-4}, \log 1],\qquad
          \log \text{wd} \sim \mathcal U[\log 10^{-5}, \log 10^{-2}],

each trial trained on the `train` part of the shared split (:mod:`applications.bissl.splits`, the
only labelled images the BiSSL stage saw) and scored by top-1 accuracy on its
held-out validation part; then ``num_runs`` runs with seeds ``0..R-1`` are trained on the full
training set at the chosen values and their test top-1 is reported as mean :math:`\pm` std.
The backbone comes from the pretext stage (``origin="pretext"``, the baseline) or from the BiSSL
stage (``origin="bissl"``, its lower backbone :math:`\theta_P`). Progress is saved after every
trial and run to ``state.json``, so an interrupted job resumes where it stopped; the file records
the settings and the backbone file it was computed with, and a re-run with others is refused
(``resume=False`` starts afresh).
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .augment import eval_transform, train_transform
from .checkpoints import check_same_settings, file_digest, load_into, read_checkpoint, run_settings
from .config import FinetuneConfig, PipelineConfig
from .models import LinearHead, build_backbone
from .splits import task_split
from .stage_run import StageRun
from .supervised import supervised_epoch
from .tasks import build_task, task_classes, with_inversion

__all__ = ["Trial", "sample_trials", "random_search", "train_classifier", "evaluate", "finetune", "load_backbone"]

ORIGINS = ("pretext", "control", "bissl")


class Trial(NamedTuple):
    """One HPO trial: its hyper-parameters and validation top-1 (``nan`` until scored)."""

    lr: float
    weight_decay: float
    score: float = float("nan")


def sample_trials(n: int, lr_range: tuple[float, float], wd_range: tuple[float, float], seed: int) -> list[Trial]:
    """``n`` log-uniform ``(lr, wd)`` draws from a generator seeded with ``seed``.

    Example:
        >>> t = sample_trials(3, (1e-4, 1.0), (1e-5, 1e-2), seed=0)
        >>> all(1e-4 <= x.lr <= 1.0 and 1e-5 <= x.weight_decay <= 1e-2 for x in t)
        True
        >>> t == sample_trials(3, (1e-4, 1.0), (1e-5, 1e-2), seed=0)
        True
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lr = math.exp(rng.uniform(math.log(lr_range[0]), math.log(lr_range[1])))
        wd = math.exp(rng.uniform(math.log(wd_range[0]), math.log(wd_range[1])))
        out.append(Trial(lr, wd))
    return out


def random_search(
    objective: Callable[[float, float], float],
    trials: list[Trial],
    done: list[Trial] | None = None,
    on_trial: Callable[[list[Trial]], None] | None = None,
) -> tuple[Trial, list[Trial]]:
    """Score every trial with ``objective(lr, wd)`` (higher is better); return the best and all.

    Trials already in ``done`` (same order, from a previous interrupted run) are not re-run.
    Ties go to the earlier trial; a NaN score never wins.

    Example:
        >>> best, _ = random_search(lambda lr, wd: -abs(lr - 0.1), [Trial(1.0, 0.0), Trial(0.09, 0.0)])
        >>> best.lr
        0.09
    """
    scored = list(done or [])
    for t in tqdm(trials[len(scored) :], desc="hpo", leave=False, initial=len(scored), total=len(trials)):
        scored.append(t._replace(score=float(objective(t.lr, t.weight_decay))))
        if on_trial is not None:
            on_trial(scored)
    valid = [t for t in scored if not math.isnan(t.score)]
    if not valid:
        raise RuntimeError("Every HPO trial diverged (NaN score); narrow `lr_range`.")
    best = max(valid, key=lambda t: t.score)  # max() keeps the first of equal scores
    return best, scored


def load_backbone(cfg: PipelineConfig, path: str | None) -> tuple[nn.Module, int]:
    """Build the configured backbone and load ``path`` (a state dict or a checkpoint with ``backbone``)."""
    m = cfg.model
    backbone, feat_dim = build_backbone(m.arch, small_stem=m.small_stem, width=m.width, in_channels=m.in_channels)
    if path is not None:
        state = read_checkpoint(path, "backbone checkpoint")
        state = state.get("backbone", state) if isinstance(state, dict) else state
        load_into(backbone, state, "the backbone", path)
    return backbone, feat_dim


def evaluate(model: nn.Module, loader: DataLoader, device: str) -> float:
    """Top-1 accuracy (%) of ``model`` on ``loader``."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            pred = model(x.to(device)).argmax(1)
            correct += int((pred.cpu() == y).sum())
            total += len(y)
    return 100.0 * correct / max(total, 1)


def train_classifier(
    backbone_state: dict,
    cfg: PipelineConfig,
    n_classes: int,
    train: Dataset,
    *,
    lr: float,
    weight_decay: float,
    epochs: int,
    seed: int,
    desc: str = "finetune",
) -> nn.Module:
    """Fine-tune a fresh copy of the backbone plus a new linear head; return the classifier.

    SGD (momentum ``cfg.finetune.momentum``), cosine decay to 0 per step, no warm-up.
    """
    torch.manual_seed(seed)
    backbone, feat_dim = load_backbone(cfg, None)
    backbone.load_state_dict(backbone_state)
    model = nn.Sequential(backbone, LinearHead(feat_dim, n_classes)).to(cfg.device)
    ft = cfg.finetune
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        train,
        batch_size=min(ft.batch_size, len(train)),
        shuffle=True,
        drop_last=len(train) > ft.batch_size,
        generator=g,
        num_workers=cfg.num_workers,
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=ft.momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        model.train()
        _, finite = supervised_epoch(model, loader, opt, cfg.device, scheduler=sched)
        if not finite:
            return model  # diverged: the evaluation will score it at chance level or NaN
    return model


def finetune(
    cfg: PipelineConfig,
    task: str,
    origin: str,
    backbone_path: str,
    out_dir: str | None = None,
    *,
    use_hpo: bool = True,
    logger: Callable[[dict], None] | None = None,
    resume: bool = True,
) -> dict:
    """Run the fine-tuning protocol for one task and one backbone origin.

    Args:
        cfg: pipeline configuration (``cfg.finetune`` holds the protocol settings).
        task: task spec (see :mod:`applications.bissl.tasks`).
        origin: ``"pretext"`` (baseline) or ``"bissl"``; recorded in the result.
        backbone_path: the backbone state dict to start from.
        out_dir: where ``state.json`` / ``result.json`` go (default ``run_dir/finetune/<task>/<origin>``).
        use_hpo: run the random search; otherwise use ``cfg.finetune.lr`` / ``weight_decay``.
        logger: called with a dict of metrics after every trial and run (besides the CSV / JSONL /
            TensorBoard files under ``<logs>/finetune/<task>/<origin>``: HPO trials are steps
            ``0..T-1``, seeded runs steps ``T..T+R-1``).
        resume: continue from ``state.json`` when it exists (written with the same settings and
            backbone, else :class:`ValueError`); ``False`` starts afresh.

    Returns:
        ``{"task", "origin", "lr", "weight_decay", "trials", "test_top1", "mean", "std"}``.
    """
    if origin not in ORIGINS:
        raise ValueError(f"`origin` must be one of {ORIGINS} (--backbone-origin), got {origin!r}.")
    if not os.path.exists(backbone_path):
        raise FileNotFoundError(
            f"Backbone {backbone_path!r} does not exist; run the "
            f"{'pretrain' if origin == 'pretext' else 'bissl'} stage first (or pass its path; the control arm is "
            "`bissl --arm control`)."
        )
    backbone, _ = load_backbone(cfg, backbone_path)  # a bad file is refused before anything is written
    ft: FinetuneConfig = cfg.finetune
    name = task.replace("@", "_at")
    out_dir = out_dir or os.path.join(cfg.run_dir, "finetune", name, origin)
    # fine-tuning runs on the main process only: no barriers
    run = StageRun(
        out_dir,
        log_dir=os.path.join(cfg.logs, "finetune", name, origin),
        tensorboard=True,
        resume=resume,
        synchronized=False,
    )
    # what the saved trials and runs depend on (more --num-runs extends them: seeds 0..R-1)
    fine = {k: v for k, v in cfg.to_dict()["finetune"].items() if k != "num_runs"}
    settings = run_settings(
        task=task,
        origin=origin,
        use_hpo=use_hpo,
        finetune=fine,
        model=cfg.to_dict()["model"],
        seed=cfg.seed,
        max_train_samples=cfg.max_train_samples,
        max_test_samples=cfg.max_test_samples,
        backbone=file_digest(backbone_path),
    )
    state = run.read_json("state.json") or {"trials": [], "runs": [], "settings": settings}
    check_same_settings(state.get("settings"), settings, run.path("state.json"))
    state["settings"] = settings

    def save() -> None:
        run.write_json("state.json", state)

    bstate = {k: v.clone() for k, v in backbone.state_dict().items()}
    m = cfg.model
    n_cls = task_classes(task, cfg.data_root)
    tr_tf, ev_tf = train_transform(m.image_size, m.in_channels), eval_transform(m.image_size, m.in_channels)
    cap = cfg.max_train_samples
    train_aug = build_task(task, cfg.data_root, "train", tr_tf, image_size=m.image_size, max_samples=cap)
    test_cap = cfg.max_test_samples if cfg.max_test_samples is not None else cap
    test = build_task(task, cfg.data_root, "test", ev_tf, image_size=m.image_size, max_samples=test_cap)
    test_loader = DataLoader(test, batch_size=512, num_workers=cfg.num_workers)

    lr, wd = ft.lr, ft.weight_decay
    if use_hpo and ft.hpo_trials > 0:
        # The shared split (the BiSSL stage's upper level saw only `hpo_train`): same indices.
        hpo_train, hpo_val = task_split(cfg, task, tr_tf)
        hpo_val = hpo_val.with_transform(with_inversion(task, ev_tf))
        val_loader = DataLoader(hpo_val, batch_size=512, num_workers=cfg.num_workers)

        def objective(lr_: float, wd_: float) -> float:
            model = train_classifier(
                bstate,
                cfg,
                n_cls,
                hpo_train,
                lr=lr_,
                weight_decay=wd_,
                epochs=ft.hpo_epochs or ft.epochs,
                seed=ft.seed,
                desc="trial",
            )
            acc = evaluate(model, val_loader, cfg.device)
            return acc if all(torch.isfinite(p).all() for p in model.parameters()) else float("nan")

        def on_trial(scored: list[Trial]) -> None:
            state["trials"] = [t._asdict() for t in scored]
            save()
            t = scored[-1]
            run.log(len(scored) - 1, {"hpo_val_top1": t.score, "hpo_lr": t.lr, "hpo_weight_decay": t.weight_decay})
            if logger is not None:
                logger({"phase": "hpo", "trial": len(scored) - 1, **t._asdict()})

        trials = sample_trials(ft.hpo_trials, ft.lr_range, ft.wd_range, ft.seed)
        done = [Trial(**t) for t in state["trials"]]
        best, scored = random_search(objective, trials, done, on_trial)
        lr, wd = best.lr, best.weight_decay
        state["trials"] = [t._asdict() for t in scored]
    state["lr"], state["weight_decay"] = lr, wd
    save()
    for seed in run.bar(range(len(state["runs"]), ft.num_runs), desc=f"runs {task}/{origin}", leave=False):
        model = train_classifier(
            bstate, cfg, n_cls, train_aug, lr=lr, weight_decay=wd, epochs=ft.epochs, seed=seed, desc=f"run {seed}"
        )
        acc = evaluate(model, test_loader, cfg.device)
        state["runs"].append(acc)
        save()
        run.log(ft.hpo_trials + seed, {"run_seed": seed, "test_top1": acc, "lr": lr, "weight_decay": wd})
        if logger is not None:
            logger({"phase": "run", "seed": seed, "test_top1": acc, "lr": lr, "weight_decay": wd})
    run.close()
    accs = state["runs"][: ft.num_runs]  # a smaller --num-runs than before reports that many
    result = {
        "task": task,
        "origin": origin,
        "lr": lr,
        "weight_decay": wd,
        "trials": state["trials"],
        "test_top1": accs,
        "mean": statistics.fmean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
    }
    run.write_json("result.json", result)
    return result
