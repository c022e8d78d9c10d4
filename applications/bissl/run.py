r"""``run``: every stage of one preset, ending with the results table.

1. ``pretrain`` once (SimCLR/BYOL on ``cfg.pretrain.dataset``) -> ``<run_dir>/pretrain/pretrained.pt``;
2. for each downstream task in ``cfg.downstream``: the BiSSL stage (``--d-dset`` = the task)
   -> ``<run_dir>/bissl/<task>/lower_backbone.pt``;
   and, when ``cfg.arms`` holds ``control``, the compute-matched control (the same lower steps,
   no upper level) -> ``<run_dir>/control/<task>/lower_backbone.pt``;
3. fine-tuning with HPO and ``num_runs`` seeds from each arm's backbone (the pretext backbone is
   the baseline), all arms on the same shared train/val split and the same seeds;
4. ``<run_dir>/results.{md,json,png}`` and ``diagnostics.png``: the arms per task, mean
   :math:`\pm` std, paired gaps with 95 % CIs, p-values and minimal detectable effects, and the
   stage's per-alternation diagnostics.

Every stage resumes from its own checkpoint / state files, so re-running the same command after an
interruption continues where it stopped. Timings of every stage go to ``results.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import torch

from hypergrad import load_checkpoint

from . import distributed as dist_utils
from .config import PipelineConfig
from .finetune import finetune
from .pretrain import pretrain
from .results import machine_info, write_results
from .stage_bissl import run_bissl

__all__ = ["run_pipeline"]


def _stage_record(stage_out: str) -> tuple[dict, list]:
    """The stage's ``summary.json`` and its per-alternation rows (from its checkpoint)."""
    with open(os.path.join(stage_out, "summary.json")) as f:
        summary = json.load(f)
    ckpt = os.path.join(stage_out, "checkpoint.pt")
    history = load_checkpoint(ckpt).get("history", []) if os.path.exists(ckpt) else []
    return summary, history


def run_pipeline(
    cfg: PipelineConfig,
    *,
    resume: bool = True,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Run pretrain -> BiSSL -> fine-tuning for every task of ``cfg``; write and return the results.

    Args:
        cfg: the pipeline configuration (a preset with overrides).
        resume: continue every stage from its checkpoint when one exists.
        progress: show the pretraining progress bar.
        echo: where the final Markdown table and stage messages go (rank 0 only).

    Returns:
        ``{"markdown", "results", "timings", "out_dir"}``.
    """
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    main = dist_utils.is_main_process()
    say = echo if main else (lambda _msg: None)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    pre_path = pretrain(cfg, resume=resume, progress=progress)
    timings["pretrain_s"] = time.perf_counter() - t0
    say(f"[run] pretrain done in {timings['pretrain_s']:.0f}s -> {pre_path}")
    results = []
    histories: dict[str, list] = {}
    summaries: dict[str, dict] = {}
    for task in cfg.downstream:
        tcfg = dataclasses.replace(cfg, bissl=dataclasses.replace(cfg.bissl, downstream=task))
        paths = {"pretext": pre_path}
        for arm in ("bissl", "control"):
            if arm not in cfg.arms:
                continue
            t0 = time.perf_counter()
            paths[arm] = run_bissl(tcfg, pre_path, resume=resume, arm=arm)
            timings[f"{arm}[{task}]_s"] = time.perf_counter() - t0
            say(f"[run] {arm} stage for {task} done in {timings[f'{arm}[{task}]_s']:.0f}s -> {paths[arm]}")
            if arm == "bissl" and main:
                summaries[task], histories[task] = _stage_record(os.path.dirname(paths[arm]))
        for origin in (a for a in ("pretext", "control", "bissl") if a in cfg.arms):
            t0 = time.perf_counter()
            if main:
                r = finetune(tcfg, task, origin, paths[origin], resume=resume)
                results.append(r)
                say(
                    f"[run] fine-tune {task}/{origin}: {r['mean']:.2f} ± {r['std']:.2f} "
                    f"(lr {r['lr']:.3g}, wd {r['weight_decay']:.3g}, {len(r['test_top1'])} runs)"
                )
            dist_utils.barrier()  # fine-tuning runs on rank 0; the other ranks wait
            timings[f"finetune[{task}/{origin}]_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all
    md = ""
    if main:
        meta = {
            "preset": cfg.name,
            "config": cfg.to_dict(),
            "timings": timings,
            "machine": machine_info(cfg.device),
        }
        title = (
            f"BiSSL {cfg.name} preset ({cfg.pretrain.pretext_type}): pretext {cfg.pretrain.dataset} -> "
            f"downstream {', '.join(cfg.downstream)}"
        )
        md = write_results(results, cfg.run_dir, title=title, meta=meta, histories=histories, stage_summaries=summaries)
        say(md)
        say(f"[run] total {timings['total_s']:.0f}s; table, JSON and plot in {cfg.run_dir}/results.{{md,json,png}}")
    return {"markdown": md, "results": results, "timings": timings, "out_dir": cfg.run_dir}
