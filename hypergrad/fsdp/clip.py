r"""Gradient norm and clipping over parameters that are sharded (FSDP2 ``DTensor``), replicated (plain), or both.

A level with ``fully_shard``-ed parts holds sharded parameters (each rank stores a shard of the
averaged gradient) and possibly plain replicated ones (every rank stores the whole averaged
gradient). Its global gradient norm is

.. math:: \|g\| = \Big(\sum_{r=1}^{R} \sum_{k\ \text{sharded}} \|g_k^{(r)}\|^2 + \sum_{k\ \text{plain}} \|g_k\|^2\Big)^{1/2},

the shards summed over ranks (one ``all_reduce``), the plain gradients counted once.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from .operator import _norm64

__all__ = ["grad_norm64", "sharded_clip_grad_norm_"]


def grad_norm64(params: Sequence[Tensor]) -> float:
    """Global float64 norm of the ``.grad`` of ``params`` (see the module docstring); one all_reduce."""
    return _norm64({str(i): p.grad for i, p in enumerate(params) if p.grad is not None})


def sharded_clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> float:
    r"""Clip the gradients of sharded and/or replicated parameters to a global norm, in place.

    .. math:: g \leftarrow g\, \min\Big(1, \frac{c}{\|g\| + 10^{-6}}\Big)

    with the global norm :math:`\|g\|` of the module docstring (``DTensor`` shards reduced once over
    ranks, plain gradients counted once) - the rule of ``torch.nn.utils.clip_grad_norm_``, which
    is called itself when no gradient is a ``DTensor`` (so an unsharded model is clipped bit for bit
    as by PyTorch). Call it on every rank (it reduces across ranks).

    Args:
        params: the parameters whose ``.grad`` to clip (those without a gradient are skipped).
        max_norm: :math:`c > 0`.

    Returns:
        The global norm before clipping (float).

    Example:
        >>> import torch
        >>> from hypergrad import sharded_clip_grad_norm_
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> sharded_clip_grad_norm_([w], 1.0), w.grad
        (5.0, tensor([0.6000, 0.8000]))
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"sharded_clip_grad_norm_: `max_norm` must be a positive number, got {max_norm!r}.")
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    norm = grad_norm64(params)
    coef = min(1.0, float(max_norm) / (norm + 1e-6))
    if coef < 1.0:
        with torch.no_grad():
            for g in grads:
                g.mul_(coef)
    return norm
