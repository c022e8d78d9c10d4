"""Atomic checkpoints: round trip, failure during a save, and a process killed while saving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import hypergrad
import hypergrad.checkpoint as checkpoint_module


def test_round_trip_plain_types(tmp_path: Path) -> None:
    state = {
        "step": 7,
        "lr": 0.5,
        "nested": {"w": torch.randn(3, 2), "names": ["a", "b"]},
        "rng": torch.get_rng_state(),
    }
    path = hypergrad.save_checkpoint(state, tmp_path / "sub" / "last.pt")
    back = hypergrad.load_checkpoint(path)
    assert back["step"] == 7 and back["lr"] == 0.5 and back["nested"]["names"] == ["a", "b"]
    assert torch.equal(back["nested"]["w"], state["nested"]["w"])
    assert torch.equal(back["rng"], state["rng"])
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left behind


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    hypergrad.save_checkpoint({"version": 1, "w": torch.ones(4)}, path)

    def broken_save(obj, f):  # writes half a file, then dies like a full disk would
        f.write(b"\x80\x02garbage")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        hypergrad.save_checkpoint({"version": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    back = hypergrad.load_checkpoint(path)
    assert back["version"] == 1 and torch.equal(back["w"], torch.ones(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


_SAVER = textwrap.dedent(
    """
    import sys, torch, hypergrad
    path = sys.argv[1]
    i = 0
    while True:
        i += 1
        # 16 MB per save: a kill lands inside a write most of the time
        hypergrad.save_checkpoint({"i": i, "data": torch.full((4_000_000,), float(i))}, path)
        if i == 1:
            print("first", flush=True)
    """
)


def test_kill_during_saves_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1]
    )
    try:
        assert proc.stdout.readline().strip() == "first"
        time.sleep(0.7)  # let it overwrite the checkpoint several times, then kill it mid-loop
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    back = hypergrad.load_checkpoint(path)
    i = back["i"]
    assert i >= 1
    assert back["data"].shape == (4_000_000,) and bool((back["data"] == float(i)).all())


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda d: hypergrad.save_checkpoint([1, 2], d / "x.pt"), TypeError, r"`state` must be a dict"),
        (lambda d: hypergrad.save_checkpoint({}, 3), TypeError, r"`path` must be a str or os.PathLike"),
        (lambda d: hypergrad.save_checkpoint({}, d), ValueError, r"is a directory; pass a file name"),
        (lambda d: hypergrad.load_checkpoint(d / "missing.pt"), FileNotFoundError, r"no checkpoint at"),
    ],
)
def test_checkpoint_errors(tmp_path: Path, call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call(tmp_path)


def test_load_refuses_non_dict(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(TypeError, match="holds a list, expected a dict"):
        hypergrad.load_checkpoint(tmp_path / "list.pt")
    assert os.path.exists(tmp_path / "list.pt")
