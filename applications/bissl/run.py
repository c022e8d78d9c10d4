r"""``run``: every stage of one preset, ending with the results table.

1. ``pretrain`` once (SimCLR/BYOL on ``cfg.pretrain.dataset``) -> ``<run_dir>/pretrain/pretrained.pt``;
2. for each downstream task in ``cfg.downstream``: the BiSSL stage (``--d-dset`` = the task)
   -> ``<run_dir>/bissl/<task>/lower_backbone.pt``;
3. fine-tuning with HPO and ``num_runs`` seeds from the pretext backbone (baseline) and from the
   BiSSL lower backbone;
4. ``<run_dir>/results.{md,json,png}``: baseline vs BiSSL per task, mean :math:`\pm` std, gap.

Every stage resumes from its own checkpoint / state files, so re-running the same command after an
interruption continues where it stopped. Timings of every stage go to ``results.json``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import Any, Callable

import torch

from . import distributed as dist_utils
from .config import PipelineConfig
from .finetune import finetune
from .pretrain import pretrain
from .results import write_results
from .stage_bissl import run_bissl

__all__ = ["run_pipeline"]


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
    for task in cfg.downstream:
        tcfg = dataclasses.replace(cfg, bissl=dataclasses.replace(cfg.bissl, downstream=task))
        t0 = time.perf_counter()
        bissl_path = run_bissl(tcfg, pre_path, resume=resume)
        timings[f"bissl[{task}]_s"] = time.perf_counter() - t0
        say(f"[run] BiSSL stage for {task} done in {timings[f'bissl[{task}]_s']:.0f}s -> {bissl_path}")
        for origin, path in (("pretext", pre_path), ("bissl", bissl_path)):
            t0 = time.perf_counter()
            if main:
                r = finetune(tcfg, task, origin, path)
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
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "world_size": dist_utils.world_size(),
                "device": cfg.device,
            },
        }
        title = f"BiSSL {cfg.name} preset ({cfg.pretrain.pretext_type}, pretext {cfg.pretrain.dataset})"
        md = write_results(results, cfg.run_dir, title=title, meta=meta)
        say(md)
        say(f"[run] total {timings['total_s']:.0f}s; table, JSON and plot in {cfg.run_dir}/results.{{md,json,png}}")
    return {"markdown": md, "results": results, "timings": timings, "out_dir": cfg.run_dir}
