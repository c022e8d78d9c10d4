"""``argparse`` value types that reject bad numbers up front (one-line errors, exit code 2).

Example:
    >>> finite_float("1e-3")
    0.001
    >>> finite_float("nan")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: 'nan' is not a finite number; pass e.g. 0.01
"""

from __future__ import annotations

import argparse
import math

__all__ = ["finite_float", "positive_int", "nonnegative_int"]


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; pass e.g. 0.01") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; pass e.g. 0.01")
    return value


def _int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _int(text, 0)


finite_float.__name__ = "float"
positive_int.__name__ = "int"
nonnegative_int.__name__ = "int"
