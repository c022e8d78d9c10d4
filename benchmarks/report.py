"""Turn pytest-benchmark JSON files into a Markdown report with PNG plots.

Usage::

    python -m benchmarks.report results/full/*.json --out results/full/report
    python -m benchmarks.report results/full/*.json --out docs/benchmarks --md docs/benchmarks.md \\
        --intro benchmarks/REPORT_INTRO.md

Writes ``<out>/report.md`` (or ``--md``) and ``<out>/*.png``: HVP-mode cost ratios, error vs time
and error vs HVPs per problem, peers at matched accuracy. Every table and plot is printed with the
exact command that produced its numbers (stored in the JSON by ``benchmarks/conftest.py``). Times
are medians over the rounds pytest-benchmark ran; ratios are taken between benchmarks of the same
JSON file, i.e. measured side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

__all__ = ["Entry", "load", "build_report", "main"]


@dataclass
class Entry:
    """One benchmark: its median time (s), ``extra_info`` and the run it came from."""

    name: str
    group: str
    median: float
    minimum: float
    rounds: int
    info: dict[str, Any]
    run: dict[str, Any]


def load(paths: Iterable[str | os.PathLike]) -> list[Entry]:
    """Read pytest-benchmark JSON files into :class:`Entry` objects."""
    entries = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        run = dict(data.get("hypergrad", {}))
        machine = data.get("machine_info", {})
        run["machine"] = machine.get("cpu", {}).get("brand_raw") or machine.get("processor") or "unknown CPU"
        run["node"] = machine.get("node", "")
        run["datetime"] = data.get("datetime", "")
        run["file"] = str(path)
        for b in data.get("benchmarks", []):
            entries.append(
                Entry(
                    b["name"],
                    b.get("group") or "",
                    b["stats"]["median"],
                    b["stats"]["min"],
                    b["stats"]["rounds"],
                    b.get("extra_info", {}),
                    run,
                )
            )
    return entries


def _t(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "n/a"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _mem(b: Any) -> str:
    return "n/a" if b is None else f"{b / 2**20:.3g} MiB"


def _e(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1e}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _command(entries: list[Entry]) -> str:
    cmds = sorted({e.run.get("command", "?") for e in entries})
    where = sorted(
        {
            f"{e.run.get('machine')} ({e.run.get('device', 'cpu')}, {e.run.get('threads', '?')} thread(s), "
            f"torch {e.run.get('torch', '?')})"
            for e in entries
        }
    )
    return "Command: " + "; ".join(f"`{c}`" for c in cmds) + "  \nMachine: " + "; ".join(where) + "\n"


def _plot(path: Path, draw) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the report still works without matplotlib
        return None
    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _hvp_section(entries: list[Entry], out: Path) -> list[str]:
    by_model: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        if e.info.get("kind") in ("hvp", "hvp_solve"):
            by_model[e.info["model"]].append(e)
    if not by_model:
        return []
    md = [
        "## HVP modes: cost relative to one gradient",
        "",
        "One HVP = build `HessianOperator(f, params, mode)` and apply it once (float32). "
        "`cgK[mode]` = `proximal_grad` with `CG(max_steps=K)`: one operator, K HVPs. Ratio = median time / "
        "median time of one `torch.func.grad` of the same loss, measured in the same process.",
        "",
    ]
    ratios: dict[str, dict[str, float]] = {}
    for model, es in by_model.items():
        grad = next((e for e in es if e.info.get("op") == "grad"), None)
        if grad is None:
            continue
        md += [f"### {model}: {grad.info.get('description', '')}, {grad.info.get('num_params')} params", ""]
        rows = []
        for e in sorted(es, key=lambda e: (e.info["kind"], e.info.get("budget", 0), e.info["op"])):
            ratio = e.median / grad.median
            per_hvp = ratio / e.info["budget"] if e.info["kind"] == "hvp_solve" else None
            err = e.info.get("rel_err_vs_fwd_rev", e.info.get("rel_err_vs_rev_rev"))
            rows.append(
                [
                    e.info["op"],
                    _t(e.median),
                    f"{ratio:.2f}",
                    "" if per_hvp is None else f"{per_hvp:.2f}",
                    _mem(e.info.get("peak_mem_bytes")),
                    _e(err),
                ]
            )
            if e.info["kind"] == "hvp":
                ratios.setdefault(model, {})[e.info["op"]] = ratio
        md += [
            _table(["op", "median time", "x grad", "x grad per HVP", "peak mem", "rel. diff vs other mode"], rows),
            "",
            _command(es),
        ]
    if ratios:

        def draw(plt):
            modes = ["fwd_rev", "rev_rev", "rev_rev_cached", "finite_diff"]
            fig, ax = plt.subplots(figsize=(7, 3.5))
            width = 0.8 / len(ratios)
            for i, (model, r) in enumerate(ratios.items()):
                ax.bar(
                    [j + i * width for j in range(len(modes))],
                    [r.get(m, float("nan")) for m in modes],
                    width,
                    label=model,
                )
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(modes))], modes)
            ax.set_ylabel("time of one HVP / one gradient")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.legend()
            return fig

        name = _plot(out / "hvp_ratios.png", draw)
        if name:
            md += [f"![HVP cost ratios]({out.name}/{name})", ""]
    return md


def _overhead_section(entries: list[Entry]) -> list[str]:
    pairs: dict[tuple, dict[str, Entry]] = defaultdict(dict)
    for e in entries:
        if e.info.get("kind") == "overhead":
            pairs[(e.info["model"], e.info["mode"], e.info["budget"])][e.info["variant"]] = e
    rows = []
    for (model, mode, k), p in sorted(pairs.items()):
        if "cg" in p and "bare" in p:
            cg, bare = p["cg"], p["bare"]
            rows.append(
                [
                    model,
                    mode,
                    k,
                    _t(cg.median),
                    _t(bare.median),
                    f"{cg.median / bare.median:.2f}",
                    f"{cg.minimum / bare.minimum:.2f}",
                    f"{cg.rounds}/{bare.rounds}",
                ]
            )
    if not rows:
        return []
    used = [e for e in entries if e.info.get("kind") == "overhead"]
    return [
        "## Overhead of the solver machinery",
        "",
        "time(one gradient + `CG(max_steps=K)` on `HessianOperator`) / time(one gradient + K bare `torch.func` "
        "HVPs). 1.00 means no overhead. Medians, and the ratio of the fastest rounds (less sensitive to "
        "load spikes on a shared machine).",
        "",
        _table(
            [
                "model",
                "HVP mode",
                "K",
                "CG solve (median)",
                "bare HVPs (median)",
                "ratio of medians",
                "ratio of minima",
                "rounds",
            ],
            rows,
        ),
        "",
        _command(used),
    ]


def _solver_section(entries: list[Entry], out: Path) -> list[str]:
    by_problem: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        if e.info.get("kind") == "solver":
            by_problem[e.info["problem"]].append(e)
    if not by_problem:
        return []
    md = [
        "## Solvers x problems",
        "",
        "Relative error of the hypergradient against the exact one (closed form or dense solve); HVPs = "
        "the solver's matvecs (for `unrolled`: differentiated inner steps). Budget K = `max_steps`.",
        "",
    ]
    for problem, es in by_problem.items():
        md += [f"### {problem}: {es[0].info.get('description', '')}", ""]
        rows = [
            [
                e.info["method"],
                e.info["budget"],
                _t(e.median),
                e.info["num_hvps"],
                _e(e.info["rel_err"]),
                _mem(e.info.get("peak_mem_bytes")),
                e.info["status"],
            ]
            for e in sorted(es, key=lambda e: (e.info["method"], e.info["budget"]))
        ]
        md += [_table(["method", "K", "median time", "HVPs", "rel. error", "peak mem", "status"], rows), ""]

        def draw(plt, es=es, problem=problem):
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
            series: dict[str, list[Entry]] = defaultdict(list)
            for e in es:
                series[e.info["method"]].append(e)
            for method, pts in sorted(series.items()):
                pts.sort(key=lambda e: e.info["budget"])
                errs = [max(e.info["rel_err"], 1e-17) for e in pts]
                axes[0].loglog([e.median for e in pts], errs, "o-", label=method, ms=3)
                axes[1].semilogy([max(e.info["num_hvps"], 0) for e in pts], errs, "o-", label=method, ms=3)
            axes[0].set_xlabel("median time (s)")
            axes[1].set_xlabel("HVPs (solver matvecs)")
            for ax in axes:
                ax.set_ylabel("relative error")
                ax.grid(True, which="both", alpha=0.3)
            axes[1].legend(fontsize=7)
            fig.suptitle(problem)
            return fig

        name = _plot(out / f"solvers_{problem}.png", draw)
        if name:
            md += [f"![error vs time and HVPs, {problem}]({out.name}/{name})", ""]
        md += [_command(es)]
    return md


def _warm_section(entries: list[Entry]) -> list[str]:
    es = [e for e in entries if e.info.get("kind") == "warm_start"]
    if not es:
        return []
    pairs: dict[tuple, dict[bool, Entry]] = defaultdict(dict)
    for e in es:
        pairs[(e.info["problem"], e.info["regime"])][bool(e.info["warm"])] = e
    rows = []
    for (problem, regime), p in sorted(pairs.items()):
        if True in p and False in p:
            c, w = p[False], p[True]
            rows.append(
                [
                    problem,
                    regime,
                    c.info["outer_steps"],
                    _t(c.median),
                    _t(w.median),
                    f"{w.median / c.median:.2f}",
                    c.info["total_hvps"],
                    w.info["total_hvps"],
                    _e(c.info["mean_rel_err"]),
                    _e(w.info["mean_rel_err"]),
                ]
            )
    return [
        "## Warm start across consecutive outer steps",
        "",
        "`tol`: `CG(max_steps=500, rtol=1e-8)`; `budget`: `CG(max_steps=4)`. Warm = `x0` from the previous "
        "outer step's solution.",
        "",
        _table(
            [
                "problem",
                "regime",
                "outer steps",
                "cold time",
                "warm time",
                "warm/cold",
                "cold HVPs",
                "warm HVPs",
                "cold mean err",
                "warm mean err",
            ],
            rows,
        ),
        "",
        _command(es),
    ]


def _peer_section(entries: list[Entry], out: Path) -> list[str]:
    acc = [e for e in entries if e.info.get("kind") == "peer_acc"]
    its = [e for e in entries if e.info.get("kind") == "peer_iters"]
    md: list[str] = []
    if acc:
        md += [
            "## Peers at matched accuracy (relative error <= 1e-6)",
            "",
            "Each method at the smallest budget reaching the target (doubling + bisection before timing). "
            "`reached = no`: never reached within the largest budget tried; timed at its most accurate budget.",
            "",
        ]
        by_problem: dict[str, list[Entry]] = defaultdict(list)
        for e in acc:
            by_problem[e.info["problem"]].append(e)
        for problem, es in by_problem.items():
            md += [f"### {problem}: {es[0].info.get('description', '')}", ""]
            rows = [
                [
                    e.info["library"],
                    e.info["method"],
                    e.info["budget"],
                    _t(e.median),
                    _e(e.info["rel_err"]),
                    "yes" if e.info["reached"] else "no",
                    _mem(e.info.get("peak_mem_bytes")),
                ]
                for e in sorted(es, key=lambda e: (e.info["library"], e.median))
            ]
            md += [_table(["library", "method", "K", "median time", "rel. error", "reached", "peak mem"], rows), ""]
            best: dict[str, Entry] = {}
            for e in es:
                if e.info["reached"] and (e.info["library"] not in best or e.median < best[e.info["library"]].median):
                    best[e.info["library"]] = e
            if "hypergrad" in best:
                h = best["hypergrad"]
                rows = [
                    [lib, f"{b.info['method']} (K={b.info['budget']})", _t(b.median), f"{h.median / b.median:.2f}"]
                    for lib, b in sorted(best.items())
                    if lib != "hypergrad"
                ]
                md += [
                    f"hypergrad's best: **{h.info['method']}** (K={h.info['budget']}, {_t(h.median)}). "
                    "Ratio = time(hypergrad best) / time(peer best); above 1 means hypergrad is slower.",
                    "",
                    _table(["peer", "peer's best", "time", "hypergrad / peer"], rows),
                    "",
                ]
            md += [_command(es)]
    if its:
        md += ["## Peers at matched iteration counts", ""]
        by_key: dict[tuple, list[Entry]] = defaultdict(list)
        for e in its:
            by_key[(e.info["problem"], e.info["budget"])].append(e)
        for (problem, k), es in sorted(by_key.items()):
            rows = [
                [e.info["library"], e.info["method"], _t(e.median), _e(e.info["rel_err"])]
                for e in sorted(es, key=lambda e: e.median)
            ]
            md += [f"### {problem}, K = {k}", "", _table(["library", "method", "median time", "rel. error"], rows), ""]
        md += [_command(its)]
    return md


def build_report(entries: list[Entry], out: Path, intro: str = "") -> str:
    """The Markdown report (plots are written into ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    runs = {e.run.get("file"): e.run for e in entries}
    md = [intro.rstrip(), ""] if intro else ["# hypergrad benchmark report", ""]
    md += [
        "Runs: "
        + "; ".join(
            f"`{Path(f).name}` ({r.get('datetime', '')[:19]}, preset {r.get('preset')}, "
            f"{r.get('device')}, {r.get('machine')})"
            for f, r in sorted(runs.items())
        ),
        "",
    ]
    peers = next((r.get("peers") for r in runs.values() if r.get("peers")), None)
    if peers:
        md += ["Peer versions: " + ", ".join(f"{k} {v or 'absent'}" for k, v in peers.items()), ""]
    md += _hvp_section(entries, out) + _overhead_section(entries) + _solver_section(entries, out)
    md += _warm_section(entries) + _peer_section(entries, out)
    return "\n".join(md).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--out", required=True, help="folder for the plots (and report.md unless --md)")
    parser.add_argument("--md", help="where to write the Markdown (default: OUT/report.md)")
    parser.add_argument("--intro", help="a Markdown file put at the top of the report")
    args = parser.parse_args(argv)
    out = Path(args.out)
    md_path = Path(args.md) if args.md else out / "report.md"
    intro = Path(args.intro).read_text() if args.intro else ""
    text = build_report(load(args.json), out, intro)
    # image links are relative to the Markdown file
    rel = os.path.relpath(out, md_path.parent)
    text = text.replace(f"]({out.name}/", f"]({rel}/")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    print(f"wrote {md_path} and plots in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
