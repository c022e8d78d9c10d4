"""Implicit hypergradients on FSDP2 (``torch.distributed.fsdp.fully_shard``) sharded models.

See ``docs/fsdp.md``. Public names are re-exported from :mod:`hypergrad`.
"""

from .clip import sharded_clip_grad_norm_ as sharded_clip_grad_norm_
from .hypergradient import ShardedHypergradResult as ShardedHypergradResult
from .hypergradient import sharded_implicit_grad as sharded_implicit_grad
from .hypergradient import sharded_proximal_grad as sharded_proximal_grad
from .operator import SHARDED_HVP_MODES as SHARDED_HVP_MODES
from .operator import ShardedHessianOperator as ShardedHessianOperator
from .operator import ShardedHVPMode as ShardedHVPMode
from .operator import sharded_value_and_grad as sharded_value_and_grad
from .vectors import shard_like as shard_like
from .vectors import sharded_vdot as sharded_vdot

__all__ = [
    "SHARDED_HVP_MODES",
    "ShardedHVPMode",
    "ShardedHessianOperator",
    "ShardedHypergradResult",
    "shard_like",
    "sharded_clip_grad_norm_",
    "sharded_implicit_grad",
    "sharded_proximal_grad",
    "sharded_value_and_grad",
    "sharded_vdot",
]
