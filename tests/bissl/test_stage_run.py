"""The stage scaffold (applications.bissl.stage_run.StageRun) shared by pretrain, the BiSSL stage and fine-tuning."""

from __future__ import annotations

import json

import torch

import hypergrad
from applications.bissl.stage_run import StageRun


def test_resume_save_json_and_metrics(tmp_path):
    out = tmp_path / "stage"
    with StageRun(str(out), log_dir=str(tmp_path / "logs"), progress=False) as run:
        assert out.is_dir() and not run.resumable and run.read_json("state.json") is None
        built = []
        path = run.save(lambda: built.append(1) or {"w": torch.arange(3.0)})  # built lazily, on the main process
        assert built == [1] and path == str(out / "checkpoint.pt") and run.resumable
        assert torch.equal(hypergrad.load_checkpoint(path)["w"], torch.arange(3.0))
        run.write_json("state.json", {"runs": [1.5]})
        assert run.read_json("state.json") == {"runs": [1.5]}
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "state.json"]  # no .tmp left
        for step in range(2):
            run.log(step, {"loss": float(step)})
        for _ in run.bar(range(2)):
            pass
    run.close()  # idempotent
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [0.0, 1.0]

    again = StageRun(str(out), resume=False, progress=False)
    assert not again.resumable and again.read_json("state.json") is None  # --no-resume ignores both files
    assert StageRun(str(out), progress=False).resumable
