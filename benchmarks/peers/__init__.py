"""Adapters for peer libraries, one file each; every adapter is optional (skipped when absent).

An adapter module defines ``LIBRARY`` (the distribution name) and ``METHODS``:
``{name: build(case, K) -> PeerRun}``. ``PeerRun.run`` is the zero-argument callable that gets timed (it computes the whole hypergradient: outer gradient, linear solve or unrolled
steps, cross term, and waits for the device); ``PeerRun.to_grad`` converts its output into a dict
of float64 CPU tensors keyed like the problem's hyper-parameters, for the check after timing.
Importing an adapter fails with ``ImportError`` when its library is missing. Peers get exactly
the data, dtype and inner solution that hypergrad gets.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["PeerRun", "PEER_MODULES", "peer_methods", "peer_versions"]

#: adapter module -> distribution name
PEER_MODULES: dict[str, str] = {
    "torchopt_peer": "torchopt",
    "betty_peer": "betty-ml",
    "higher_peer": "higher",
    "jaxopt_peer": "jaxopt",
}


@dataclass
class PeerRun:
    """A built peer computation: ``run()`` is timed, ``to_grad(run())`` is checked afterwards."""

    run: Callable[[], Any]
    to_grad: Callable[[Any], dict]
    num_hvps: int


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def peer_versions() -> dict[str, str | None]:
    """Installed version of each peer library (``None`` when absent); imports nothing heavy."""
    dists = list(PEER_MODULES.values()) + ["jax", "optree"]
    return {d: _installed(d) for d in dists}


def peer_methods() -> dict[str, tuple[str, str]]:
    """``{method name: (adapter module, library)}`` for all adapters, installed or not.

    The method names are fixed per adapter so that benchmarks can be parametrised (and skipped)
    without importing the peer libraries.
    """
    return {name: (mod, lib) for mod, lib in PEER_MODULES.items() for name in _NAMES[mod]}


_NAMES = {
    "torchopt_peer": ("torchopt_cg", "torchopt_normal_cg", "torchopt_neumann"),
    "betty_peer": ("betty_cg", "betty_neumann"),
    "higher_peer": ("higher_unrolled",),
    "jaxopt_peer": ("jaxopt_cg", "jaxopt_normal_cg"),
}


def load_adapter(module: str) -> Any:
    """Import ``benchmarks.peers.<module>``; raises ImportError when its library is missing."""
    return importlib.import_module(f"{__name__}.{module}")
