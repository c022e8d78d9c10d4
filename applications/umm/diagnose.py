r"""The layer-wise memorisation diagnostic: every tap of every pretraining checkpoint.

For each checkpoint (epoch) and each tap (stem, layer1..layer4, projector; globally pooled),
:class:`~applications.umm.evaluate.Evaluator` gives linear-probe and kNN accuracy and the
coding-rate reduction under the class and two-views partitions. Output in ``out_dir``:

* ``diagnose.json`` / ``diagnose.csv``: one row per (epoch, tap);
* ``diagnose.md``: one Markdown table per metric, epochs down, taps across;
* ``diagnose.png``: one panel per metric, one curve per tap against epoch (accuracies and
  :math:`\Delta R` side by side; the two-views panel draws seen images solid, held-out dashed).

:math:`\Delta R` values of different taps are not directly comparable in size (the rate grows
with the width :math:`d`); read each curve against its own epochs.
"""

from __future__ import annotations

import csv
import json
import os
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from . import runtime
from .config import UMMConfig
from .data import load_splits
from .evaluate import Evaluator
from .model import TAPS, load_pretrained, tap_features
from .pretrain import list_checkpoints

__all__ = ["METRICS", "diagnose", "format_diagnostic", "plot_diagnostic", "resolve_checkpoints"]

METRICS = ("probe", "knn", "dr_class", "dr_views_seen", "dr_views_unseen")


def resolve_checkpoints(paths: list[str]) -> list[str]:
    """Expand folders (a pretraining run folder or its ``checkpoints/``) into their epoch files."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = list_checkpoints(p)
            if not found:
                raise FileNotFoundError(f"`checkpoints`: no epoch_XXXX.pt files in {p!r}.")
            out += found
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"`checkpoints`: {p!r} is neither a file nor a folder.")
    if not out:
        raise ValueError("`checkpoints` is empty; pass checkpoint files or a pretraining run folder.")
    return out


def diagnose(cfg: UMMConfig, checkpoints: list[str], out_dir: str, *, progress: bool = True) -> list[dict[str, Any]]:
    """Run the diagnostic over ``checkpoints`` and write the table and plot; return the rows."""
    dev = runtime.setup(cfg)
    files = resolve_checkpoints(checkpoints)
    evaluator = Evaluator(load_splits(cfg), cfg, dev)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for k, path in enumerate(tqdm(files, desc="umm diagnose", disable=not progress)):
        backbone, projector, ck = load_pretrained(path, cfg, dev)
        backbone.eval()
        projector.eval()
        epoch = int(ck.get("epoch", k))
        cache: dict[str, dict[str, torch.Tensor]] = {}
        keys = ("train", "test", "seen1", "seen2", "unseen1", "unseen2")
        for key, x in zip(keys, (evaluator.train_x, evaluator.test_x, *evaluator.seen, *evaluator.unseen)):
            parts = [tap_features(backbone, projector, x[i : i + 512].to(dev)) for i in range(0, len(x), 512)]
            cache[key] = {t: torch.cat([p[t].cpu() for p in parts]) for t in TAPS}
        for tap in TAPS:
            m = evaluator.metrics_of({key: cache[key][tap] for key in keys})
            rows.append({"epoch": epoch, "tap": tap, **m})
    if runtime.is_main():
        write_diagnostic(rows, out_dir, meta={"config": cfg.to_dict(), "checkpoints": files,
                                              "time_s": time.perf_counter() - t0})  # fmt: skip
    return rows


def format_diagnostic(rows: list[dict[str, Any]]) -> str:
    """One Markdown table per metric (epochs down, taps across)."""
    titles = {
        "probe": "Linear-probe top-1 (test)",
        "knn": "kNN top-1 (test)",
        "dr_class": "Coding-rate reduction, class partition (test)",
        "dr_views_seen": "Coding-rate reduction, two-views partition, pretraining images (seen)",
        "dr_views_unseen": "Coding-rate reduction, two-views partition, held-out images (unseen)",
    }
    epochs = sorted({r["epoch"] for r in rows})
    taps = [t for t in TAPS if any(r["tap"] == t for r in rows)]
    look = {(r["epoch"], r["tap"]): r for r in rows}
    out = []
    for metric in METRICS:
        out.append(f"**{titles[metric]}**\n")
        out.append("| epoch | " + " | ".join(taps) + " |")
        out.append("|---:|" + "---:|" * len(taps))
        for e in epochs:
            fmt = "{:.3f}" if metric in ("probe", "knn") else "{:.2f}"
            out.append(f"| {e} | " + " | ".join(fmt.format(look[(e, t)][metric]) for t in taps) + " |")
        out.append("")
    return "\n".join(out)


def plot_diagnostic(rows: list[dict[str, Any]], path: str, title: str = "") -> str:
    """Four panels (probe, kNN, dR class, dR two views) with one curve per tap against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taps = [t for t in TAPS if any(r["tap"] == t for r in rows)]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    colors = plt.get_cmap("viridis")([i / max(1, len(taps) - 1) for i in range(len(taps))])
    panels = [("probe", "linear-probe top-1"), ("knn", "kNN top-1"), ("dr_class", "ΔR class partition"),
              ("dr_views_seen", "ΔR two views (solid seen, dashed held-out)")]  # fmt: skip
    for ax, (metric, label) in zip(axes, panels):
        for tap, c in zip(taps, colors):
            sub = sorted((r for r in rows if r["tap"] == tap), key=lambda r: r["epoch"])
            ep = [r["epoch"] for r in sub]
            ax.plot(ep, [r[metric] for r in sub], "o-", color=c, label=tap, ms=3)
            if metric == "dr_views_seen":
                ax.plot(ep, [r["dr_views_unseen"] for r in sub], "--", color=c, lw=1)
        ax.set_xlabel("pretraining epoch")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_diagnostic(rows: list[dict[str, Any]], out_dir: str, meta: dict[str, Any] | None = None) -> None:
    """Write ``diagnose.{json,csv,md,png}`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "diagnose.json"), "w") as f:
        json.dump({"rows": rows, **(meta or {})}, f, indent=1)
    with open(os.path.join(out_dir, "diagnose.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", "tap", *METRICS])
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out_dir, "diagnose.md"), "w") as f:
        f.write(format_diagnostic(rows))
    cfg = (meta or {}).get("config", {})
    plot_diagnostic(rows, os.path.join(out_dir, "diagnose.png"),
                    title=f"{cfg.get('dataset', '')} {cfg.get('arch', '')} width {cfg.get('width', '')}, "
                          f"{cfg.get('n_pretrain', '')} pretraining images, eps2={cfg.get('eps2', '')}")  # fmt: skip
