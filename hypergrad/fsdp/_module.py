"""Validation of ``fully_shard``-ed modules: every error names the problem and gives the fix."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

__all__ = ["sharded_params", "mesh_of", "check_dense_module", "compute_dtype"]


def _fsdp_owned(module: nn.Module) -> set[int]:
    """``id`` of every parameter that a ``fully_shard``-ed (sub)module of ``module`` manages."""
    return {id(p) for m in module.modules() if isinstance(m, FSDPModule) for p in m.parameters()}


def sharded_params(module: Any, keys: Optional[Iterable[str]] = None, *, name: str = "module") -> dict[str, Tensor]:
    """The trainable parameters of a module holding ``fully_shard``-ed parts, after consistency checks.

    Every trainable parameter is either a ``DTensor`` managed by a ``fully_shard``-ed (sub)module
    (sharded: FSDP2 averages its gradient over ranks) or a plain tensor outside every
    ``fully_shard``-ed module (replicated like data parallelism: identical on every rank, its
    gradient averaged over ranks by hypergrad). A module wrapped at its root holds only the first
    kind; ``{"backbone": fully_shard(net), "head": nn.Linear(...)}`` holds both (a *mixed* module).

    Raises ``TypeError`` for a module without any ``fully_shard``-ed part (or one that mixes in
    DDP) and ``ValueError`` for what cannot be handled correctly: a plain parameter inside a
    ``fully_shard``-ed module (registered or replaced after ``fully_shard``), a ``DTensor`` that no
    ``fully_shard`` manages (tensor parallelism), parameters on several meshes or placements other
    than ``Shard(0)`` on a 1-D mesh; each message says how to fix it.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"`{name}` must be an nn.Module wrapped with torch.distributed.fsdp.fully_shard, got {type(module).__name__}."
        )
    ddp = [n or "<root>" for n, m in module.named_modules() if isinstance(m, DistributedDataParallel)]
    if ddp:
        raise TypeError(
            f"`{name}` mixes DistributedDataParallel (at {ddp[:3]}) with FSDP2: hypergrad's sharded HVPs need "
            "`fully_shard` alone. Remove the DDP wrapper and call fully_shard on the submodules and then the root; "
            "for a replicated (data-parallel) model use the ordinary API with hypergrad.distributed instead."
        )
    trainable: dict[str, Tensor] = {k: p for k, p in module.named_parameters() if p.requires_grad}
    owned = _fsdp_owned(module)
    if not owned:
        raise TypeError(
            f"`{name}` ({type(module).__name__}) is not wrapped with torch.distributed.fsdp.fully_shard. Wrap it "
            "(`fully_shard(layer)` for each block, then `fully_shard(module)`), or use hypergrad.implicit_grad / "
            "hypergrad.BilevelProblem for an unsharded model."
        )
    late = [k for k, p in trainable.items() if id(p) in owned and not isinstance(p, DTensor)]
    if late:
        raise ValueError(
            f"`{name}` is wrapped inconsistently: parameters {late[:3]} are plain tensors inside a fully_shard-ed "
            "module, whose other parameters are sharded DTensors (they were registered or replaced after fully_shard, "
            "so FSDP2 neither gathers nor reduces them). Create every parameter before calling fully_shard, and call "
            "fully_shard on the root module last."
        )
    foreign = [k for k, p in trainable.items() if isinstance(p, DTensor) and id(p) not in owned]
    if foreign:
        raise ValueError(
            f"`{name}` is wrapped inconsistently: parameters {foreign[:3]} are DTensors that no fully_shard-ed module "
            "manages (tensor parallelism or distribute_tensor?); hypergrad supports FSDP2 (fully_shard) sharding and "
            "plain replicated parameters. Wrap those modules with fully_shard instead."
        )
    meshes = {p.device_mesh for p in trainable.values() if isinstance(p, DTensor)}
    if len(meshes) > 1:
        raise ValueError(
            f"`{name}` shards its parameters over {len(meshes)} device meshes; use one mesh for every fully_shard call."
        )
    for k, p in trainable.items():
        if not isinstance(p, DTensor):
            continue
        if p.device_mesh.ndim != 1 or not isinstance(p.placements[0], Shard) or p.placements[0].dim != 0:
            raise ValueError(
                f"`{name}` parameter {k!r} is placed as {p.placements} on a {p.device_mesh.ndim}-D mesh; hypergrad "
                "supports FSDP2 sharding on dimension 0 of a 1-D mesh (no HSDP or tensor parallelism yet)."
            )
    if keys is None:
        return trainable
    keys = list(keys)
    missing = [k for k in keys if k not in trainable]
    if missing:
        raise ValueError(
            f"`keys` names {missing[:3]}, which are not trainable parameters of `{name}`: {sorted(trainable)[:6]}."
        )
    return {k: trainable[k] for k in keys}


def mesh_of(params: Mapping[str, Tensor]) -> Any:
    """The device mesh of the first ``DTensor`` in ``params`` (``None`` when all are plain)."""
    for p in params.values():
        if isinstance(p, DTensor):
            return p.device_mesh
    return None


def check_dense_module(dense_module: Any, params: dict[str, Tensor]) -> None:
    """``dense_module`` has the parameter names and global shapes of the sharded module."""
    if not isinstance(dense_module, nn.Module) or isinstance(dense_module, FSDPModule):
        raise TypeError(
            "`dense_module` must be an unsharded nn.Module with the same architecture as the sharded one (build it "
            f"with the same constructor, on the meta device to save memory), got {type(dense_module).__name__}."
        )
    shapes = {k: tuple(p.shape) for k, p in dense_module.named_parameters()}
    for k, p in params.items():
        if shapes.get(k) != tuple(p.shape):
            raise ValueError(
                f"`dense_module` does not match the sharded module: parameter {k!r} has shape {shapes.get(k)} there "
                f"and global shape {tuple(p.shape)} in the sharded module. Build both with the same constructor."
            )


def compute_dtype(module: Any, params: dict[str, Tensor]) -> torch.dtype:
    """The lowest-precision dtype the forward pass of ``module`` computes in.

    Under ``fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))`` the
    parameters are stored in float32 but gathered and used in bfloat16: a finite-difference step
    must come from that compute dtype, not from the stored one. Without a policy it is the
    parameters' dtype.
    """
    dtypes = {p.dtype for p in params.values()}
    for m in module.modules():
        state = m._get_fsdp_state() if isinstance(m, FSDPModule) else None
        policy = getattr(state, "_mp_policy", None)
        dtype = getattr(policy, "param_dtype", None)
        if isinstance(dtype, torch.dtype):
            dtypes.add(dtype)
    return max(dtypes, key=lambda d: torch.finfo(d).eps)
