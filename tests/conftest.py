"""Shared fixtures: seeding, global-state hygiene and the device list (CUDA tested where present)."""

from __future__ import annotations

import gc
import os
from typing import Any

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, share the cores among the workers (torch would give each worker all of them)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Give every test the same torch globals and put them back afterwards.

    Application code under test may legitimately set thread counts (``--threads``), the default
    dtype or grad mode; a test that changes them must not change what the next test sees.
    """
    threads, dtype, grad = torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if torch.get_default_dtype() != dtype:
        torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def mesh() -> Any:
    """A one-rank gloo process group and CPU device mesh (FSDP2 tests that resume on one rank)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


@pytest.fixture
def cyclic_garbage():
    """Python's cyclic collector off while the test runs; call the fixture for the tensors only it would free.

    A tensor that only the cyclic collector frees sat in a reference cycle: its memory (possibly a
    whole gradient graph) stays allocated until the collector happens to run. torch's own pytree
    helpers leave small cycles of functions and tuples; no tensor may be in one.
    """
    gc.collect()
    gc.disable()

    def tensors() -> list[torch.Tensor]:
        gc.set_debug(gc.DEBUG_SAVEALL)  # keep what the collector finds, to look at it
        try:
            gc.collect()
            return [o for o in gc.garbage if isinstance(o, torch.Tensor)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()

    try:
        yield tensors
    finally:
        gc.enable()
