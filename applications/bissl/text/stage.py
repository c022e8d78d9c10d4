r"""The text BiSSL stage: head warm-up, then alternations of lower and upper steps.

The bilevel step is the image path's: :func:`applications.bissl.bilevel.build_problem` builds the
:class:`hypergrad.BilevelProblem` with :class:`hypergrad.Proximal` coupling ``{"backbone": "backbone"}``;
here the lower module is a :class:`~applications.bissl.text.model.PretextLM` (backbone
:math:`\theta_P` + untied LM head, loss :math:`L_P` = next-token cross-entropy on a pretext batch
``(inputs, targets)``), the upper level is :math:`\theta_D` (a copy of the backbone) and the linear
head :math:`\phi` on mean-pooled hidden states. The upper gradient hypergrad writes into
:math:`\theta_D` is

.. math::

    g_{\theta_D} = \lambda_e (H + \lambda_e I)^{-1} \nabla_{\theta_P} L_D(\theta_P, \phi)
                   + \gamma \nabla_{\theta_D} L_D(\theta_D, \phi),\qquad \lambda_e = \lambda + \text{damping},

with :math:`H = \nabla^2_{\theta_P} L_P` over the coupled parameters (the whole backbone, or only
its LoRA adapters with ``--lora-rank``) on one pretext batch per alternation.

Text-specific choices: the lower optimiser is AdamW (``lower_lr``, ``lower_wd``; warm-up + cosine),
the upper one SGD as in the image path; the head warm-up trains :math:`\phi` on features computed
once (no augmentation in text, so the frozen backbone's features do not change between epochs).
Attention: the model keeps ``F.scaled_dot_product_attention``; hypergrad runs every second-order pass
(HVPs, solves) under ``sdpa_kernel(SDPBackend.MATH)``, the backend with forward-mode AD and double
backward (the fused CPU / GPU kernels have neither), and every first-order pass on the fast kernel.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hypergrad import Identity, load_checkpoint
from hypergrad.distributed import world_size

from .. import distributed as dist_utils
from ..bilevel import PretextBatch, build_problem, stage_schedules
from ..checkpoints import check_same_settings, file_digest, run_settings
from ..config import BiSSLConfig
from ..fsdp import (
    check_fsdp,
    check_fsdp_fresh,
    exact_method,
    fsdp_mesh,
    full_state_dict,
    param_groups,
    warn_kinked_fd,
)
from ..models import LinearHead
from ..pretrain import epoch_batches
from ..stage_run import StageRun
from .config import TextConfig
from .finetune import STATE_KIND, hpo_split
from .fsdp import shard_text_stage, text_dense_twin
from .pretext import bits_per_token, corpus_ids, lm_batch
from .setup import device_of, load_lm, maybe_lora, task_tensors

__all__ = ["CHECKPOINT_KIND", "check_text_bissl", "downstream_batch", "warmup_head", "bissl_text", "math_attention"]

#: ``hypergrad.save_checkpoint`` kind of the stage's resume file ``checkpoint.pt``.
CHECKPOINT_KIND = "text-bissl-checkpoint"


def check_text_bissl(b: BiSSLConfig) -> None:
    """Refuse :class:`~applications.bissl.config.BiSSLConfig` settings the text stage does not implement.

    The text stage runs the paper's constant ``lam`` and ``damping``, the AdamW lower level, and the
    eval-mode head warm-up on features computed once; anything else would be silently ignored.

    Example:
        >>> check_text_bissl(BiSSLConfig(head_warmup_mode="eval"))
        >>> check_text_bissl(BiSSLConfig(head_warmup_mode="eval", damping_mode="adaptive"))
        Traceback (most recent call last):
        ...
        ValueError: text BiSSL: `damping_mode` must be 'constant' (the text stage does not implement 'adaptive'); drop --damping-mode.
    """
    for name, value, flag in (
        ("damping_mode", "constant", "--damping-mode"),
        ("lam_mode", "constant", "--lam-mode"),
        ("head_warmup_mode", "eval", "--head-warmup-mode"),
        ("lars_exclude_1d", False, "--lars-exclude-1d"),
    ):
        got = getattr(b, name)
        if got != value:
            raise ValueError(
                f"text BiSSL: `{name}` must be {value!r} (the text stage does not implement {got!r}); drop {flag}."
            )


def math_attention():
    """Context manager: scaled-dot-product attention on the MATH backend, for hand-written double backward.

    hypergrad's own second-order passes need no wrapper (it selects this backend itself).
    """
    return sdpa_kernel([SDPBackend.MATH])


def downstream_batch(n: int, batch: int, k: int, seed: int) -> list[int]:
    """This rank's indices of global downstream batch ``k`` (seeded epochs, last partial batch dropped)."""
    b = min(batch, n)
    per_epoch = n // b
    epoch, j = divmod(k, per_epoch)
    return epoch_batches(n, b, epoch, seed, dist_utils.rank(), world_size())[j]


@torch.no_grad()
def _features(backbone: torch.nn.Module, x: torch.Tensor, dev: torch.device, batch: int = 128) -> torch.Tensor:
    was = backbone.training
    backbone.eval()
    out = torch.cat([backbone(x[i : i + batch].to(dev)) for i in range(0, len(x), batch)])
    backbone.train(was)
    return out


def warmup_head(
    backbone, head, x, y, *, epochs: int, batch: int, lr: float, wd: float, momentum: float, seed: int
) -> float:
    """Train ``head`` on the frozen ``backbone``'s features for ``epochs`` epochs (SGD); last loss.

    Every rank computes the same features and steps (no communication needed).
    """
    dev = next(head.parameters()).device
    feats, y = _features(backbone, x, dev), y.to(dev)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    g = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    b = min(batch, len(y))
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - b + 1, b):
            idx = perm[i : i + b].to(dev)
            loss = F.cross_entropy(head(feats[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return float(loss.detach())


def _before(cfg: TextConfig, lower, head, x_up, y_up, eval_ids) -> dict[str, float]:
    """The stage's first measurements and the head warm-up: pretext bits per token, last warm-up loss."""
    b = cfg.bissl
    return {
        "bpc_before": bits_per_token(lower, eval_ids, cfg.model.seq_len),
        "head_warmup_loss": warmup_head(
            lower.backbone,
            head,
            x_up,
            y_up,
            epochs=b.head_warmup_epochs,
            batch=b.downstream_batch,
            lr=b.upper_lr,
            wd=b.upper_wd,
            momentum=b.momentum,
            seed=cfg.seed,
        ),
    }


def bissl_text(
    cfg: TextConfig, model_dir: str, task: str, out_dir: str | None = None, *, resume: bool = True, echo=print
) -> str:
    """Run the BiSSL stage for ``task`` from the pretrained model folder; return the saved state's path.

    Saves ``<out_dir>/lower_backbone.pt`` with the lower backbone :math:`\\theta_P` (fine-tuned
    afterwards), the LM head, :math:`\\theta_D` and :math:`\\phi`, and ``stage.json`` with the
    pretext bits per character before and after the stage. With ``upper_split="train"`` (default)
    the head warm-up and the upper level use only the ``train`` part of :func:`~.finetune.hpo_split`.

    With ``cfg.bissl.fsdp`` (``--fsdp``, under torchrun) the backbones are sharded after the head
    warm-up (:mod:`applications.bissl.text.fsdp`), no per-alternation checkpoint is written (a stage
    is not resumed) and ``lower_backbone.pt`` holds full (gathered) state dicts.
    """
    b, dev, main = cfg.bissl, device_of(cfg), dist_utils.is_main_process()
    check_text_bissl(b)
    if b.fsdp:
        check_fsdp()  # a process group (torchrun) before anything is loaded
    out_dir = out_dir or os.path.join(cfg.variant_dir, "bissl", task.replace(":", "_"))
    if b.upper_lr is None or b.upper_wd is None:
        raise ValueError("text BiSSL needs --upper-lr and --upper-wd (no per-dataset defaults for text tasks).")
    torch.manual_seed(cfg.seed)
    _, lower, tok = load_lm(cfg, model_dir)
    maybe_lora(cfg, lower)
    lower.to(dev).train()
    upper = copy.deepcopy(lower.backbone)
    data = task_tensors(cfg, task, tok)
    if b.upper_split == "train":  # fine-tuning's validation documents stay unseen (image path: splits.py)
        tr, _ = hpo_split(len(data.y_train), cfg.finetune)
        if len(tr) == 0:
            raise ValueError(
                f"task {task!r} has {len(data.y_train)} training documents: none left for the upper level after "
                "the validation split; raise --max-train-samples or pass --upper-split all."
            )
        x_up, y_up = data.x_train[tr], data.y_train[tr]
    else:
        x_up, y_up = data.x_train, data.y_train
    head = LinearHead(lower.backbone.out_dim, data.task.num_classes).to(dev)
    train_ids, eval_ids = corpus_ids(cfg, tok)
    L = cfg.model.seq_len
    run = StageRun(out_dir, log_dir=os.path.join(cfg.logs, "bissl", task.replace(":", "_")), resume=resume)
    start, info, twin = 0, {}, None
    if b.fsdp:  # --fsdp: shard the backbones (the LM head and phi stay replicated), see text/fsdp.py
        check_fsdp_fresh(run)
        info.update(_before(cfg, lower, head, x_up, y_up, eval_ids))  # on the unsharded model, as without --fsdp
        if b.method.hvp_mode == "finite_diff" and not isinstance(b.method.solver, Identity):
            warn_kinked_fd(lower.backbone)
        if b.method.hvp_mode != "finite_diff":  # exact products on the gathered weights (applications/bissl/fsdp.py)
            twin = text_dense_twin(lower)
            b = dataclasses.replace(b, method=exact_method(b.method))
        shard_text_stage(lower, upper, fsdp_mesh(dev))
    lower_opt = torch.optim.AdamW(  # sharded and plain tensors in separate groups (CUDA's foreach step)
        param_groups(p for p in lower.parameters() if p.requires_grad), lr=b.lower_lr, weight_decay=b.lower_wd
    )
    upper_opt = torch.optim.SGD(
        param_groups([*(p for p in upper.parameters() if p.requires_grad), *head.parameters()]),
        lr=b.upper_lr,
        momentum=b.momentum,
        weight_decay=b.upper_wd,
    )
    lower_sched, upper_sched = stage_schedules(b, lower_opt, upper_opt)
    problem = build_problem(
        lower,
        upper,
        head,
        b,
        lower_opt=lower_opt,
        upper_opt=upper_opt,
        lower_sched=lower_sched,
        upper_sched=upper_sched,
        dense_inner=twin,
    )
    # what the saved progress depends on: other settings or another pretrained model are refused
    full, pre_info = cfg.to_dict(), os.path.join(model_dir, "pretrain.json")
    fine = {k: full["finetune"][k] for k in ("seed", "val_fraction")}  # the split of the upper level
    settings = run_settings(
        task=task,
        fine_split=fine,
        **{k: full[k] for k in ("model", "pretrain", "bissl", "seed", "max_train_samples")},
        pretrained=file_digest(pre_info) if os.path.exists(pre_info) else os.path.abspath(model_dir),
    )
    if run.resumable:
        st = load_checkpoint(run.checkpoint_path, expected_kind=CHECKPOINT_KIND)
        check_same_settings(st.get("settings"), settings, run.checkpoint_path)
        problem.load_state_dict(st["problem"])
        start, info = st["alternation"], st["info"]
    elif not b.fsdp:
        info.update(_before(cfg, lower, head, x_up, y_up, eval_ids))
    n = len(y_up)
    t_stage = time.perf_counter()
    for alt in range(start, b.alternations):
        t0 = time.perf_counter()
        inner_losses = []
        for s in range(b.lower_steps):
            x, y = lm_batch(train_ids, L, b.pretext_batch, alt * (b.lower_steps + 1) + s, cfg.seed)
            inner_losses += problem.inner_step((x.to(dev), y.to(dev))).inner_losses
        x, y = lm_batch(train_ids, L, b.pretext_batch, alt * (b.lower_steps + 1) + b.lower_steps, cfg.seed)
        # one Hessian batch per alternation; with `reuse_operator` its operator serves every upper step.
        # `local_negatives` is the image path's Hessian-batch flag (no all_gather inside torch.func); a
        # next-token loss has no negatives, so it only marks the batch.
        problem.new_hessian_batch(PretextBatch(x.to(dev), y.to(dev), local_negatives=True))
        hvps, outer_losses, failed, solves = 0, [], 0, 0
        for u in range(b.upper_steps):
            idx = downstream_batch(n, b.downstream_batch, alt * b.upper_steps + u, cfg.seed + 1)
            batch = (x_up[idx].to(dev), y_up[idx].to(dev))
            rec = problem.hypergradient(batch)
            problem.outer_step()
            hvps += rec.num_hvps
            if rec.outer_loss is not None:
                outer_losses.append(rec.outer_loss)
            if rec.solve is not None:
                solves += 1
                failed += int(rec.solve.failed)
        # totals over the stage (kept in the resume checkpoint with `info`)
        info["solves"] = info.get("solves", 0) + solves
        info["solves_failed"] = info.get("solves_failed", 0) + failed
        if main:
            row = {
                "lower_loss": inner_losses[-1] if inner_losses else float("nan"),
                "upper_loss": outer_losses[-1] if outer_losses else float("nan"),
                "hvps": hvps,
                "solves_failed": failed,
                "inner_skipped": problem.inner_skipped,
                "outer_skipped": problem.outer_skipped,
                "time_s": time.perf_counter() - t0,
            }
            run.log(alt, row)
            if (alt + 1) % max(1, b.alternations // 5) == 0:
                echo(f"[bissl {task}] alternation {alt + 1}/{b.alternations} " + json.dumps(row))
        if not b.fsdp:  # no stage checkpoint under --fsdp (see the refusal of resume above)
            run.save(
                lambda: {"alternation": alt + 1, "problem": problem.state_dict(), "info": info, "settings": settings},
                kind=CHECKPOINT_KIND,
            )
    info["bpc_after"] = bits_per_token(lower, eval_ids, L)
    info["stage_time_s"] = time.perf_counter() - t_stage
    info["inner_skipped"], info["outer_skipped"] = problem.inner_skipped, problem.outer_skipped
    if main and info.get("solves_failed"):
        echo(
            f"[bissl {task}] warning: {info['solves_failed']} of {info['solves']} implicit-gradient solves failed "
            "(applied under hypergrad's on_failure='warn'; e.g. I + H/(lam+damping) not positive definite): "
            "raise --damping or use --solver dense / more --solver-steps."
        )
    run.close()
    if b.fsdp:  # gathered on every rank (a collective), written by the main process
        parts = {"backbone": full_state_dict(lower.backbone), "upper_backbone": full_state_dict(upper)}
        state = {**parts, "lm_head": lower.lm_head.state_dict(), "head": head.state_dict()}
        out_path = run.save(state, "lower_backbone.pt", kind=STATE_KIND)
    else:
        out_path = run.save(
            lambda: {
                "backbone": lower.backbone.state_dict(),
                "lm_head": lower.lm_head.state_dict(),
                "upper_backbone": upper.state_dict(),
                "head": head.state_dict(),
            },
            "lower_backbone.pt",
            kind=STATE_KIND,
        )
    run.write_json("stage.json", info)
    run.barrier()
    return out_path
