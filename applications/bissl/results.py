r"""The results of a run: the three arms per downstream task, paired statistics and diagnostics.

Arms (fine-tuning ``origin``): ``pretext`` (baseline: the pretrained backbone), ``control``
(compute-matched control: the same lower steps as the BiSSL stage without the upper level, i.e.
continued pretraining) and ``bissl`` (the BiSSL lower backbone). Runs of one task use the same
seeds in every arm, so arms are compared **paired**: for the gap :math:`d_s = a_s - b_s` over
seeds :math:`s = 1..n`,

.. math::

    \bar d \pm t_{0.975,\,n-1}\,\frac{s_d}{\sqrt n}\ \text{(95 \% CI)},\qquad
    p = 2\,P\big(T_{n-1} > |\bar d| \sqrt n / s_d\big),\qquad
    \text{MDE} = (t_{0.975,\,n-1} + t_{0.8,\,n-1})\,\frac{s_d}{\sqrt n},

the minimal detectable effect being the true gap a paired t-test at :math:`\alpha = 0.05` detects
with 80 % power given the observed spread.

:func:`write_results` writes ``results.md`` (Markdown), ``results.json``, ``results.png`` (bars with
one-std error bars) and, when stage histories are given, ``diagnostics.png`` (per alternation:
upper loss, proximal share, failed-solve fraction, :math:`\|\theta_P - \theta_D\|`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import textwrap
from typing import Any, Iterable

import torch

from hypergrad.distributed import world_size

__all__ = [
    "ARM_ORIGINS",
    "paired_stats",
    "results_table",
    "format_markdown",
    "machine_info",
    "write_results",
    "plot_results",
    "plot_diagnostics",
]

#: fine-tuning origin -> the arm's name in the table.
ARM_ORIGINS = {"pretext": "baseline", "control": "control", "bissl": "bissl"}
#: the paired comparisons reported: (arm a, arm b) for gaps a - b.
COMPARISONS = (("bissl", "baseline"), ("bissl", "control"), ("control", "baseline"))


def _stats(accs: list[float]) -> tuple[float, float]:
    return statistics.fmean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)


def paired_stats(a: list[float], b: list[float]) -> dict[str, float]:
    """Paired comparison of two arms over the same seeds: mean gap, 95 % CI, paired-t p, MDE.

    Example:
        >>> s = paired_stats([91.0, 93.0, 92.0, 94.0], [90.0, 91.0, 91.0, 92.0])
        >>> s["gap"], s["n"], s["p"] < 0.05, s["ci_low"] > 0
        (1.5, 4, True, True)
    """
    n = min(len(a), len(b))
    nan = float("nan")
    if n == 0:
        return {"gap": nan, "ci_low": nan, "ci_high": nan, "p": nan, "mde": nan, "n": 0}
    d = [x - y for x, y in zip(a[:n], b[:n])]
    gap = statistics.fmean(d)
    if n < 2:
        return {"gap": gap, "ci_low": nan, "ci_high": nan, "p": nan, "mde": nan, "n": n}
    from scipy import stats

    sd = statistics.stdev(d)
    se = sd / math.sqrt(n)
    t975, t80 = float(stats.t.ppf(0.975, n - 1)), float(stats.t.ppf(0.8, n - 1))
    if se == 0:
        p = 1.0 if gap == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(gap) / se, n - 1))
    return {"gap": gap, "ci_low": gap - t975 * se, "ci_high": gap + t975 * se, "p": p, "mde": (t975 + t80) * se, "n": n}


def results_table(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task: per arm mean, std and runs; paired gaps between arms.

    ``gap`` is BiSSL - baseline (kept for readers of older results); ``<a>_vs_<b>`` holds the
    paired statistics of :func:`paired_stats` for every comparison whose arms both ran.

    Example:
        >>> rows = results_table([
        ...     {"task": "digits", "origin": "pretext", "test_top1": [90.0, 92.0]},
        ...     {"task": "digits", "origin": "bissl", "test_top1": [93.0, 95.0]}])
        >>> rows[0]["gap"], rows[0]["baseline_mean"], round(rows[0]["bissl_std"], 3)
        (3.0, 91.0, 1.414)
        >>> rows[0]["bissl_vs_baseline"]["gap"], "bissl_vs_control" in rows[0]
        (3.0, False)
    """
    by_task: dict[str, dict[str, list[float]]] = {}
    for r in results:
        if r["origin"] not in ARM_ORIGINS:
            raise ValueError(f"result origin must be one of {sorted(ARM_ORIGINS)}, got {r['origin']!r}.")
        by_task.setdefault(r["task"], {})[ARM_ORIGINS[r["origin"]]] = list(r["test_top1"])
    rows = []
    for task, d in by_task.items():
        row: dict[str, Any] = {"task": task}
        for key in ARM_ORIGINS.values():
            accs = d.get(key)
            m, s = _stats(accs) if accs else (float("nan"), float("nan"))
            row[f"{key}_mean"], row[f"{key}_std"], row[f"{key}_runs"] = m, s, len(accs or [])
        row["gap"] = row["bissl_mean"] - row["baseline_mean"]
        for a, b in COMPARISONS:
            if d.get(a) and d.get(b):
                row[f"{a}_vs_{b}"] = paired_stats(d[a], d[b])
        rows.append(row)
    return rows


def _cell(r: dict[str, Any], k: str) -> str:
    return "n/a" if math.isnan(r[f"{k}_mean"]) else f"{r[f'{k}_mean']:.2f} ± {r[f'{k}_std']:.2f}"


def _paired(s: dict[str, float] | None) -> str:
    if not s:
        return "n/a"
    if math.isnan(s["ci_low"]):
        return f"{s['gap']:+.2f}"
    return f"{s['gap']:+.2f} [{s['ci_low']:+.2f}, {s['ci_high']:+.2f}] p={s['p']:.3g} MDE {s['mde']:.2f}"


def format_markdown(rows: list[dict[str, Any]], title: str | None = None) -> str:
    """A Markdown table per task: the arms (top-1 %, mean ± std) and the paired gaps.

    Paired gap cells read ``gap [95 % CI] p=<paired t> MDE <minimal detectable effect>``.
    """
    lines = [f"### {title}", ""] if title else []
    arms = [k for k in ARM_ORIGINS.values() if any(r[f"{k}_runs"] for r in rows)] or ["baseline", "bissl"]
    comps = [(a, b) for a, b in COMPARISONS if any(f"{a}_vs_{b}" in r for r in rows)]
    names = {"baseline": "baseline (pretext) top-1 %", "control": "control (cont. pretraining) top-1 %"}
    head = [names.get(k, "BiSSL top-1 %") for k in arms]
    head += [f"{'BiSSL' if a == 'bissl' else a} - {b}" for a, b in comps]
    lines += ["| downstream task | " + " | ".join(head) + " | runs |", "|---" * (len(head) + 2) + "|"]
    for r in rows:
        cells = [_cell(r, k) for k in arms] + [_paired(r.get(f"{a}_vs_{b}")) for a, b in comps]
        runs = " / ".join(str(r[f"{k}_runs"]) for k in arms)
        lines.append(f"| {r['task']} | " + " | ".join(cells) + f" | {runs} |")
    return "\n".join(lines) + "\n"


def plot_results(rows: list[dict[str, Any]], path: str, title: str = "") -> str:
    """Grouped bars (one per arm) with one-std error bars, saved to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [k for k in ARM_ORIGINS.values() if any(r[f"{k}_runs"] for r in rows)]
    n, w = len(rows), 0.8 / max(1, len(arms))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.8 * n + 1.5) + 2.2, 3.6))
    xs = list(range(n))
    labels = {"baseline": "baseline (pretext)", "control": "control (cont. pretraining)", "bissl": "BiSSL"}
    for i, key in enumerate(arms):
        off = (i - (len(arms) - 1) / 2) * w
        ax.bar(
            [x + off for x in xs],
            [r[f"{key}_mean"] for r in rows],
            width=w * 0.95,
            yerr=[r[f"{key}_std"] for r in rows],
            capsize=3,
            label=labels[key],
        )
    ax.set_xticks(xs, [r["task"] for r in rows], rotation=15)
    ax.set_ylabel("test top-1 (%)")
    lo = min([r[f"{k}_mean"] - r[f"{k}_std"] for r in rows for k in arms] or [0.0])
    ax.set_ylim(max(0.0, lo - 10.0), 100.0)
    ax.set_title(textwrap.fill(title, 40), fontsize=10)
    # Beside the axes, never over a bar.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


DIAGNOSTICS = (
    ("upper_loss", "upper loss"),
    ("proximal_share", "proximal share of the lower step"),
    ("solves_failed_frac", "failed solves (fraction)"),
    ("distance", "||theta_P - theta_D||"),
)


def plot_diagnostics(histories: dict[str, list[dict[str, float]]], path: str) -> str:
    """Per-alternation diagnostics of the BiSSL stages (one line per task), saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DIAGNOSTICS), figsize=(3.2 * len(DIAGNOSTICS), 3.0))
    for ax, (key, label) in zip(axes, DIAGNOSTICS):
        for task, hist in histories.items():
            ax.plot(range(1, len(hist) + 1), [h.get(key, float("nan")) for h in hist], marker=".", label=task)
        ax.set_xlabel("alternation")
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def machine_info(device: str) -> dict[str, Any]:
    """The machine of a run, for the ``meta`` of :func:`write_results`.

    Platform, CPU count, torch version and threads, world size (1 without a process group) and ``device``.

    Example:
        >>> sorted(machine_info("cpu"))
        ['cpus', 'device', 'platform', 'threads', 'torch', 'world_size']
    """
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "world_size": world_size(),
        "device": device,
    }


def write_results(
    results: list[dict[str, Any]],
    out_dir: str,
    *,
    title: str = "",
    meta: dict | None = None,
    histories: dict[str, list[dict[str, float]]] | None = None,
    stage_summaries: dict[str, dict[str, Any]] | None = None,
) -> str:
    """Write ``results.{md,json,png}`` (and ``diagnostics.png``) into ``out_dir``; return the Markdown.

    Args:
        results: fine-tuning results (:func:`~applications.bissl.finetune.finetune`), any arms.
        out_dir: output folder.
        title: the table's heading (name the pretext and downstream data).
        meta: configuration, timings and machine, stored in the JSON.
        histories: per task, the BiSSL stage's per-alternation diagnostics rows.
        stage_summaries: per task, the BiSSL stage's ``summary.json`` (failed solves, ...).
    """
    os.makedirs(out_dir, exist_ok=True)
    rows = results_table(results)
    md = format_markdown(rows, title or None)
    if stage_summaries:
        md += "\nBiSSL stage: " + "; ".join(
            f"{t}: {s['solves_failed']}/{s['solves']} solves failed ({100 * s['solves_failed_frac']:.0f} %), "
            f"final proximal share {s['final_proximal_share']:.3g}, damping {s['final_damping']:.3g}"
            for t, s in stage_summaries.items()
        )
        md += "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    payload = {"rows": rows, "results": results, "meta": meta or {}, "stage": stage_summaries or {}}
    payload["diagnostics"] = histories or {}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(payload, f, indent=1)
    plot_results(rows, os.path.join(out_dir, "results.png"), title)
    if histories:
        plot_diagnostics(histories, os.path.join(out_dir, "diagnostics.png"))
    return md
