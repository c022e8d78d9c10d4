r"""The bilevel fine-tuning and its comparison (``python -m applications.umm finetune``).

Starting from one pretraining checkpoint, every method trains the **late** blocks (those after
``num_early``) and the projector; the early blocks stay frozen (eval mode) and are evaluated once.

* ``umm``: the bilevel problem of :mod:`~applications.umm.objectives`, proximal coupling, CG
  hypergradient (``cg_steps`` Hessian-vector products per upper step). ``alternations`` rounds of
  ``lower_steps`` lower steps then ``upper_steps`` upper steps.
* ``umm_fo``: the same with the first-order one-step hypergradient (:class:`hypergrad.Identity`).
* ``umm_align0``: ``umm`` with alignment weight :math:`\beta = 0`.
* ``control``: plain SimCLR on the same late blocks, compute-matched: as many SGD steps as ``umm``
  spends gradient-sized passes, ``A (N_L + N_U (1 + 2 k))`` for ``A`` alternations, ``N_L``/``N_U``
  lower/upper steps and ``k`` CG steps (a Hessian-vector product counted as two gradients).

The model that is evaluated is the lower solution :math:`\theta_L` (as in BiSSL, the backbone
trained on the pretext objective and pulled towards the upper variables); the upper copy
:math:`\theta_U` is logged as ``upper_dr``. Every (method, seed) result is one line of
``results.jsonl``; a re-run skips the pairs already there (resume), and ``table.{md,json,csv}``
hold mean :math:`\pm` std over seeds.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hypergrad import MetricsLogger

from . import runtime
from .config import UMMConfig
from .data import Splits, load_splits, view_batches
from .evaluate import Evaluator
from .model import load_pretrained, split_backbone
from .objectives import build_problem, encode_early, inner_loss_fn, make_levels, views_dr

__all__ = ["compare", "control_steps", "finetune_run", "summarise"]

#: Settings that may change between a run and its resumption (they do not change a finished run's result).
_FREE = {"seeds", "methods", "threads", "num_workers", "device", "run_dir", "preset", "extra"}
_EVAL_KEYS = ("probe", "knn", "dr_class", "dr_views_seen", "dr_views_unseen")


def control_steps(cfg: UMMConfig) -> int:
    """SGD steps of the compute-matched control: ``A (N_L + N_U (1 + 2 k))``.

    Example:
        >>> from applications.umm.config import get_preset
        >>> control_steps(get_preset("cpu"))  # 4 * (3 + 1 * (1 + 2 * 2))
        32
    """
    return cfg.alternations * (cfg.lower_steps + cfg.upper_steps * (1 + 2 * cfg.cg_steps))


def _stream(images: Any, cfg: UMMConfig, seed: int, offset: int) -> Iterator[tuple[Tensor, Tensor]]:
    epoch = offset
    while True:
        yield from view_batches(images, cfg, batch=cfg.ft_batch, epoch=epoch, seed=seed, view_seed=cfg.seed,
                                rank=runtime.rank(), world=runtime.world())  # fmt: skip
        epoch += 1


def _late_features(early: nn.Module, late: nn.Module):
    def f(x: Tensor) -> Tensor:
        return late(early(x))

    return f


def finetune_run(
    cfg: UMMConfig, method: str, seed: int, checkpoint: str, splits: Splits, evaluator: Evaluator | None = None,
    *, log_dir: str | None = None, progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """One fine-tuning run; returns the metrics after it (and the run's cost).

    Args:
        cfg: the configuration (fine-tuning fields).
        method: one of :data:`~applications.umm.config.METHODS`.
        seed: seeds the initial RNG and the batch order (the views come from ``cfg.seed``).
        checkpoint: the pretraining checkpoint to start from.
        splits: the data (:func:`~applications.umm.data.load_splits`).
        evaluator: computes the after-metrics (None: skip evaluation; tests).
        log_dir: MetricsLogger folder for per-alternation metrics.
        progress: tqdm bar over alternations.
    """
    dev = runtime.device_of(cfg)
    torch.manual_seed(seed)
    backbone, projector, _ = load_pretrained(checkpoint, cfg, dev)
    early, late = split_backbone(backbone, cfg.num_early)
    for p in early.parameters():
        p.requires_grad_(False)
    lower_it = _stream(splits.pretrain, cfg, seed, 10_000)
    upper_it = _stream(splits.heldout, cfg, seed + 1, 20_000)
    logger = MetricsLogger(log_dir) if (log_dir and runtime.is_main()) else None
    t0 = time.perf_counter()
    stats: dict[str, Any] = {"hvps": 0, "failed_solves": 0, "skipped": 0}
    if method == "control":
        params = [p for p in [*late.parameters(), *projector.parameters()] if p.requires_grad]
        opt = torch.optim.SGD(params, lr=cfg.lower_lr, momentum=0.9)
        loss_fn = inner_loss_fn(0.0, cfg.align_tau, cfg.temperature)
        inner = nn.ModuleDict({"late": late, "projector": projector})
        n = control_steps(cfg)
        for step in tqdm(range(n), desc=f"control s{seed}", disable=not progress):
            inner.train()
            x1, x2 = next(lower_it)
            loss = loss_fn(inner, None, encode_early(early, x1.to(dev), x2.to(dev)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if runtime.world() > 1:
                for p in params:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= runtime.world()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            if logger is not None:
                logger.log(step, {"lower_loss": loss.item()})
        upper_dr = float("nan")
    else:
        inner, outer = make_levels(late, projector)
        problem = build_problem(
            inner, outer, lam=cfg.lam, damping=cfg.damping, cg_steps=cfg.cg_steps,
            align_weight=0.0 if method == "umm_align0" else cfg.align_weight, align_tau=cfg.align_tau, eps2=cfg.eps2,
            upper_ssl_weight=cfg.upper_ssl_weight, gamma=cfg.gamma, first_order=method == "umm_fo",
            lower_lr=cfg.lower_lr, upper_lr=cfg.upper_lr, temperature=cfg.temperature,
        )  # fmt: skip
        upper_dr = float("nan")
        for alt in tqdm(range(cfg.alternations), desc=f"{method} s{seed}", disable=not progress):
            inner.train()
            outer.train()
            for _ in range(cfg.lower_steps):
                x1, x2 = next(lower_it)
                rec = problem.inner_step(encode_early(early, x1.to(dev), x2.to(dev)))
                stats["skipped"] += int(rec.skipped)
            lower_loss = rec.inner_losses[-1] if rec.inner_losses else float("nan")
            for _ in range(cfg.upper_steps):
                x1, x2 = next(upper_it)
                ub = encode_early(early, x1.to(dev), x2.to(dev))
                rec = problem.hypergradient(ub)
                problem.outer_step()
                stats["hvps"] += rec.num_hvps
                stats["failed_solves"] += int(rec.solve is not None and rec.solve.failed)
                with torch.no_grad():
                    upper_dr = float(views_dr(outer["late"](ub[0]), outer["late"](ub[1]), cfg.eps2))
            if logger is not None:
                logger.log(alt, {"lower_loss": lower_loss, "upper_loss": rec.outer_loss if rec.outer_loss is not None
                                 else math.nan, "upper_dr": upper_dr, "hvps": stats["hvps"]})  # fmt: skip
    if logger is not None:
        logger.close()
    result: dict[str, Any] = {"method": method, "seed": seed, "time_s": time.perf_counter() - t0, "upper_dr": upper_dr,
                              **stats}  # fmt: skip
    if evaluator is not None:
        backbone.eval()
        result.update(evaluator.metrics(_late_features(early, late)))
    return result


def _mean_std(xs: list[float]) -> tuple[float, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(xs) > 1 else 0.0


def summarise(results: list[dict[str, Any]], before: dict[str, float]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every metric after fine-tuning, per method (in METHODS order)."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in results):
        rs = [r for r in results if r["method"] == method]
        row: dict[str, Any] = {"method": method, "seeds": len(rs)}
        for k in (*_EVAL_KEYS, "time_s", "hvps"):
            row[k], row[k + "_std"] = _mean_std([float(r[k]) for r in rs])
        rows.append(row)
    return [{"method": "pretrained (before)", "seeds": 0, **{k: v for k, v in before.items()}}] + rows


_NAMES = {"control": "continued SSL (compute-matched control)", "umm": "UMM, ours (proximal, CG)",
          "umm_fo": "UMM, first-order (Identity)", "umm_align0": "UMM, alignment weight 0"}  # fmt: skip


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: linear-probe and kNN top-1 (%) and coding-rate reductions, mean +- std."""
    head = ("| method | seeds | linear probe top-1 (%) | kNN top-1 (%) | ΔR class (test) | ΔR views (held-out) "
            "| ΔR views (seen) | time / run (s) |")  # fmt: skip
    out = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:

        def cell(k: str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
            if k not in r:
                return ""
            s = fmt.format(r[k] * scale)
            return s + (" ± " + fmt.format(r[k + "_std"] * scale) if k + "_std" in r else "")

        out.append(
            f"| {_NAMES.get(r['method'], r['method'])} | {r['seeds'] or '-'} | {cell('probe', 100, '{:.1f}')} | "
            f"{cell('knn', 100, '{:.1f}')} | {cell('dr_class')} | {cell('dr_views_unseen')} | {cell('dr_views_seen')} | "
            f"{cell('time_s', 1, '{:.1f}')} |"
        )
    return "\n".join(out) + "\n"


def compare(cfg: UMMConfig, checkpoint: str, out_dir: str, *, resume: bool = True, progress: bool = True) -> list[dict]:
    """Run every method of ``cfg.methods`` for ``cfg.seeds`` seeds; write ``results.jsonl`` and the table."""
    dev = runtime.setup(cfg)
    splits = load_splits(cfg)
    evaluator = Evaluator(splits, cfg, dev)
    os.makedirs(out_dir, exist_ok=True)
    res_path = os.path.join(out_dir, "results.jsonl")
    done: list[dict[str, Any]] = []
    settings = {k: v for k, v in cfg.to_dict().items() if k not in _FREE} | {"checkpoint": os.path.abspath(checkpoint)}
    set_path = os.path.join(out_dir, "settings.json")
    if resume and os.path.exists(set_path) and os.path.exists(res_path):
        with open(set_path) as f:
            saved = json.load(f)
        changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if changed:
            raise ValueError(
                f"{res_path!r} holds runs with other settings {changed}; pass --no-resume (CLI) / resume=False "
                "to start afresh, or use another --run-dir."
            )
    if runtime.is_main():
        with open(set_path, "w") as f:
            json.dump(settings, f, indent=1)
    if resume and os.path.exists(res_path):
        with open(res_path) as f:
            done = [json.loads(line) for line in f if line.strip()]
    elif os.path.exists(res_path) and runtime.is_main():
        os.remove(res_path)
    backbone, _, _ = load_pretrained(checkpoint, cfg, dev)
    early, late = split_backbone(backbone.eval(), cfg.num_early)
    before = evaluator.metrics(_late_features(early, late))
    jobs = [(m, cfg.seed + s) for m in cfg.methods for s in range(cfg.seeds)]
    have = {(r["method"], r["seed"]) for r in done}
    bar = tqdm(jobs, desc="umm finetune", disable=not (progress and runtime.is_main()))
    for method, seed in bar:
        if (method, seed) in have:
            continue
        bar.set_postfix(method=method, seed=seed)
        r = finetune_run(cfg, method, seed, checkpoint, splits, evaluator,
                         log_dir=os.path.join(out_dir, "logs", f"{method}_s{seed}"))  # fmt: skip
        done.append(r)
        if runtime.is_main():
            with open(res_path, "a") as f:
                f.write(json.dumps(r) + "\n")
    results = [r for r in done if (r["method"], r["seed"]) in set(jobs)]
    rows = summarise(results, before)
    if runtime.is_main():
        with open(os.path.join(out_dir, "table.md"), "w") as f:
            f.write(format_table(rows))
        with open(os.path.join(out_dir, "table.json"), "w") as f:
            json.dump({"rows": rows, "before": before, "checkpoint": checkpoint, "config": cfg.to_dict(),
                       "control_steps": control_steps(cfg)}, f, indent=1)  # fmt: skip
        import csv

        with open(os.path.join(out_dir, "table.csv"), "w", newline="") as f:
            keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "method", k))
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    return rows
