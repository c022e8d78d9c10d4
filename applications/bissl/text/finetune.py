r"""Fine-tuning protocol for text: the image path's random search and seeded runs, on a text classifier.

The classifier is the backbone (full parameters, or its LoRA adapters with ``--lora-rank``) plus a
fresh linear head on mean-pooled hidden states, trained with SGD (momentum 0.9, cosine to 0, no
warm-up). Hyper-parameters come from :func:`applications.bissl.finetune.random_search` over
:func:`applications.bissl.finetune.sample_trials` (lr log-uniform in ``lr_range``, wd in
``wd_range``), each trial trained on a seeded split of the training set and scored on the held-out
validation part (``val_fraction``); then ``num_runs`` runs with seeds ``0..R-1`` on the full
training set report test top-1. The baseline starts from the pretrained backbone (``origin="pretext"``),
BiSSL from the stage's lower backbone :math:`\theta_P` (``origin="bissl"``).
"""

from __future__ import annotations

import json
import os
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import read_checkpoint
from ..config import FinetuneConfig
from ..finetune import Trial, random_search, sample_trials
from ..models import LinearHead
from .config import TextConfig
from .setup import TaskTensors, device_of, load_lm, maybe_lora, task_tensors

__all__ = ["ORIGINS", "STATE_KIND", "hpo_split", "evaluate_text", "train_text_classifier", "finetune_text"]

#: backbones the text protocol fine-tunes (the image path's ``control`` arm has no text version).
ORIGINS = ("pretext", "bissl")
#: ``hypergrad.save_checkpoint`` kind of the text BiSSL stage's output ``lower_backbone.pt``.
STATE_KIND = "text-bissl-state"


def hpo_split(n: int, ft: FinetuneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)`` indices of a task's ``n`` training documents: the one seeded split of the text path.

    Fine-tuning's random search trains on ``train`` and scores on ``val``; the BiSSL stage's upper
    level and head warm-up see only ``train`` (``upper_split="train"``), so the documents that select
    the hyper-parameters stay unseen before fine-tuning.

    Example:
        >>> tr, val = hpo_split(10, FinetuneConfig(val_fraction=0.2, seed=0))
        >>> len(tr), len(val), sorted(set(tr.tolist()) | set(val.tolist())) == list(range(10))
        (8, 2, True)
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(ft.seed))
    k = max(1, int(round(n * ft.val_fraction)))
    return perm[k:], perm[:k]


@torch.no_grad()
def evaluate_text(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 128) -> float:
    """Top-1 accuracy (%) of ``model`` on ids ``x`` with labels ``y``."""
    dev = next(model.parameters()).device
    model.eval()
    correct = sum(
        int((model(x[i : i + batch].to(dev)).argmax(1).cpu() == y[i : i + batch]).sum())
        for i in range(0, len(y), batch)
    )
    return 100.0 * correct / max(len(y), 1)


def train_text_classifier(
    backbone: nn.Module,
    n_classes: int,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    epochs: int,
    batch_size: int,
    momentum: float,
    seed: int,
) -> nn.Module:
    """Fine-tune a copy of ``backbone`` (its trainable parameters) plus a new linear head; return the classifier."""
    import copy

    torch.manual_seed(seed)
    dev = next(backbone.parameters()).device
    model = nn.Sequential(copy.deepcopy(backbone), LinearHead(backbone.out_dim, n_classes)).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    b = min(batch_size, len(y))
    steps_per_epoch = max(1, len(y) // b)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * b : (i + 1) * b]
            loss = F.cross_entropy(model(x[idx].to(dev)), y[idx].to(dev))
            if not torch.isfinite(loss):
                return model  # diverged: scored as NaN by the caller
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model


def _backbone(cfg: TextConfig, pretrain_dir: str, state_path: str | None):
    _, lm, tok = load_lm(cfg, pretrain_dir)
    maybe_lora(cfg, lm)
    if state_path is not None:
        st = read_checkpoint(state_path, "text BiSSL state", "Pass the text `bissl` stage's lower_backbone.pt.")
        if not isinstance(st, dict) or "backbone" not in st or "lm_head" not in st:
            raise ValueError(
                f"{state_path!r} is not the text BiSSL stage's output (no 'backbone' / 'lm_head'); pass its "
                "lower_backbone.pt (--backbone)."
            )
        lm.backbone.load_state_dict(st["backbone"])
    return lm.backbone.to(device_of(cfg)), tok


def finetune_text(
    cfg: TextConfig,
    task: str,
    origin: str,
    pretrain_dir: str,
    bissl_state: str | None = None,
    out_dir: str | None = None,
    *,
    use_hpo: bool = True,
    data: TaskTensors | None = None,
) -> dict:
    """The protocol for one task and origin; returns the image path's result dict.

    Args:
        cfg: the text configuration (``cfg.finetune`` holds the protocol).
        task: task spec; origin: ``"pretext"`` (baseline) or ``"bissl"``.
        pretrain_dir: the pretrained model folder (architecture, tokenizer, baseline weights).
        bissl_state: ``lower_backbone.pt`` of the BiSSL stage (required for ``origin="bissl"``).
        out_dir: where ``result.json`` goes (default ``run_dir/finetune/<task>/<origin>``).
        use_hpo: random search; otherwise ``cfg.finetune.lr`` / ``weight_decay``.
        data: the encoded task (loaded when ``None``).

    Returns:
        ``{"task", "origin", "lr", "weight_decay", "trials", "test_top1", "mean", "std"}``.
    """
    if origin not in ORIGINS:
        raise ValueError(f"`origin` must be one of {ORIGINS} (--backbone-origin), got {origin!r}.")
    if origin == "bissl" and (bissl_state is None or not os.path.exists(bissl_state)):
        raise FileNotFoundError(
            f"BiSSL state {bissl_state!r} not found; run the `bissl` stage first (or pass --backbone)."
        )
    ft = cfg.finetune
    backbone, tok = _backbone(cfg, pretrain_dir, bissl_state if origin == "bissl" else None)
    data = data or task_tensors(cfg, task, tok)
    n_cls = data.task.num_classes
    common = dict(epochs=ft.epochs, batch_size=ft.batch_size, momentum=ft.momentum)
    lr, wd, scored = ft.lr, ft.weight_decay, []
    if use_hpo and ft.hpo_trials > 0:
        tr, val = hpo_split(len(data.y_train), ft)

        def objective(lr_: float, wd_: float) -> float:
            model = train_text_classifier(
                backbone,
                n_cls,
                data.x_train[tr],
                data.y_train[tr],
                lr=lr_,
                weight_decay=wd_,
                seed=ft.seed,
                **{**common, "epochs": ft.hpo_epochs or ft.epochs},
            )
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                return float("nan")
            return evaluate_text(model, data.x_train[val], data.y_train[val])

        best, scored = random_search(objective, sample_trials(ft.hpo_trials, ft.lr_range, ft.wd_range, ft.seed))
        lr, wd = best.lr, best.weight_decay
    accs = []
    for seed in range(ft.num_runs):
        model = train_text_classifier(
            backbone, n_cls, data.x_train, data.y_train, lr=lr, weight_decay=wd, seed=seed, **common
        )
        accs.append(evaluate_text(model, data.x_test, data.y_test))
    result = {
        "task": task,
        "origin": origin,
        "lr": lr,
        "weight_decay": wd,
        "trials": [t._asdict() for t in scored if isinstance(t, Trial)],
        "test_top1": accs,
        "mean": statistics.fmean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
    }
    out_dir = out_dir or os.path.join(cfg.variant_dir, "finetune", task.replace(":", "_"), origin)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result
