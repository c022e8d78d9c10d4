r"""Data parallelism for bilevel training: averaging trees over ``torch.distributed`` ranks.

:class:`~hypergrad.BilevelProblem` does not use ``DistributedDataParallel`` wrappers (they do not
compose with ``torch.func`` Hessian-vector products). Instead every gradient it takes - inner
steps, the outer loss's gradients, each Hessian-vector product of the linear solve and the mixed
product - is averaged over ranks with one ``all_reduce`` per tree. With losses that are means over
equally sized per-rank batches, the result equals one process on the concatenated batch:

.. math:: \frac{1}{R}\sum_{r=1}^R \nabla^2 G_r\, v = \nabla^2\Big(\frac{1}{R}\sum_r G_r\Big) v .

Works with any backend (gloo on CPU, NCCL on GPU) under ``torchrun``.
"""

from __future__ import annotations

from typing import Iterable, Mapping, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .tree import tree_ravel

__all__ = ["world_size", "all_reduce_mean", "broadcast_module"]


def world_size() -> int:
    """Number of ranks when ``torch.distributed`` is initialised, else 1.

    Returns:
        ``torch.distributed.get_world_size()``, or 1 outside a process group.

    Example:
        >>> import hypergrad
        >>> hypergrad.distributed.world_size()
        1
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_mean(tree: dict[str, Tensor]) -> dict[str, Tensor]:
    r"""Average a tree over all ranks (one coalesced ``all_reduce``); identity on one process.

    .. math:: t \leftarrow \frac{1}{R}\sum_{r} t_r

    Args:
        tree: dict of tensors with the same keys and shapes on every rank.

    Returns:
        A new tree with the averages (the input is not modified).

    Example:
        >>> import torch, hypergrad
        >>> hypergrad.distributed.all_reduce_mean({"g": torch.ones(2)})["g"]
        tensor([1., 1.])
    """
    n = world_size()
    if n == 1 or not tree:
        return tree
    dtypes = {v.dtype for v in tree.values()}
    wide = torch.float64 if torch.float64 in dtypes else torch.float32
    flat, unravel = tree_ravel({k: v.detach().to(wide) for k, v in tree.items()})
    flat = flat.clone()
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= n
    out = cast(Mapping[str, Tensor], unravel(flat))
    return {k: v.to(tree[k].dtype) for k, v in out.items()}


def broadcast_module(modules: Iterable[nn.Module], src: int = 0) -> None:
    """Copy parameters and buffers of ``modules`` from rank ``src`` to every rank (no-op on one process).

    Args:
        modules: the modules to synchronise, the same structure on every rank (in place).
        src: the rank whose values are copied.

    Example:
        >>> import torch, hypergrad
        >>> hypergrad.distributed.broadcast_module([torch.nn.Linear(2, 2)])
    """
    if world_size() == 1:
        return
    with torch.no_grad():
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src)
