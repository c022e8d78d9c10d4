"""The benchmark suite's small preset runs end to end, its results are checked, and the report builds.

One subprocess runs the suite's benchmark files (HVP modes, overhead, solvers, warm start, peers) with ``--preset small`` and a
single timed round each, as CI does; the benchmark functions themselves check their results after
timing (exact Dense solves, converged CG, HVP modes agreeing, warm-started tolerance solves). This
module then checks the JSON they wrote and turns it into the Markdown/PNG report. No timing is
asserted anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hypergrad

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "small.json"
    files = [f"benchmarks/bench_{name}.py" for name in ("hvp", "overhead", "solvers", "warm_start", "peers")]
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *files,
        "--preset",
        "small",
        "-q",
        "-x",
        f"--benchmark-json={out}",
        "--benchmark-min-rounds=1",
        "--benchmark-max-time=0.000001",
        "--benchmark-warmup=off",
        "--benchmark-disable-gc",
        "--no-memory",
    ]
    # a run of its own even when this suite runs under pytest-xdist (a worker's variables would make it one)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"benchmark run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    return json.loads(out.read_text()) | {"_path": str(out)}


def _by_kind(run: dict, kind: str) -> list[dict]:
    return [b["extra_info"] for b in run["benchmarks"] if b["extra_info"].get("kind") == kind]


def test_every_benchmark_family_ran_and_recorded(small_run: dict) -> None:
    kinds = {b["extra_info"].get("kind") for b in small_run["benchmarks"]}
    assert {"hvp", "hvp_solve", "overhead", "solver", "warm_start", "peer_iters", "peer_acc"} <= kinds
    for b in small_run["benchmarks"]:
        assert b["stats"]["rounds"] >= 1 and b["stats"]["median"] > 0
        assert b["extra_info"]["peak_mem_bytes"] is None  # --no-memory; measured on its own below
    assert small_run["hypergrad"]["preset"] == "small"
    assert "--preset small" in small_run["hypergrad"]["command"]
    assert "benchmarks/bench_solvers.py" in small_run["hypergrad"]["command"]


def test_solver_results_match_exact_hypergradients(small_run: dict) -> None:
    solvers = _by_kind(small_run, "solver")
    problems = {s["problem"] for s in solvers}
    assert problems == {"quadratic_k10", "quadratic_k1000", "ridge", "logistic", "hyper_cleaning", "bissl_resnet"}
    for s in solvers:
        if s["method"] == "dense":
            assert s["rel_err"] <= 1e-9, s
            assert s["num_hvps"] == s["num_params"], s
        if s["method"] in ("cg", "neumann", "fixed_point"):
            assert s["num_hvps"] == s["budget"], s
    # More CG steps never hurt on these SPD systems; 32 steps solve the well-conditioned ones.
    cg = {(s["problem"], s["budget"]): s["rel_err"] for s in solvers if s["method"] == "cg"}
    for problem in problems:
        assert cg[(problem, 32)] <= cg[(problem, 4)], problem
    for problem in ("quadratic_k10", "ridge", "logistic", "bissl_resnet"):
        assert cg[(problem, 32)] <= 1e-6, (problem, cg[(problem, 32)])
    # The first-order baseline is far off: the benchmark can tell a wrong hypergradient apart.
    assert all(s["rel_err"] > 1e-2 for s in solvers if s["method"] == "identity")


def test_hvp_modes_agree_and_all_models_ran(small_run: dict) -> None:
    hvps = _by_kind(small_run, "hvp")
    assert {(h["model"], h["op"]) for h in hvps} == {
        (m, op)
        for m in ("mlp", "resnet", "transformer")
        for op in ("grad", "fwd_rev", "rev_rev", "rev_rev_cached", "finite_diff")
    }
    for h in hvps:
        if h["op"] in ("fwd_rev", "rev_rev", "rev_rev_cached"):
            assert max(v for k, v in h.items() if k.startswith("rel_err_vs_")) <= 1e-3, h
    for s in _by_kind(small_run, "hvp_solve"):
        assert s["num_hvps"] == s["budget"]


def test_warm_start_saves_hvps_at_equal_tolerance(small_run: dict) -> None:
    warm = {(w["problem"], w["regime"], w["warm"]): w for w in _by_kind(small_run, "warm_start")}
    saved = 0
    for (problem, regime, is_warm), w in warm.items():
        if regime == "tol" and is_warm:
            cold = warm[(problem, "tol", False)]
            assert w["max_rel_err"] <= 1e-5 and cold["max_rel_err"] <= 1e-5
            # a warm start costs one matvec for its initial residual, and should save more
            assert w["total_hvps"] <= cold["total_hvps"] + w["outer_steps"], (problem, w, cold)
            saved += cold["total_hvps"] - w["total_hvps"]
        if regime == "budget" and is_warm:  # at equal cost, warm starts are at least as accurate
            assert w["mean_rel_err"] <= 1.01 * warm[(problem, "budget", False)]["mean_rel_err"], problem
    assert saved > 0


def test_overhead_pairs_and_peer_entries(small_run: dict) -> None:
    over = _by_kind(small_run, "overhead")
    pairs = {(o["model"], o["mode"], o["budget"]) for o in over if o["variant"] == "cg"}
    assert pairs == {(o["model"], o["mode"], o["budget"]) for o in over if o["variant"] == "bare"}
    assert len(pairs) >= 8
    acc = [p for p in _by_kind(small_run, "peer_acc") if p["library"] == "hypergrad"]
    reached = {(p["problem"], p["method"]) for p in acc if p["reached"]}
    assert {("quadratic_k10", "cg"), ("ridge", "cg"), ("quadratic_k10", "dense"), ("ridge", "dense")} <= reached
    for p in acc:
        if p["reached"]:
            assert p["rel_err"] <= 1e-6, p


def test_report_builds_markdown_and_plots(small_run: dict, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from benchmarks.report import main

    out = tmp_path / "report"
    assert main([small_run["_path"], "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    for header in (
        "## HVP modes",
        "## Overhead of the solver machinery",
        "## Solvers x problems",
        "## Warm start",
        "## Peers at matched accuracy",
        "## Peers at matched iteration counts",
    ):
        assert header in text
    assert "Command: `python -m pytest benchmarks/bench_hvp.py" in text and "--preset small" in text
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "hvp_ratios.png" in pngs and "solvers_ridge.png" in pngs
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({out.name}/{p.name})" in text or f"](./{p.name})" in text or f"]({p.name})" in text


def test_peak_memory_measures_allocations() -> None:
    import torch

    from benchmarks.measure import peak_memory_bytes

    def two_buffers():
        a = torch.ones(1 << 20)  # 4 MiB
        b = a * 2  # 4 MiB more while a is alive
        del a
        return b.sum()

    peak = peak_memory_bytes(two_buffers, "cpu")
    assert 8 << 20 <= peak < 9 << 20
    assert peak_memory_bytes(lambda: torch.ones(1 << 18).sum(), "cpu") < 2 << 20


def test_every_exported_solver_is_benchmarked() -> None:
    from benchmarks.solvers_registry import METHODS

    exported = {getattr(hypergrad, n) for n in hypergrad.__all__}
    solver_classes = {
        c
        for c in exported
        if isinstance(c, type)
        and issubclass(c, hypergrad.AbstractLinearSolver)
        and c is not hypergrad.AbstractLinearSolver
    }
    covered = {m.solver_class for m in METHODS.values() if m.solver_class is not None}
    # CompiledCG compiles on its first solve per shape and budget (minutes with inductor), so it is
    # benchmarked by its own script, outside the CI smoke run.
    assert "hypergrad.CompiledCG(" in (ROOT / "benchmarks" / "bench_compile.py").read_text()
    covered.add(hypergrad.CompiledCG)
    assert solver_classes <= covered, f"solvers without a benchmark entry: {solver_classes - covered}"
