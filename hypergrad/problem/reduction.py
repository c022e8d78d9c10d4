r"""How :class:`~hypergrad.BilevelProblem` combines the contributions of several processes.

A reduction strategy is a small object with three jobs:

* :meth:`~AbstractReduction.reduce` turns a tree computed on this process (a gradient, a
  Hessian-vector product, a loss packed as a 1-element tensor) into the tree of the whole job.
  Every gradient and every HVP a problem or a method takes goes through it once.
* :meth:`~AbstractReduction.inner_product` combines an inner product or squared norm computed on
  this process's part of a vector into the global one. With replicated parameters (data
  parallelism) every process holds the whole vector, so it is the identity; a sharded strategy
  (FSDP2: each rank holds a slice of every parameter) sums the partial products over ranks.
* :meth:`~AbstractReduction.broadcast` makes the initial parameters equal on every process.

Built-in: :class:`LocalReduction` (one process, the identity) and :class:`DataParallelMean`
(``torch.distributed`` ranks each holding a full replica and its own shard of every batch):

.. math:: \frac{1}{R}\sum_{r=1}^R \nabla^2 G_r\, v = \nabla^2\Big(\frac{1}{R}\sum_r G_r\Big) v .

A new strategy subclasses :class:`AbstractReduction` and is passed as
``BilevelProblem(..., reduction=MyStrategy())``.
"""

from __future__ import annotations

import abc
from typing import Any, Iterable

from torch import Tensor, nn

from ..distributed import all_reduce_mean, broadcast_module, world_size

__all__ = ["AbstractReduction", "LocalReduction", "DataParallelMean"]


class AbstractReduction(abc.ABC):
    """Protocol of a reduction strategy (see the module docstring).

    Example:
        >>> import torch, hypergrad
        >>> class Halve(hypergrad.AbstractReduction):   # a toy strategy: "two ranks, the other one sends zeros"
        ...     def reduce(self, tree):
        ...         return {k: v / 2 for k, v in tree.items()}
        >>> Halve().reduce({"g": torch.ones(2)})["g"], Halve().inner_product(torch.tensor(3.0))
        (tensor([0.5000, 0.5000]), tensor(3.))
    """

    @abc.abstractmethod
    def reduce(self, tree: dict[str, Tensor]) -> dict[str, Tensor]:
        """The job-wide value of a tree computed on this process (e.g. the mean over ranks).

        Args:
            tree: ``{name: tensor}``, the same keys and shapes on every process.

        Returns:
            A tree with the same keys, shapes and dtypes; the input is not modified.
        """

    def inner_product(self, value: Tensor) -> Tensor:
        """Combine an inner product computed on this process's part of two vectors (identity here).

        Args:
            value: a 0-dim tensor, :math:`\\langle u_r, v_r \\rangle` on this process.

        Returns:
            The global :math:`\\langle u, v \\rangle`: ``value`` itself when every process holds
            whole vectors; a sharded strategy returns the sum over ranks.
        """
        return value

    def broadcast(self, modules: Iterable[nn.Module]) -> None:
        """Make the parameters and buffers of ``modules`` equal on every process (no-op here).

        Args:
            modules: the modules of both levels.
        """


class LocalReduction(AbstractReduction):
    """One process: every reduction is the identity.

    Example:
        >>> import torch, hypergrad
        >>> tree = {"g": torch.ones(2)}
        >>> hypergrad.LocalReduction().reduce(tree) is tree
        True
    """

    def reduce(self, tree: dict[str, Tensor]) -> dict[str, Tensor]:
        return tree

    def __repr__(self) -> str:
        return "LocalReduction()"


class DataParallelMean(AbstractReduction):
    """Data parallelism over ``torch.distributed`` ranks that each hold full replicas.

    :meth:`reduce` averages a tree over ranks with one coalesced ``all_reduce``
    (:func:`hypergrad.distributed.all_reduce_mean`); :meth:`broadcast` copies rank 0's parameters
    and buffers to every rank. With losses that are means over equally sized per-rank batches the
    result equals one process on the concatenated batch. Any backend (gloo, NCCL) under ``torchrun``.

    Example:
        >>> import torch, hypergrad
        >>> hypergrad.DataParallelMean().reduce({"g": torch.ones(2)})["g"]   # one process: the identity
        tensor([1., 1.])
    """

    def reduce(self, tree: dict[str, Tensor]) -> dict[str, Tensor]:
        return all_reduce_mean(tree)

    def broadcast(self, modules: Iterable[nn.Module]) -> None:
        broadcast_module(modules)

    @property
    def world_size(self) -> int:
        """Number of ranks (1 outside a process group)."""
        return world_size()

    def __repr__(self) -> str:
        return f"DataParallelMean(world_size={self.world_size})"


def reduction_for(distributed: Any, reduction: Any) -> AbstractReduction:
    """The strategy of ``BilevelProblem(distributed=..., reduction=...)`` (validated)."""
    if reduction is not None:
        if not isinstance(reduction, AbstractReduction):
            raise TypeError(
                f"`reduction` must be a hypergrad.AbstractReduction (e.g. hypergrad.DataParallelMean()), "
                f"got {type(reduction).__name__}."
            )
        return reduction
    if distributed not in (None, True, False):
        raise TypeError(f"`distributed` must be None, True or False, got {distributed!r}.")
    if distributed and world_size() == 1:
        raise ValueError(
            "`distributed=True` but torch.distributed is not initialised with more than one rank; "
            "call torch.distributed.init_process_group first (e.g. under torchrun) or pass distributed=None."
        )
    use = world_size() > 1 if distributed is None else distributed
    return DataParallelMean() if use else LocalReduction()
