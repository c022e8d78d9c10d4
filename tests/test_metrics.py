"""MetricsLogger (CSV / JSON lines / TensorBoard) and ProgressHook."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hypergrad


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_widens_header_when_keys_appear_late(tmp_path: Path) -> None:
    with hypergrad.MetricsLogger(tmp_path) as log:
        log.log(0, {"loss": 1.5})
        log.log(1, {"loss": torch.tensor(0.25), "acc": 0.75})
        log.log(2, {"acc": 1.0})
    rows = _rows(tmp_path / "metrics.csv")
    assert list(rows[0]) == ["step", "loss", "acc"]
    assert rows == [
        {"step": "0", "loss": "1.5", "acc": ""},
        {"step": "1", "loss": "0.25", "acc": "0.75"},
        {"step": "2", "loss": "", "acc": "1.0"},
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.jsonl"]


def test_reopen_appends_and_keeps_header(tmp_path: Path) -> None:
    with hypergrad.MetricsLogger(tmp_path) as log:
        log.log(0, {"a": 1.0, "b": 2.0})
    with hypergrad.MetricsLogger(tmp_path) as log:
        log.log(1, {"b": 3.0, "c": 4.0})
    rows = _rows(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["0", "1"]
    assert rows[1] == {"step": "1", "a": "", "b": "3.0", "c": "4.0"}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1]


def test_jsonl_is_strict_json_with_nonfinite(tmp_path: Path) -> None:
    with hypergrad.MetricsLogger(tmp_path, csv=True, jsonl=True) as log:
        log.log(3, {"loss": float("nan"), "x": float("inf"), "y": 2})
    rec = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert rec == {"step": 3, "loss": None, "x": None, "y": 2.0}
    row = _rows(tmp_path / "metrics.csv")[0]
    assert math.isnan(float(row["loss"])) and float(row["x"]) == math.inf


def test_tensorboard_events_are_written(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with hypergrad.MetricsLogger(tmp_path, csv=False, jsonl=False, tensorboard=True) as log:
        for step in range(3):
            log.log(step, {"loss": 1.0 / (step + 1)})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("loss")
    assert [e.step for e in events] == [0, 1, 2]
    assert [round(e.value, 6) for e in events] == [1.0, 0.5, round(1 / 3, 6)]


def test_logger_as_problem_callback(tmp_path: Path) -> None:
    rec = hypergrad.StepRecord(
        "step", inner_steps=5, outer_steps=2, inner_losses=[0.5], outer_loss=0.25, times={"inner": 0.1}
    )
    with hypergrad.MetricsLogger(tmp_path, csv=False) as log:
        log(rec)
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["step"] == 2
    assert line["step/inner_loss"] == 0.5 and line["step/outer_loss"] == 0.25 and line["step/time_inner"] == 0.1


def test_progress_hook_drives_tqdm() -> None:
    tqdm = pytest.importorskip("tqdm")
    bar = tqdm.tqdm(total=3, disable=False, file=open("/dev/null", "w"))
    hook = hypergrad.ProgressHook(bar)
    hook(hypergrad.StepRecord("inner", inner_losses=[1.0]))  # not a "step" record: ignored
    for k in range(2):
        hook(hypergrad.StepRecord("step", inner_losses=[1.0 / (k + 1)], outer_loss=2.0))
    assert bar.n == 2
    assert bar.postfix == "inner_loss=0.5, outer_loss=2"
    bar.close()


def test_core_import_does_not_load_optional_packages() -> None:
    # torch itself may import tqdm; what matters is that hypergrad adds none of these
    code = (
        "import sys, torch; before = set(sys.modules); import hypergrad; "
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('tensorboard', 'tqdm', 'sklearn')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda d: hypergrad.MetricsLogger(3), TypeError, r"`log_dir` must be a str"),
        (lambda d: hypergrad.MetricsLogger(d, csv=False, jsonl=False), ValueError, r"all outputs are off"),
        (lambda d: hypergrad.MetricsLogger(d).log(1.5, {"a": 1}), TypeError, r"`step` must be an int"),
        (lambda d: hypergrad.MetricsLogger(d).log(1, [1]), TypeError, r"`metrics` must be a dict"),
        (lambda d: hypergrad.MetricsLogger(d).log(1, {"a": "x"}), TypeError, r"metric 'a' must be a number"),
        (lambda d: hypergrad.MetricsLogger(d).log(1, {"step": 1}), ValueError, r"must not contain the key 'step'"),
        (lambda d: hypergrad.ProgressHook(object()), TypeError, r"`bar` must have an `update` method"),
    ],
)
def test_metrics_errors(tmp_path: Path, call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call(tmp_path)


def test_log_after_close_raises(tmp_path: Path) -> None:
    log = hypergrad.MetricsLogger(tmp_path)
    log.close()
    log.close()
    with pytest.raises(RuntimeError, match="after close"):
        log.log(0, {"a": 1.0})
