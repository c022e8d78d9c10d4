"""What the toy command lines share: the ``--device`` check (a user mistake is an argparse error, exit 2)."""

from __future__ import annotations

import argparse

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
