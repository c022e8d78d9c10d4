r"""Atomic checkpoints: a run killed at any moment leaves the previous checkpoint readable.

:func:`save_checkpoint` writes to a temporary file in the destination's directory, flushes and
``fsync``\ s it, then renames it over the destination with :func:`os.replace` (atomic on POSIX and
Windows when both paths are on one file system) and finally ``fsync``\ s the directory so the rename
itself survives a power loss. A reader therefore sees either the old checkpoint or the new one,
never a half-written file. A kill between the write and the rename can leave a stray
``.<name>.*.tmp`` file next to the checkpoint; it is never read and can be deleted.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "get_rng_state", "set_rng_state"]


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file, flush, fsync, :func:`os.replace`).

    Args:
        state: anything :func:`torch.save` accepts; typically ``problem.state_dict()`` plus your own
            entries (epoch, config). Use plain types and tensors so it loads with
            ``weights_only=True``.
        path: destination file; its directory is created if missing.

    Returns:
        The destination as a :class:`pathlib.Path`.

    Example:
        >>> import tempfile, os, torch, hypergrad
        >>> d = tempfile.mkdtemp()
        >>> p = hypergrad.save_checkpoint({"step": 3, "w": torch.ones(2)}, os.path.join(d, "ckpt.pt"))
        >>> hypergrad.load_checkpoint(p)["step"]
        3
    """
    if not isinstance(state, dict):
        raise TypeError(f"`state` must be a dict (e.g. problem.state_dict()), got {type(state).__name__}.")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}.")
    dest = Path(path)
    if dest.is_dir():
        raise ValueError(f"`path` {str(dest)!r} is a directory; pass a file name such as {str(dest / 'last.pt')!r}.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(dest.parent)
    return dest


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device | None = "cpu",
    *,
    weights_only: bool = True,
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or any :func:`torch.save` file).

    Args:
        path: the checkpoint file.
        map_location: where tensors go (default ``"cpu"``; pass ``"cuda"`` or a device to load
            straight onto an accelerator).
        weights_only: restrict unpickling to tensors and plain types (safe for files you did not
            write). ``problem.state_dict()`` needs no more than that; pass ``False`` only for
            trusted files holding arbitrary objects.

    Returns:
        The saved dict.

    Example:
        >>> import tempfile, os, torch, hypergrad
        >>> p = os.path.join(tempfile.mkdtemp(), "c.pt")
        >>> _ = hypergrad.save_checkpoint({"w": torch.zeros(1)}, p)
        >>> hypergrad.load_checkpoint(p)["w"]
        tensor([0.])
    """
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(src)!r}; check the path (or start a fresh run).")
    state = torch.load(src, map_location=map_location, weights_only=weights_only)
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint {str(src)!r} holds a {type(state).__name__}, expected a dict.")
    return state


def _fsync_dir(directory: Path) -> None:
    """Persist a rename; best effort (some platforms cannot open directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def get_rng_state() -> dict[str, Any]:
    """The state of every random generator a training loop touches, for a bit-exact resume.

    Covers torch (CPU and each CUDA device), Python's :mod:`random` and NumPy's global generator,
    stored as tensors and plain types so a checkpoint holding it loads with ``weights_only=True``.

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor per device], "python": tuple, "numpy": dict}``;
        pass it to :func:`set_rng_state`.

    Example:
        >>> import torch, hypergrad
        >>> s = hypergrad.get_rng_state(); a = torch.rand(2)
        >>> hypergrad.set_rng_state(s); torch.equal(a, torch.rand(2))
        True
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore every random generator from a :func:`get_rng_state` dict.

    CUDA states are restored for the devices present (a CPU-only machine skips them, a machine
    with fewer GPUs restores the first ones).

    Args:
        state: the dict returned by :func:`get_rng_state` (e.g. ``problem.state_dict()["rng"]``
            after :func:`load_checkpoint`).

    Example:
        >>> import random, hypergrad
        >>> state = hypergrad.get_rng_state(); a = random.random()
        >>> hypergrad.set_rng_state(state); random.random() == a
        True
    """
    if not isinstance(state, dict) or "torch" not in state:
        got = type(state).__name__ if not isinstance(state, dict) else f"a dict with keys {sorted(map(str, state))[:5]}"
        raise TypeError(f"`state` must be the dict returned by hypergrad.get_rng_state(), got {got}.")
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
