"""Application-level checks of the checkpoint files the BiSSL stages read.

Every failure is a :class:`ValueError` / :class:`FileNotFoundError` with one line that names the
file, says what is wrong and how to fix it (the CLI prints it as an argparse-style error): a
missing, empty, truncated or foreign file; the BiSSL stage's output passed where the pretext
checkpoint is expected; a backbone of another architecture or width than the configuration.

:func:`run_settings` / :func:`check_same_settings` guard resumption: a stage records the settings
it ran with next to its progress, and a re-run with other settings (or from another input file) is
refused instead of mixing old and new results.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from torch import nn

from hypergrad import load_checkpoint

__all__ = ["read_checkpoint", "load_into", "pretext_checkpoint", "file_digest", "run_settings", "check_same_settings"]


def read_checkpoint(path: str, what: str, hint: str = "") -> Any:
    """``hypergrad.load_checkpoint(path)`` with a clear one-line error for a bad file."""
    tail = f" {hint}" if hint else ""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} not found.{tail}")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a directory, not a checkpoint file.{tail}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} {path!r} is empty (an interrupted write?).{tail}")
    try:
        return load_checkpoint(path)
    except Exception as err:  # truncated zip, pickle of foreign objects, not a torch file at all
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{what} {path!r} is not a readable checkpoint (truncated, corrupted or not written by this "
            f"application: {type(err).__name__}: {first}).{tail}"
        ) from err


def load_into(module: nn.Module, state: Any, what: str, path: str) -> None:
    """``module.load_state_dict(state)`` with a one-line error naming the mismatch (arch / width)."""
    if not isinstance(state, dict):
        raise ValueError(f"{what} in {path!r} is a {type(state).__name__}, not a state dict.")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shape = [k for k in own if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    if missing or extra or shape:
        detail = []
        if shape:
            k = shape[0]
            detail.append(f"{k} has shape {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here")
        if missing:
            detail.append(f"{len(missing)} keys missing (e.g. {missing[0]!r})")
        if extra:
            detail.append(f"{len(extra)} unexpected keys (e.g. {extra[0]!r})")
        raise ValueError(
            f"{what} in {path!r} does not fit the configured model ({'; '.join(detail)}): pass the --arch, "
            "--width, --image-size and --preset it was trained with."
        )
    module.load_state_dict(state)


def pretext_checkpoint(path: str) -> dict[str, Any]:
    """Read a pretext checkpoint (``backbone``, ``projector``[, ``predictor``]); refuse other files."""
    state = read_checkpoint(path, "pretext checkpoint", "Run the `pretrain` stage first, or pass its pretrained.pt.")
    if not isinstance(state, dict):
        raise ValueError(f"pretext checkpoint {path!r} holds a {type(state).__name__}, not a checkpoint dict.")
    if "upper_backbone" in state or ("backbone" in state and "projector" not in state):
        raise ValueError(
            f"{path!r} is the BiSSL stage's output (a backbone without the pretext projector), not a pretext "
            "checkpoint: pass --pretrained <out-dir>/<preset>/pretrain/pretrained.pt."
        )
    if "backbone" not in state or "projector" not in state:
        raise ValueError(
            f"{path!r} is not a pretext checkpoint (keys {sorted(state)[:6]}; expected 'backbone' and 'projector'); "
            "pass the pretrain stage's pretrained.pt."
        )
    return state


def file_digest(path: str) -> str:
    """The first 16 hex digits of the SHA-256 of the file at ``path``: which input a stage's progress was computed from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def run_settings(**parts: Any) -> dict[str, Any]:
    """``parts`` as plain JSON values (tuples -> lists, other objects -> their ``str``), for comparison.

    Example:
        >>> run_settings(model={"width": 4, "dims": (1, 2)}, seed=0)
        {'model': {'width': 4, 'dims': [1, 2]}, 'seed': 0}
    """
    return json.loads(json.dumps(parts, default=str))


def check_same_settings(saved: Any, current: dict[str, Any], path: str) -> None:
    """Refuse to resume ``path`` when the settings it recorded differ from ``current`` (one line, the changes).

    ``saved`` is ``None`` for progress written before settings were recorded (accepted as is).

    Example:
        >>> check_same_settings({"seed": 0}, {"seed": 0}, "ckpt.pt")
        >>> check_same_settings({"seed": 0}, {"seed": 1}, "ckpt.pt")
        Traceback (most recent call last):
        ...
        ValueError: 'ckpt.pt' was written with other settings (seed: 0 -> 1); pass --no-resume to redo it with these settings, or use another --out-dir.
    """
    if saved is None:
        return
    changed: list[str] = []

    def walk(a: Any, b: Any, name: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{name}.{k}" if name else str(k))
        elif a != b:
            changed.append(f"{name}: {a!r} -> {b!r}")

    walk(saved, current, "")
    if changed:
        more = f"; and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ValueError(
            f"{path!r} was written with other settings ({'; '.join(changed[:3])}{more}); pass --no-resume to "
            "redo it with these settings, or use another --out-dir."
        )
