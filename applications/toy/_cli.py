"""What the toy command lines share: the ``--device`` and count checks (a user mistake is an argparse error, exit 2)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch


def parse_device(parser: argparse.ArgumentParser, value: str) -> torch.device:
    """``torch.device(value)``, or ``parser.error`` when it is no device or names a CUDA GPU that is not visible."""
    try:
        device = torch.device(value)
    except RuntimeError:
        parser.error(f"--device {value!r} is not a device; pass cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {value}: no CUDA GPU is visible on this machine; pass --device cpu")
    return device


def check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str]) -> None:
    """``parser.error`` unless every ``args.<name>`` is at least 1 (``--n-train must be >= 1, got 0``).

    Example:
        >>> check_counts(argparse.ArgumentParser(), argparse.Namespace(n_train=5, loo=1), ("n_train", "loo"))
    """
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
