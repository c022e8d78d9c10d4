r"""The results table of a run: baseline vs BiSSL per downstream task, mean :math:`\pm` std, gap.

:func:`results_table` turns fine-tuning results (the dicts :func:`~applications.bissl.finetune.finetune`
returns) into rows; :func:`write_results` writes ``results.md`` (Markdown), ``results.json`` and
``results.png`` (bar chart with one-std error bars) and returns the Markdown.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import textwrap
from typing import Any, Iterable

__all__ = ["results_table", "format_markdown", "write_results", "plot_results"]


def _stats(accs: list[float]) -> tuple[float, float]:
    return statistics.fmean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)


def results_table(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task with both origins: means, stds, seed count and ``gap = bissl - baseline``.

    Example:
        >>> rows = results_table([
        ...     {"task": "digits", "origin": "pretext", "test_top1": [90.0, 92.0]},
        ...     {"task": "digits", "origin": "bissl", "test_top1": [93.0, 95.0]}])
        >>> rows[0]["gap"], rows[0]["baseline_mean"], round(rows[0]["bissl_std"], 3)
        (3.0, 91.0, 1.414)
    """
    by_task: dict[str, dict[str, list[float]]] = {}
    for r in results:
        if r["origin"] not in ("pretext", "bissl"):
            raise ValueError(f"result origin must be 'pretext' or 'bissl', got {r['origin']!r}.")
        by_task.setdefault(r["task"], {})[r["origin"]] = list(r["test_top1"])
    rows = []
    for task, d in by_task.items():
        row: dict[str, Any] = {"task": task}
        for origin, key in (("pretext", "baseline"), ("bissl", "bissl")):
            accs = d.get(origin)
            m, s = _stats(accs) if accs else (float("nan"), float("nan"))
            row[f"{key}_mean"], row[f"{key}_std"], row[f"{key}_runs"] = m, s, len(accs or [])
        row["gap"] = row["bissl_mean"] - row["baseline_mean"]
        rows.append(row)
    return rows


def format_markdown(rows: list[dict[str, Any]], title: str | None = None) -> str:
    """A Markdown table: task | baseline | BiSSL | gap | runs (top-1 %, mean +- std)."""
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| downstream task | baseline (pretext) top-1 % | BiSSL top-1 % | gap (BiSSL - baseline) | runs |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cell = lambda k: "n/a" if math.isnan(r[f"{k}_mean"]) else f"{r[f'{k}_mean']:.2f} ± {r[f'{k}_std']:.2f}"
        gap = "n/a" if math.isnan(r["gap"]) else f"{r['gap']:+.2f}"
        lines.append(
            f"| {r['task']} | {cell('baseline')} | {cell('bissl')} | {gap} | {r['baseline_runs']} / {r['bissl_runs']} |"
        )
    return "\n".join(lines) + "\n"


def plot_results(rows: list[dict[str, Any]], path: str, title: str = "") -> str:
    """Grouped bars (baseline vs BiSSL) with one-std error bars, saved to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * n + 1.5), 3.6))
    xs = list(range(n))
    for off, key, label in ((-0.2, "baseline", "baseline (pretext)"), (0.2, "bissl", "BiSSL")):
        ax.bar(
            [x + off for x in xs],
            [r[f"{key}_mean"] for r in rows],
            width=0.38,
            yerr=[r[f"{key}_std"] for r in rows],
            capsize=3,
            label=label,
        )
    ax.set_xticks(xs, [r["task"] for r in rows], rotation=15)
    ax.set_ylabel("test top-1 (%)")
    lo = min([r[f"{k}_mean"] - r[f"{k}_std"] for r in rows for k in ("baseline", "bissl")] or [0.0])
    ax.set_ylim(max(0.0, lo - 10.0), 100.0)
    ax.set_title(textwrap.fill(title, 40), fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(results: list[dict[str, Any]], out_dir: str, *, title: str = "", meta: dict | None = None) -> str:
    """Write ``results.md``, ``results.json`` and ``results.png`` into ``out_dir``; return the Markdown."""
    os.makedirs(out_dir, exist_ok=True)
    rows = results_table(results)
    md = format_markdown(rows, title or None)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"rows": rows, "results": results, "meta": meta or {}}, f, indent=1)
    plot_results(rows, os.path.join(out_dir, "results.png"), title)
    return md
