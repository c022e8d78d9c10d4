"""The README's main job (`bash run.sh demo` = the BiSSL `demo` preset) runs end to end in CI.

Run as a subprocess, exactly as the README's command does after installing, with offline data
only (Fashion-MNIST pretext when the Debian package is present, photo patches otherwise; digits
downstream). CI runs it at its smallest size (fewer epochs, alternations, trials and runs given as
flags on top of the preset) so the test command stays fast; every stage and output still runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: the demo preset at its smallest size: same stages, data and outputs, less compute
SMALLEST = ["--pretrain-epochs", "1", "--alternations", "2", "--ft-epochs", "2", "--hpo-trials", "2"]
SMALLEST += ["--hpo-epochs", "1", "--num-runs", "2"]


@pytest.mark.slow
def test_demo_preset_runs_end_to_end_and_writes_the_table(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "applications.bissl",
            "run",
            "--preset",
            "demo",
            "--out-dir",
            str(tmp_path),
            "--no-progress",
            *SMALLEST,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "demo"
    for name in ("results.md", "results.json", "results.png"):
        assert (out / name).stat().st_size > 0, name
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["task"] for r in rows] == ["digits"]
    row = rows[0]
    assert row["baseline_runs"] == row["bissl_runs"] == 2
    for key in ("baseline_mean", "bissl_mean"):  # well above chance (10 %) on 10-class digits
        assert 30.0 < row[key] <= 100.0, row
    assert math.isclose(row["gap"], row["bissl_mean"] - row["baseline_mean"], abs_tol=1e-9)
    assert "| digits |" in proc.stdout  # the table is printed, as the README says
    assert (out / "bissl" / "digits" / "lower_backbone.pt").exists()  # the backbone fine-tuned afterwards
