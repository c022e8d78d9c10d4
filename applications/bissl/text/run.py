r"""``run --modality text``: pretrain -> BiSSL stage -> fine-tuning (baseline and BiSSL) per task -> table.

Writes ``<run_dir>/results.{md,json,png}`` with :func:`applications.bissl.results.write_results`
(baseline vs BiSSL, mean :math:`\pm` std, gap) and adds to ``results.md`` a significance column
(Welch's two-sided t-test over the seeded runs; "yes" at p < 0.05) and the pretext bits per
character before pretraining, after pretraining and after each BiSSL stage, plus the timings.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

import torch

from .. import distributed as dist_utils
from ..results import machine_info, results_table, write_results
from .config import TextConfig
from .finetune import finetune_text
from .pretext import pretrain_text
from .stage import bissl_text

__all__ = ["welch_p", "run_text"]


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test between ``a`` and ``b`` (``nan`` with < 2 runs or no spread).

    Example:
        >>> round(welch_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]), 4)
        0.0213
    """
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    from scipy import stats

    with_spread = any(x != a[0] for x in a) or any(x != b[0] for x in b)
    if not with_spread:
        return 0.0 if a[0] != b[0] else 1.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def run_text(cfg: TextConfig, *, resume: bool = True, echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Every text stage for every task of ``cfg``; returns ``{"markdown", "results", "timings", "bpc", "out_dir"}``."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    main = dist_utils.is_main_process()
    say = echo if main else (lambda _m: None)
    timings: dict[str, float] = {}
    t_all = t0 = time.perf_counter()
    pre_dir = pretrain_text(cfg, resume=resume, echo=say)
    timings["pretrain_s"] = time.perf_counter() - t0
    with open(os.path.join(pre_dir, "pretrain.json")) as f:
        pre_info = json.load(f)
    bpc = {"random init": pre_info["bpc_init"], "pretrained": pre_info["bpc"]}
    say(f"[run] pretrain done in {timings['pretrain_s']:.0f}s; bpc {pre_info['bpc_init']:.3f} -> {pre_info['bpc']:.3f}")
    results = []
    for task in cfg.downstream:
        t0 = time.perf_counter()
        state = bissl_text(cfg, pre_dir, task, resume=resume, echo=say)
        timings[f"bissl[{task}]_s"] = time.perf_counter() - t0
        with open(os.path.join(os.path.dirname(state), "stage.json")) as f:
            info = json.load(f)
        bpc[f"after BiSSL ({task})"] = info["bpc_after"]
        say(
            f"[run] BiSSL {task} done in {timings[f'bissl[{task}]_s']:.0f}s; bpc {info['bpc_before']:.3f} -> {info['bpc_after']:.3f}"
        )
        for origin in ("pretext", "bissl"):
            t0 = time.perf_counter()
            if main:
                r = finetune_text(cfg, task, origin, pre_dir, state if origin == "bissl" else None)
                results.append(r)
                say(
                    f"[run] fine-tune {task}/{origin}: {r['mean']:.2f} ± {r['std']:.2f} (lr {r['lr']:.3g}, wd {r['weight_decay']:.3g})"
                )
            dist_utils.barrier()
            timings[f"finetune[{task}/{origin}]_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all
    md = ""
    if main:
        meta = {
            "preset": cfg.name,
            "modality": "text",
            "config": cfg.to_dict(),
            "timings": timings,
            "bpc": bpc,
            "machine": machine_info(cfg.device),
        }
        lora = f", LoRA r={cfg.model.lora_rank}" if cfg.model.lora_rank else ", full parameters"
        title = f"Text BiSSL {cfg.name} preset (GPT next-token pretext on Shakespeare{lora})"
        md = write_results(results, cfg.variant_dir, title=title, meta=meta)
        md += _extra_markdown(results, bpc, timings)
        with open(os.path.join(cfg.variant_dir, "results.md"), "w") as f:
            f.write(md)
        say(md)
    return {"markdown": md, "results": results, "timings": timings, "bpc": bpc, "out_dir": cfg.variant_dir}


def _extra_markdown(results: list[dict], bpc: dict[str, float], timings: dict[str, float]) -> str:
    by = {(r["task"], r["origin"]): r["test_top1"] for r in results}
    lines = ["", "| task | gap | Welch p | significant (p < 0.05) |", "|---|---|---|---|"]
    for row in results_table(results):
        a, b = by.get((row["task"], "pretext"), []), by.get((row["task"], "bissl"), [])
        p = welch_p(a, b)
        sig = "n/a" if math.isnan(p) else ("yes" if p < 0.05 else "no")
        lines.append(f"| {row['task']} | {row['gap']:+.2f} | {p:.3g} | {sig} |")
    lines += ["", "| pretext model | bits per character (held-out Shakespeare) |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in bpc.items()]
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"
