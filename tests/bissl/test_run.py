"""`run` end to end on the tiny preset, and the results table."""

from __future__ import annotations

import json
import math
import statistics

import torch

from applications.bissl.cli import main
from applications.bissl.results import format_markdown, results_table


def test_results_table_statistics():
    rows = results_table(
        [
            {"task": "a", "origin": "pretext", "test_top1": [80.0, 82.0, 84.0]},
            {"task": "a", "origin": "bissl", "test_top1": [85.0, 85.0, 88.0]},
            {"task": "b", "origin": "pretext", "test_top1": [50.0]},
        ]
    )
    a, b = rows
    assert (a["baseline_mean"], a["baseline_std"], a["bissl_mean"]) == (82.0, 2.0, 86.0)
    assert math.isclose(a["bissl_std"], math.sqrt(3.0)) and a["gap"] == 4.0 and a["bissl_runs"] == 3
    assert math.isnan(b["bissl_mean"]) and math.isnan(b["gap"])
    md = format_markdown(rows)
    assert (
        "| a | 82.00 ± 2.00 | 86.00 ± 1.73 | +4.00 [+1.52, +6.48] p=0.0202 MDE 3.10 | 3 / 3 |" in md
        and "| b | 50.00 ± 0.00 | n/a | n/a | 1 / 0 |" in md
    )


def test_run_tiny_end_to_end(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["run", "--preset", "tiny", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    run_dir = tmp_path / "tiny"
    md = (run_dir / "results.md").read_text()
    assert md in out  # the table is printed
    data = json.loads((run_dir / "results.json").read_text())
    (row,) = data["rows"]
    assert row["task"] == "digits" and row["baseline_runs"] == row["bissl_runs"] == 2
    by_origin = {r["origin"]: r for r in data["results"]}
    assert set(by_origin) == {"pretext", "bissl"}
    for origin, key in (("pretext", "baseline"), ("bissl", "bissl")):
        accs = by_origin[origin]["test_top1"]
        assert math.isclose(row[f"{key}_mean"], sum(accs) / len(accs))
    assert math.isclose(row["gap"], row["bissl_mean"] - row["baseline_mean"])
    assert (run_dir / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert data["meta"]["timings"]["total_s"] > 0 and data["meta"]["config"]["bissl"]["method"]["solver"].startswith(
        "CG("
    )
    for stage in (
        "pretrain/pretrained.pt",
        "bissl/digits/lower_backbone.pt",
        "finetune/digits/bissl/result.json",
        "logs/bissl/digits/metrics.csv",
    ):
        assert (run_dir / stage).exists()
    rows = (run_dir / "logs" / "finetune" / "digits" / "bissl" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 + 2 and "test_top1" in rows[0]  # header, 2 HPO trials, 2 seeded runs
    # Re-running resumes every stage from its outputs and reproduces the table.
    main(["run", "--preset", "tiny", "--out-dir", str(tmp_path), "--no-progress"])
    torch.set_num_threads(threads)
    assert (run_dir / "results.md").read_text() == md


def test_paired_stats_match_scipy_paired_t_test():
    from scipy import stats

    from applications.bissl.results import paired_stats

    a, b = [85.0, 85.0, 88.0, 90.0], [80.0, 82.0, 84.0, 89.0]
    s = paired_stats(a, b)
    ref = stats.ttest_rel(a, b)
    assert math.isclose(s["p"], float(ref.pvalue), rel_tol=1e-9)
    ci = ref.confidence_interval(0.95)
    assert math.isclose(s["ci_low"], float(ci.low), rel_tol=1e-9) and math.isclose(
        s["ci_high"], float(ci.high), rel_tol=1e-9
    )
    d = [x - y for x, y in zip(a, b)]
    se = statistics.stdev(d) / math.sqrt(len(d))
    assert math.isclose(s["mde"], (stats.t.ppf(0.975, 3) + stats.t.ppf(0.8, 3)) * se, rel_tol=1e-9)
