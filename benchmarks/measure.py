"""Measuring helpers shared by the benchmarks: device sync, peak memory, relative errors.

Timings come from pytest-benchmark; this module supplies what it does not: a synchronising
wrapper for the timed callable (CUDA work is asynchronous, so a timer without a sync measures the
launch, not the work), the peak memory of one call (CUDA: the caching allocator's peak; CPU: the
PyTorch profiler's allocation events, summed in time order), and error metrics on parameter trees.
"""

from __future__ import annotations

import gc
import math
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["synchronize", "synced", "peak_memory_bytes", "rel_error", "flat", "to_float64_tree", "record"]


def synchronize(device: str | torch.device) -> None:
    """Wait for all queued work on ``device`` (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn: Callable[[], Any], device: str | torch.device) -> Callable[[], Any]:
    """``fn`` followed by :func:`synchronize`, so that a timer around it measures the device work."""
    dev = torch.device(device)

    def call() -> Any:
        out = fn()
        synchronize(dev)
        return out

    return call


def peak_memory_bytes(fn: Callable[[], Any], device: str | torch.device) -> int:
    """Peak memory allocated by tensors while ``fn()`` runs, above what was allocated before.

    CUDA: ``torch.cuda.max_memory_allocated`` after a peak reset. CPU: the profiler records
    every allocation and free of PyTorch's CPU allocator; their running sum in time order gives the
    peak. Memory held before the call (e.g. a cached graph built earlier) is not counted.
    """
    dev = torch.device(device)
    gc.collect()  # what an earlier call left in reference cycles is freed now, not counted during this one
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if str(e.device_type()) != "DeviceType.CPU":
            continue
        current += e.nbytes()
        peak = max(peak, current)
    return int(peak)


def flat(tree: Tensor | dict[str, Tensor]) -> Tensor:
    """The leaves of a tree (sorted by key) concatenated into one float64 vector on the CPU."""
    if isinstance(tree, Tensor):
        return tree.detach().reshape(-1).to(torch.float64).cpu()
    return torch.cat([torch.as_tensor(tree[k]).detach().reshape(-1).to(torch.float64).cpu() for k in sorted(tree)])


def rel_error(approx: Tensor | dict[str, Tensor], exact: Tensor | dict[str, Tensor]) -> float:
    r""":math:`\|a - e\| / \max(\|e\|, 10^{-30})` over the flattened trees (NaN stays NaN)."""
    a, e = flat(approx), flat(exact)
    if a.shape != e.shape:
        raise ValueError(f"rel_error: shapes differ, {tuple(a.shape)} vs {tuple(e.shape)}.")
    err = float(torch.linalg.vector_norm(a - e)) / max(float(torch.linalg.vector_norm(e)), 1e-30)
    return err if math.isfinite(err) else float("nan")


def to_float64_tree(tree: dict[str, Tensor]) -> dict[str, Tensor]:
    """A detached float64 copy of a tree (for references)."""
    return {k: v.detach().to(torch.float64) for k, v in tree.items()}


#: Set from ``--no-memory`` by ``benchmarks/conftest.py``; when False, peak memory is not measured.
MEASURE_MEMORY = True


def record(benchmark: Any, fn: Callable[[], Any], device: str, **info: Any) -> dict[str, Any]:
    """Store ``info`` and the peak memory of one more call of ``fn`` in ``benchmark.extra_info``.

    The memory call runs after timing, so it never affects the timings; with ``--no-memory`` it
    is skipped and ``peak_mem_bytes`` is ``None``.
    """
    benchmark.extra_info.update(info)
    benchmark.extra_info["peak_mem_bytes"] = peak_memory_bytes(fn, device) if MEASURE_MEMORY else None
    benchmark.extra_info["device"] = device
    return benchmark.extra_info
