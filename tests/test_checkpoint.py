"""Atomic checkpoints: round trip, failure during a save, and a process killed while saving."""

from __future__ import annotations

import errno
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
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


# ---------------------------------------------------------------------------------------------
# Integrity: checksums, foreign files, kinds, formats, disk full, permissions
# ---------------------------------------------------------------------------------------------


def _saved(tmp_path: Path, **kw) -> tuple[Path, torch.Tensor]:
    w = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    path = hypergrad.save_checkpoint({"w": w, "meta": {"name": "alpha-value-XYZ", "step": 5}}, tmp_path / "c.pt", **kw)
    return path, w


@pytest.mark.parametrize("offset", [0, 17, 511])
def test_flipped_byte_inside_a_tensor_is_detected(tmp_path: Path, offset: int) -> None:
    path, w = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    start = data.find(w.numpy().tobytes())
    assert start > 0  # the tensor's bytes are stored verbatim in the archive
    data[start + offset] ^= 0x01
    path.write_bytes(bytes(data))
    changed = torch.load(path, weights_only=True)["w"]  # what torch alone would silently return
    assert not torch.equal(changed, w)
    with pytest.raises(hypergrad.CheckpointError, match=r"is corrupted: the SHA-256 of tensor /'w' differs") as info:
        hypergrad.load_checkpoint(path)
    assert info.value.path == path


def test_changed_plain_value_is_detected(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    data = path.read_bytes()
    assert data.count(b"alpha-value-XYZ") == 1
    path.write_bytes(data.replace(b"alpha-value-XYZ", b"alpha-value-XYQ"))
    assert torch.load(path, weights_only=True)["meta"]["name"] == "alpha-value-XYQ"
    with pytest.raises(hypergrad.CheckpointError, match=r"is corrupted: its keys or non-tensor values differ"):
        hypergrad.load_checkpoint(path)


def test_record_is_stripped_and_plain_torch_load_still_works(tmp_path: Path) -> None:
    path, w = _saved(tmp_path, kind="demo")
    raw = torch.load(path, weights_only=True)
    assert raw["__hypergrad_checkpoint__"]["format"] == hypergrad.checkpoint.FORMAT_VERSION == 2
    assert raw["__hypergrad_checkpoint__"]["kind"] == "demo"
    back = hypergrad.load_checkpoint(path, expected_kind="demo")
    assert (
        set(back) == {"w", "meta"}
        and torch.equal(back["w"], w)
        and back["meta"] == {"name": "alpha-value-XYZ", "step": 5}
    )


def test_every_dtype_and_odd_tensors_round_trip(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {
        f"{dt}".split(".")[1]: torch.arange(5).to(dt)
        for dt in (torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool, torch.complex64)
    }
    state.update(
        {"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "view": base.T, "param": torch.nn.Parameter(base)}
    )
    state["optim"] = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    back = hypergrad.load_checkpoint(hypergrad.save_checkpoint(state, tmp_path / "d.pt"))
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert back[k].dtype == v.dtype and torch.equal(back[k], v.detach()), k
    assert back["optim"]["state"][0]["step"] == 3.0 and back["optim"]["param_groups"] == [{"lr": 0.1, "params": [0]}]


def _foreign(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    good = hypergrad.save_checkpoint({"w": torch.ones(1000)}, tmp_path / "good.pt").read_bytes()
    return {
        "empty": (b"", r"is empty \(0 bytes\)"),
        "truncated": (good[: len(good) // 2], r"is truncated \(\d+ bytes; a copy or a save was interrupted\)"),
        "truncated_tiny": (good[:3], r"is truncated"),
        "random": (bytes(range(7, 250)) * 3, r"is not a checkpoint \(729 bytes starting with"),
        "text": (b"hello\n", r"is not a checkpoint \(6 bytes"),
        "pickle": (pickle.dumps({"w": [1.0, 2.0]}), r"is a bare pickle or a legacy-format torch file"),
    }


@pytest.mark.parametrize("case", ["empty", "truncated", "truncated_tiny", "random", "text", "pickle"])
def test_unreadable_files_get_a_clear_error(tmp_path: Path, case: str) -> None:
    data, regex = _foreign(tmp_path)[case]
    path = tmp_path / f"{case}.pt"
    path.write_bytes(data)
    with pytest.raises(hypergrad.CheckpointError, match=regex) as info:
        hypergrad.load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "weights_only=False" not in message
    assert "Delete it (or start afresh, e.g. --no-resume)" in message


def test_file_holding_objects_names_the_object_and_the_trusted_way(tmp_path: Path) -> None:
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "obj.pt")
    with pytest.raises(hypergrad.CheckpointError, match=r"refuses to unpickle \(WeightsUnpickler error: .*Linear"):
        hypergrad.load_checkpoint(tmp_path / "obj.pt")
    assert isinstance(
        hypergrad.load_checkpoint(tmp_path / "obj.pt", weights_only=False, unverified="allow")["model"], torch.nn.Linear
    )


def test_kind_mismatch_is_refused(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path, kind="bissl-backbone")
    with pytest.raises(hypergrad.CheckpointError, match=r"holds a 'bissl-backbone' checkpoint, but a 'pretrained' one"):
        hypergrad.load_checkpoint(path, expected_kind="pretrained")
    untagged, _ = _saved(tmp_path / "u")
    with pytest.raises(hypergrad.CheckpointError, match=r"holds a None checkpoint, but a 'pretrained' one"):
        hypergrad.load_checkpoint(untagged, expected_kind="pretrained")


def test_legacy_file_without_record(tmp_path: Path) -> None:
    """A format-1 file (a bare torch.save dict, as hypergrad <= 0.1.0 wrote) loads with a warning, or is refused."""
    torch.save({"w": torch.ones(2), "step": 4}, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match=r"has no integrity record .*loaded without checksum verification"):
        assert hypergrad.load_checkpoint(tmp_path / "old.pt")["step"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hypergrad.load_checkpoint(tmp_path / "old.pt", unverified="allow")["step"] == 4
    with pytest.raises(hypergrad.CheckpointError, match=r"cannot be verified and is refused; expected .* of kind 'x'"):
        hypergrad.load_checkpoint(tmp_path / "old.pt", expected_kind="x", unverified="raise")


def test_newer_format_is_refused(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    raw = torch.load(path, weights_only=True)
    raw["__hypergrad_checkpoint__"]["format"] = 99
    torch.save(raw, path)
    with pytest.raises(hypergrad.CheckpointError, match=r"has format 99, newer than this hypergrad reads \(2\)"):
        hypergrad.load_checkpoint(path)


class _FullDisk:
    """A file object that accepts ``budget`` bytes and then fails like a full disk."""

    def __init__(self, f, budget: int):
        self.f, self.budget = f, budget

    def write(self, data) -> int:
        self.budget -= len(data)
        if self.budget < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


@pytest.mark.parametrize("budget", [0, 300, 5000])
def test_disk_full_is_a_clear_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    path = tmp_path / "ckpt.pt"
    hypergrad.save_checkpoint({"version": 1, "w": torch.ones(4)}, path)
    real_fdopen = os.fdopen
    monkeypatch.setattr(checkpoint_module.os, "fdopen", lambda fd, mode: _FullDisk(real_fdopen(fd, mode), budget))
    with pytest.raises(
        OSError, match=r"no space left on device while writing checkpoint .*the previous checkpoint, if any, is intact"
    ) as info:
        hypergrad.save_checkpoint({"version": 2, "w": torch.zeros(10_000)}, path)
    assert info.value.errno == errno.ENOSPC and "enforce fail" not in str(info.value)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp file left behind
    assert hypergrad.load_checkpoint(path)["version"] == 1


def test_disk_full_at_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.os, "fsync", no_space)
    with pytest.raises(OSError, match=r"no space left on device while writing checkpoint"):
        hypergrad.save_checkpoint({"w": torch.ones(3)}, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_file_mode_follows_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        path = hypergrad.save_checkpoint({"w": torch.ones(1)}, tmp_path / "m.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda d: hypergrad.save_checkpoint({}, d / "x.pt", kind=3), TypeError, r"`kind` must be None or a str"),
        (
            lambda d: hypergrad.save_checkpoint({}, d / "x.pt", kind=" "),
            ValueError,
            r"`kind` must be None or a non-empty str",
        ),
        (
            lambda d: hypergrad.save_checkpoint({"__hypergrad_checkpoint__": 1}, d / "x.pt"),
            ValueError,
            r"`state` has the reserved key '__hypergrad_checkpoint__'",
        ),
        (lambda d: hypergrad.load_checkpoint(3), TypeError, r"`path` must be a str or os.PathLike, got int"),
        (
            lambda d: hypergrad.load_checkpoint(d),
            hypergrad.CheckpointError,
            r"is a directory; pass the checkpoint file",
        ),
        (
            lambda d: hypergrad.load_checkpoint(d / "x.pt", expected_kind=1),
            TypeError,
            r"`expected_kind` must be None or a str",
        ),
        (lambda d: hypergrad.load_checkpoint(d / "x.pt", unverified="no"), ValueError, r"`unverified` must be one of"),
    ],
)
def test_integrity_argument_errors(tmp_path: Path, call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call(tmp_path)
