r"""``ablate``: one BiSSL setting changed at a time around a preset, one table.

From one pretrained checkpoint (the preset's ``pretrain`` stage, shared), the BiSSL stage is run
for the preset itself and for every variant of the grid, each changing one setting:

* ``lam`` - :math:`\lambda` (the thesis finds BiSSL robust to most hyper-parameters given enough
  training);
* ``damping`` - the damping of the linear system;
* ``cg_steps`` - CG iterations; ``0`` means no implicit Jacobian at all (``hypergrad.Identity``:
  :math:`x = \nabla_{\theta_P} L_D`);
* ``steps`` - ``N_L/N_U``, lower and upper steps per alternation.

Each stage's backbone is fine-tuned with the preset's protocol on the shared split and the same
seeds as the baseline (the pretext backbone), and the table reports top-1, the paired gap to the
baseline with its 95 % CI and p-value, the fraction of failed solves and the final proximal share.
Output: ``<run_dir>/ablation.{md,json}``.

Example::

    python -m applications.bissl ablate --preset demo --grid "lam=1e-3,1e-2;damping=10,100;cg_steps=0,5;steps=8/4,4/8"
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

from hypergrad import CG, Identity

from .config import PipelineConfig
from .finetune import finetune
from .pretrain import pretrain
from .results import paired_stats
from .stage_bissl import run_bissl

__all__ = ["parse_grid", "variants", "run_ablation", "DEFAULT_GRID"]

DEFAULT_GRID = "lam=1e-3,1e-2;damping=10,100;cg_steps=0,5;steps=8/4,4/8"
FACTORS = ("lam", "damping", "cg_steps", "steps")


def parse_grid(text: str) -> dict[str, list[str]]:
    """``"lam=1e-3,1e-2;steps=20/8"`` -> ``{"lam": ["1e-3", "1e-2"], "steps": ["20/8"]}``.

    Example:
        >>> parse_grid("lam=1e-3,1e-2; cg_steps=0")
        {'lam': ['1e-3', '1e-2'], 'cg_steps': ['0']}
    """
    grid: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in FACTORS or not values.strip():
            raise ValueError(f"--grid: bad entry {part!r}; use factor=v1,v2 with factor one of {FACTORS}.")
        grid[name] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def _apply(cfg: PipelineConfig, factor: str, value: str) -> PipelineConfig:
    b = cfg.bissl
    try:
        if factor == "lam":
            b = dataclasses.replace(b, method=dataclasses.replace(b.method, lam=float(value)))
        elif factor == "damping":
            b = dataclasses.replace(b, method=dataclasses.replace(b.method, damping=float(value)))
        elif factor == "cg_steps":
            n = int(value)
            b = dataclasses.replace(
                b, method=dataclasses.replace(b.method, solver=Identity() if n == 0 else CG(max_steps=n))
            )
        else:
            lo, _, up = value.partition("/")
            b = dataclasses.replace(b, lower_steps=int(lo), upper_steps=int(up))
    except ValueError as err:
        raise ValueError(f"--grid: {factor}={value!r}: {err}") from None
    return dataclasses.replace(cfg, bissl=b)


def variants(cfg: PipelineConfig, grid: dict[str, list[str]]) -> list[tuple[str, PipelineConfig]]:
    """``[("preset", cfg), ("lam=1e-2", cfg'), ...]``: the preset plus one change per entry."""
    out = [("preset", cfg)]
    for factor, values in grid.items():
        for v in values:
            out.append((f"{factor}={v}", _apply(cfg, factor, v)))
    return out


def _describe(c: PipelineConfig) -> dict[str, Any]:
    b, m = c.bissl, c.bissl.method
    steps = 0 if isinstance(m.solver, Identity) else getattr(m.solver, "max_steps", float("nan"))
    return {"lam": m.lam, "damping": m.damping, "cg_steps": steps, "steps": f"{b.lower_steps}/{b.upper_steps}"}


def run_ablation(
    cfg: PipelineConfig, grid: dict[str, list[str]], *, resume: bool = True, echo: Callable[[str], Any] = print
) -> str:
    """Run every variant for ``cfg.downstream[0]``; write and return the Markdown table."""
    task = cfg.downstream[0]
    cfg = dataclasses.replace(cfg, bissl=dataclasses.replace(cfg.bissl, downstream=task))
    todo = variants(cfg, grid)  # a bad --grid value fails here, before any stage runs
    pre = pretrain(cfg, resume=resume, progress=False)
    base = finetune(cfg, task, "pretext", pre, resume=resume)
    rows = []
    for name, vc in todo:
        safe = name.replace("/", "_").replace("=", "_")
        vdir = os.path.join(cfg.run_dir, "ablate", safe)
        vc = dataclasses.replace(vc, log_dir=os.path.join(vdir, "logs"))
        path = run_bissl(vc, pre, os.path.join(vdir, "stage"), resume=resume)
        with open(os.path.join(vdir, "stage", "summary.json")) as f:
            summ = json.load(f)
        r = finetune(vc, task, "bissl", path, out_dir=os.path.join(vdir, "finetune"), resume=resume)
        ps = paired_stats(r["test_top1"], base["test_top1"])
        rows.append({"variant": name, **_describe(vc), "result": r, "paired": ps, "stage": summ})
        echo(f"[ablate] {name}: {r['mean']:.2f} ± {r['std']:.2f} (gap {ps['gap']:+.2f})")
    lines = [
        f"### BiSSL ablation, {cfg.name} preset: pretext {cfg.pretrain.dataset} -> downstream {task}",
        "",
        f"Baseline (pretext backbone): {base['mean']:.2f} ± {base['std']:.2f} over {len(base['test_top1'])} seeds.",
        "",
        "| variant | lam | damping | CG steps | N_L/N_U | top-1 % | gap vs baseline [95 % CI] | p | failed solves | final proximal share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ps, r, s = row["paired"], row["result"], row["stage"]
        ci = "n/a" if math.isnan(ps["ci_low"]) else f"[{ps['ci_low']:+.2f}, {ps['ci_high']:+.2f}]"
        lines.append(
            f"| {row['variant']} | {row['lam']:g} | {row['damping']:g} | {row['cg_steps']} | {row['steps']} | "
            f"{r['mean']:.2f} ± {r['std']:.2f} | {ps['gap']:+.2f} {ci} | {ps['p']:.3g} | "
            f"{100 * s['solves_failed_frac']:.0f} % | {s['final_proximal_share']:.3g} |"
        )
    md = "\n".join(lines) + "\n"
    with open(os.path.join(cfg.run_dir, "ablation.md"), "w") as f:
        f.write(md)
    with open(os.path.join(cfg.run_dir, "ablation.json"), "w") as f:
        json.dump({"baseline": base, "rows": rows}, f, indent=1, default=str)
    echo(md)
    return md
