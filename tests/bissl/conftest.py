"""Shared helpers of the BiSSL tests: run a function in 2 gloo processes (torch.multiprocessing.spawn),
:func:`one_thread` for tests of tiny models (thread start-up costs more than it saves) and
:func:`pop_method_kwargs` for helpers that take BiSSL-stage and method settings together."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hypergrad


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, init: bool, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)  # as torchrun does (OMP_NUM_THREADS=1): ranks share the cores
    if init:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_gloo(fn: Callable[..., None], *args: Any, world: int = 2, init: bool = True) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes; raise on failure.

    The torchrun environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...) is set in each
    process; with ``init=True`` the gloo group is initialised before ``fn`` runs, otherwise ``fn``
    must initialise it from that environment (as code launched by torchrun does).
    """
    mp.spawn(_entry, args=(world, free_port(), init, fn, args), nprocs=world, join=True)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test on one torch thread and put the thread count back afterwards.

    Used by ``pytestmark = pytest.mark.usefixtures("one_thread")`` in test_bissl_stage and test_deviations and, through
    an autouse fixture, by every text BiSSL test (tests/bissl_text/conftest.py).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pop_method_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """Take the :class:`hypergrad.Proximal` fields (``lam``, ``damping``, ``solver``, ...) out of ``kw``; return them.

    What is left are :class:`~applications.bissl.config.BiSSLConfig` fields; the returned ones
    configure its ``method``.
    """
    fields = {f.name for f in dataclasses.fields(hypergrad.Proximal)}
    return {k: kw.pop(k) for k in list(kw) if k in fields}
