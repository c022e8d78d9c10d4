"""The BiSSL pipeline's process helpers beside :mod:`hypergrad.distributed`.

The world size and the averaging over ranks are hypergrad's (:func:`hypergrad.distributed.world_size`,
:func:`hypergrad.distributed.all_reduce_mean`); what is specific to the pipeline stays here: this
process's rank and local rank, torchrun initialisation and clean-up, the barrier, gradient
averaging for steps taken outside :class:`hypergrad.BilevelProblem`, and SimCLR's all-gather with
gradient.

Every helper works without an initialised process group (it then behaves as a world of one), so
the same training code runs in one process, under ``torchrun --nproc-per-node N`` (gloo on CPU,
NCCL on CUDA), or in processes started by :func:`torch.multiprocessing.spawn`.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from hypergrad.distributed import all_reduce_mean, world_size

__all__ = [
    "all_gather_with_grad",
    "average_gradients",
    "barrier",
    "cleanup_distributed",
    "device_of",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "local_rank",
    "rank",
]


def is_distributed() -> bool:
    """Whether a torch.distributed process group is available and initialised.

    Example:
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process (0 without a process group).

    Example:
        >>> rank()
        0
    """
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    """Rank on this node, from torchrun's ``LOCAL_RANK`` (0 when not set).

    Example:
        >>> isinstance(local_rank(), int)
        True
    """
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_of(cfg: Any) -> torch.device:
    """``cfg.device`` as a :class:`torch.device`; under ``torchrun`` on CUDA, this rank's GPU ``cuda:LOCAL_RANK``.

    Example:
        >>> from types import SimpleNamespace
        >>> device_of(SimpleNamespace(device="cpu"))
        device(type='cpu')
    """
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and is_distributed():
        dev = torch.device("cuda", local_rank())
    return dev


def is_main_process() -> bool:
    """Whether this is rank 0 (the process that logs, shows progress and writes files).

    Example:
        >>> is_main_process()
        True
    """
    return rank() == 0


def init_distributed(backend: str | None = None) -> bool:
    """Initialise the default process group when launched by torchrun; no-op otherwise.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; outside torchrun
    (``TORCHELASTIC_RUN_ID`` unset) with ``WORLD_SIZE`` unset or 1 nothing is initialised. Under
    ``torchrun --nproc-per-node 1`` a one-rank group is initialised (so ``--fsdp`` and NCCL run on a
    single GPU too). On CUDA the process is pinned to
    ``cuda:LOCAL_RANK``.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or None (NCCL when CUDA is available, else gloo).

    Returns:
        Whether a process group is now initialised.

    Example:
        >>> init_distributed()  # not under torchrun
        False
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl", "mpi"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or 'mpi', got {backend!r}.")
    if backend == "nccl":  # pinned, and named to NCCL (else it guesses the device from the global rank)
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, device_id=device)
    else:
        dist.init_process_group(backend=backend)
    return True


def cleanup_distributed() -> None:
    """Destroy the default process group if one is initialised.

    Example:
        >>> cleanup_distributed()
    """
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Synchronise all ranks (no-op without a process group).

    Example:
        >>> barrier()
    """
    if is_distributed():
        dist.barrier()


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    r"""Replace every ``p.grad`` of ``params`` by its mean over ranks (no-op on one process).

    .. math:: g_p \leftarrow \frac{1}{R}\sum_{r} g_{p,r}

    One coalesced ``all_reduce`` for all the gradients (:func:`hypergrad.distributed.all_reduce_mean`);
    parameters without a gradient are skipped, and so are sharded ones (``--fsdp``: a ``DTensor``
    gradient that ``fully_shard`` already averaged). For gradients taken outside
    :class:`hypergrad.BilevelProblem` (which averages its own): the head warm-up, the control arm,
    text pretraining.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2)); w.grad = torch.tensor([1.0, 3.0])
        >>> average_gradients([w]); w.grad
        tensor([1., 3.])
    """
    # a sharded (FSDP2 DTensor) gradient was already averaged by fully_shard's reduce-scatter
    params = [p for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    if world_size() == 1 or not params:
        return
    mean = all_reduce_mean({str(i): p.grad for i, p in enumerate(params)})
    for i, p in enumerate(params):
        p.grad = mean[str(i)]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the incoming gradients over ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        chunks = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(chunks, tensor)
        ctx.batch = tensor.shape[0]
        return torch.cat(chunks, dim=0)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch
        return grad[start : start + ctx.batch]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    r"""Concatenate ``tensor`` from all ranks along dim 0, differentiably.

    With per-rank losses :math:`\ell_r` that all read the gathered tensor :math:`Z`, the backward
    pass returns to rank :math:`k` the gradient of :math:`\sum_r \ell_r` with respect to its own slice
    :math:`Z_k` (the incoming gradients are summed over ranks). DDP then averages parameter
    gradients over the :math:`W` ranks, which yields the gradient of :math:`\frac1W\sum_r \ell_r`,
    i.e. of the loss over the global batch.

    Args:
        tensor: ``(B, ...)``; every rank must pass the same shape (use ``drop_last=True``).

    Returns:
        ``(W * B, ...)`` in rank order; ``tensor`` itself without a process group.

    Example:
        >>> all_gather_with_grad(torch.ones(2, 3)).shape
        torch.Size([2, 3])
    """
    if not is_distributed() or world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)
