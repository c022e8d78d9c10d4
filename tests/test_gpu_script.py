"""The GPU tooling runs where CI can reach it: ``.ci/gpu``'s plumbing, and the FSDP2 step-time benchmark on gloo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_parses_and_its_step_filter_runs_nothing_it_was_not_asked_for(tmp_path: Path) -> None:
    script = ROOT / ".ci" / "gpu"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_STEPS": "no step has this name"}
    proc = subprocess.run(["bash", str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GPU checks:" in proc.stdout and "rc " not in proc.stdout  # no step ran, none failed
    assert (tmp_path / "gpu.log").exists()


@pytest.mark.distributed
def test_fsdp_step_time_benchmark_reports_every_route_against_the_exact_one() -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    cmd += ["-m", "benchmarks.fsdp_step_time", "--width", "32", "--depth", "2", "--batch", "8", "--reps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = dict(re.findall(r"^\| (hypergradient\[\w+\]|train step) \|(.*)$", proc.stdout, re.M))
    assert set(rows) == {"train step"} | {
        f"hypergradient[{m}]" for m in ("finite_diff", "finite_diff_cached", "exact", "exact_gathered")
    }
    err = {k: float(v.split("|")[-2]) for k, v in rows.items() if k != "train step"}
    assert err["hypergradient[exact]"] <= 1e-6 and err["hypergradient[exact_gathered]"] == 0.0
    assert err["hypergradient[finite_diff]"] <= 1e-2  # float32 finite differences
