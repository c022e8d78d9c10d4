"""Benchmark options and fixtures: ``--preset``, ``--device``, ``--threads``; run metadata in the JSON.

Options (after ``python -m pytest benchmarks``):

* ``--preset small|full``: problem and model sizes, iteration budgets (small: seconds, for CI).
* ``--device cpu|cuda``: where tensors live (``cuda`` skips every benchmark when no GPU is there).
* ``--threads N``: ``torch.set_num_threads`` for CPU runs (default 1: on a shared 2-core machine
  more threads mostly measure contention).
* ``--no-memory``: skip the extra call that measures peak memory after timing (the CI smoke run
  uses it; ``tests/test_benchmarks_smoke.py`` tests the memory measurement on its own).

The command line, preset, device, versions and the peers found are written into the
pytest-benchmark JSON under ``"hypergrad"``, so that ``benchmarks/report.py`` can print the exact
command next to every figure.
"""

from __future__ import annotations

import platform
import shlex
import sys
from typing import Any, Callable

import pytest
import torch

from .peers import peer_versions

BUDGETS = {"small": (4, 32), "full": (2, 8, 32, 128)}
SOLVE_STEPS = {"small": (1, 4), "full": (1, 5, 20)}
OVERHEAD_STEPS = {"small": (4,), "full": (10,)}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hypergrad benchmarks")
    group.addoption("--preset", default="small", choices=("small", "full"), help="benchmark sizes (default small)")
    group.addoption("--device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")
    group.addoption("--threads", type=int, default=1, help="torch.set_num_threads for CPU runs (default 1)")
    group.addoption("--no-memory", action="store_true", help="skip the extra peak-memory call after timing")


def pytest_configure(config: pytest.Config) -> None:
    from . import measure

    measure.MEASURE_MEMORY = not config.getoption("--no-memory")
    if config.getoption("--device") == "cpu" and config.getoption("--threads") > 0:
        torch.set_num_threads(config.getoption("--threads"))


@pytest.fixture(scope="session")
def preset(pytestconfig: pytest.Config) -> str:
    """The ``--preset`` option."""
    return pytestconfig.getoption("--preset")


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> str:
    """The ``--device`` option; skips everything when CUDA is asked for but absent."""
    dev = pytestconfig.getoption("--device")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda given but no CUDA device is available")
    return dev


def _cached(build: Callable[[str], Any]) -> Callable[[str], Any]:
    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            cache[name] = build(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def problems(preset: str, device: str) -> Callable[[str], Any]:
    """``problems(name) -> ProblemCase``, built once per session (float64)."""
    from .problems import build_problem

    return _cached(lambda name: build_problem(name, preset, device))


@pytest.fixture(scope="session")
def models(preset: str, device: str) -> Callable[[str], Any]:
    """``models(name) -> ModelCase``, built once per session (float32)."""
    from .models import build_model

    return _cached(lambda name: build_model(name, preset, device))


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict[str, Any]) -> None:
    output_json["hypergrad"] = {
        "command": "python -m pytest " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "preset": config.getoption("--preset"),
        "device": config.getoption("--device"),
        "threads": torch.get_num_threads(),
        "memory_measured": not config.getoption("--no-memory"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cuda_device": torch.cuda.get_device_name()
        if config.getoption("--device") == "cuda" and torch.cuda.is_available()
        else None,
        "peers": peer_versions(),
    }
