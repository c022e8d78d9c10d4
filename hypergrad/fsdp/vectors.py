r"""Solver vectors sharded like FSDP2 parameters, and their cross-rank inner product.

Under ``torch.distributed.fsdp.fully_shard`` every trainable parameter is a ``DTensor`` sharded on
dimension 0 over a device mesh; each rank stores one shard. The solver's vectors (right-hand side,
iterates, residuals, search directions) are trees of ``DTensor`` s with the *same* mesh, placements
and global shapes as the parameters, so every leaf-wise operation of :mod:`hypergrad.tree` (axpy,
scale, zeros) runs on the local shards with no communication. Only reductions need the other ranks:

.. math:: \langle a, b \rangle = \sum_{r=1}^{R} \sum_k \langle a_k^{(r)}, b_k^{(r)} \rangle ,

computed as the sum of the local dot products followed by ONE ``all_reduce`` of a single scalar,
however many leaves the tree has. :func:`hypergrad.tree_vdot` (hence :func:`hypergrad.tree_norm`
and every solver) dispatches here when the leaves are ``DTensor`` s, so ``hypergrad.CG`` runs
unchanged on sharded vectors.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

__all__ = ["sharded_vdot", "is_sharded_tree", "check_sharded_like", "shard_like"]


def is_sharded_tree(tree: Any) -> bool:
    """Whether ``tree`` is a ``DTensor`` or a dict with a ``DTensor`` leaf.

    Args:
        tree: a tensor or a dict of tensors.

    Returns:
        ``True`` when a leaf is a ``DTensor`` (the other leaves are then replicated plain tensors).

    Example:
        >>> import torch
        >>> from hypergrad.fsdp.vectors import is_sharded_tree
        >>> is_sharded_tree({"w": torch.ones(2)})
        False
    """
    if isinstance(tree, Tensor):
        return isinstance(tree, DTensor)
    if isinstance(tree, Mapping):
        return any(isinstance(v, DTensor) for v in tree.values())
    return False


def _local_dot(u: Tensor, v: Tensor) -> Tensor:
    dt = torch.promote_types(torch.promote_types(u.dtype, v.dtype), torch.float32)
    return torch.dot(u.reshape(-1).to(dt), v.reshape(-1).to(dt))


def sharded_vdot(a: Any, b: Any) -> Tensor:
    r"""Inner product of two trees of ``DTensor`` s sharded alike: local dots, then one ``all_reduce``.

    .. math:: \langle a, b \rangle = \sum_r \sum_k \langle a_k^{(r)}, b_k^{(r)} \rangle

    A ``Shard`` placement contributes each rank's local dot; a ``Replicate`` leaf contributes once
    (from the first rank of the mesh). Plain leaves beside ``DTensor`` s (the replicated parameters
    of a mixed level, identical on every rank) are added once, after the reduction; a tree of plain
    tensors only (one process, no mesh) gives the ordinary dot.

    Args:
        a: a tree (dict) of ``DTensor`` s on one 1-D device mesh, or a single ``DTensor``.
        b: a tree keyed like ``a`` with the same mesh, placements and shapes leaf by leaf.

    Returns:
        A 0-dim plain tensor (at least float32), identical on every rank.

    Raises:
        ValueError: a leaf is a ``DTensor`` in ``a`` but plain in ``b`` (or the reverse), leaves live on different meshes, or have
            other placements than ``Shard``/``Replicate`` (a ``Partial`` vector is not yet reduced).

    Example:
        >>> import torch
        >>> from hypergrad.fsdp import sharded_vdot
        >>> sharded_vdot({"w": torch.ones(3)}, {"w": torch.full((3,), 2.0)})  # no mesh: plain dot
        tensor(6.)
    """
    pairs = [(a, b)] if isinstance(a, Tensor) else [(v, b[k]) for k, v in a.items()]
    if not pairs:
        raise ValueError("sharded_vdot got an empty tree `a`: pass at least one tensor.")
    if not any(isinstance(u, DTensor) for u, _ in pairs):
        plain = _local_dot(*pairs[0])
        for u, v in pairs[1:]:
            plain = plain + _local_dot(u, v)
        return plain
    mesh = None
    total: Tensor | None = None
    replicated: Tensor | None = None  # plain leaves: identical on every rank, counted once (after the reduction)
    for u, v in pairs:
        if isinstance(u, DTensor) != isinstance(v, DTensor):
            raise ValueError(
                "sharded_vdot: the trees mix DTensor and plain-tensor leaves (a leaf is a DTensor in one tree and "
                "plain in the other); under FSDP2 every solver vector must be sharded like the parameters. Shard "
                "plain trees with `hypergrad.fsdp.shard_like(tree, module)`."
            )
        if not isinstance(u, DTensor):
            term = _local_dot(u, v)
            replicated = term if replicated is None else replicated + term
            continue
        assert isinstance(v, DTensor)
        if mesh is None:
            mesh = u.device_mesh
        if u.device_mesh != mesh or v.device_mesh != mesh:
            raise ValueError("sharded_vdot: the leaves live on different device meshes; shard them on one mesh.")
        if u.placements != v.placements:
            raise ValueError(
                f"sharded_vdot: placements differ ({u.placements} vs {v.placements}); redistribute one tree "
                "to the other's placements (`x.redistribute(placements=...)`) first."
            )
        placement = u.placements[0]
        if isinstance(placement, Shard):
            term = _local_dot(u.to_local(), v.to_local())
        elif isinstance(placement, Replicate):
            term = _local_dot(u.to_local(), v.to_local())
            if mesh.get_local_rank() != 0:
                term = torch.zeros_like(term)
        else:
            raise ValueError(
                f"sharded_vdot: placement {placement} is not supported; reduce a Partial tensor first with "
                "`x.redistribute(placements=[Shard(0)])`."
            )
        total = term if total is None else total + term
    assert total is not None and mesh is not None  # for mypy: a DTensor leaf exists
    if mesh.ndim != 1:
        raise ValueError(f"sharded_vdot supports 1-D device meshes (FSDP2), got a {mesh.ndim}-D mesh {mesh}.")
    total = total.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=mesh.get_group())
    if replicated is not None:
        total = total + replicated.to(total.device)
    return total


def check_sharded_like(name: str, tree: Any, params: Mapping[str, Tensor]) -> None:
    """Raise a clear error unless ``tree`` is sharded exactly like ``params`` (keys, mesh, placements, shapes).

    Args:
        name: how ``tree`` is called in the message (e.g. ``"x0"``).
        tree: the solver vector to check.
        params: the sharded parameters, ``{name: DTensor}``.

    Raises:
        TypeError: ``tree`` is not a dict.
        ValueError: keys differ, or a leaf is not a ``DTensor`` sharded like its parameter; the
            message names the leaf and gives the fix.

    Example:
        >>> import torch
        >>> from hypergrad.fsdp.vectors import check_sharded_like
        >>> check_sharded_like("x0", [1.0], {})
        Traceback (most recent call last):
        ...
        TypeError: `x0` must be a dict of DTensors keyed like the sharded parameters, got list.
    """
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"`{name}` must be a dict of DTensors keyed like the sharded parameters, got {type(tree).__name__}."
        )
    if set(tree) != set(params):
        missing, extra = sorted(set(params) - set(tree)), sorted(set(tree) - set(params))
        raise ValueError(
            f"`{name}` keys differ from the sharded parameters: missing {missing[:5]}, unexpected {extra[:5]}."
        )
    for k, p in params.items():
        v = tree[k]
        fix = f"Shard it like the parameters: `{name} = hypergrad.fsdp.shard_like({name}, module)`."
        if not isinstance(p, DTensor):  # a replicated (plain) parameter of a mixed module
            if isinstance(v, DTensor) or not isinstance(v, Tensor) or v.shape != p.shape:
                what = f"a DTensor sharded as {v.placements}" if isinstance(v, DTensor) else f"{type(v).__name__}"
                raise ValueError(
                    f"`{name}[{k!r}]` is {what} of shape {tuple(getattr(v, 'shape', ()))}, but parameter {k!r} is a "
                    f"plain (replicated) tensor of shape {tuple(p.shape)}: pass a plain tensor of that shape, "
                    "identical on every rank."
                )
            continue
        if not isinstance(v, DTensor):
            raise ValueError(
                f"`{name}[{k!r}]` is a plain {type(v).__name__} of shape {tuple(v.shape)}, but parameter {k!r} is "
                f"a DTensor sharded as {getattr(p, 'placements', None)} (FSDP2): solver vectors must be sharded like the parameters. "
                + fix
            )
        if v.device_mesh != p.device_mesh or v.placements != p.placements or v.shape != p.shape:
            raise ValueError(
                f"`{name}[{k!r}]` is sharded as {v.placements} with global shape {tuple(v.shape)} on {v.device_mesh}, "
                f"but the parameter is sharded as {p.placements} with shape {tuple(p.shape)} on {p.device_mesh}. " + fix
            )


def shard_like(tree: Mapping[str, Tensor], module_or_params: Any) -> dict[str, Tensor]:
    """Shard a tree of full (global) tensors like the FSDP2 parameters of ``module_or_params``.

    Each rank keeps its own slice (``distribute_tensor`` with the parameter's mesh and
    placements); ``DTensor`` leaves are redistributed to the parameter's placements.

    Args:
        tree: ``{name: tensor}`` with the parameters' global shapes, identical on every rank.
        module_or_params: a ``fully_shard``-ed module or its ``{name: DTensor}`` parameters.

    Returns:
        ``{name: DTensor}`` sharded like the parameters.

    Example:
        >>> import torch
        >>> from hypergrad.fsdp import shard_like
        >>> shard_like({"w": torch.ones(2)}, {"w": torch.zeros(2)})["w"]  # no mesh: unchanged
        tensor([1., 1.])
    """
    from torch.distributed.tensor import distribute_tensor

    params = (
        dict(module_or_params.named_parameters()) if hasattr(module_or_params, "named_parameters") else module_or_params
    )
    out: dict[str, Tensor] = {}
    for k, v in tree.items():
        p = params[k]
        if not isinstance(p, DTensor):
            out[k] = v
            continue
        if isinstance(v, DTensor):
            out[k] = v.redistribute(p.device_mesh, p.placements)
        else:
            out[k] = distribute_tensor(v.detach().to(p.dtype), p.device_mesh, p.placements)
    return out
