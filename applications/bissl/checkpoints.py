"""Application-level checks of the checkpoint files the BiSSL stages read.

Every failure is a :class:`ValueError` / :class:`FileNotFoundError` with one line that names the
file, says what is wrong and how to fix it (the CLI prints it as an argparse-style error): a
missing, empty, truncated or foreign file; the BiSSL stage's output passed where the pretext
checkpoint is expected; a backbone of another architecture or width than the configuration.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from hypergrad import load_checkpoint

__all__ = ["read_checkpoint", "load_into", "pretext_checkpoint"]


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
