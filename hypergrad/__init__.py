"""hypergrad: bilevel optimisation by implicit differentiation for PyTorch.

The public API is what this module re-exports; everything else is private.
"""

from typing import TYPE_CHECKING, Any

from . import distributed as distributed
from . import solvers as solvers
from . import tree as tree
from ._typing import BilevelLoss as BilevelLoss
from ._typing import FixedPointMap as FixedPointMap
from ._typing import MatVec as MatVec
from ._typing import TensorTree as TensorTree
from .checkpoint import CheckpointError as CheckpointError
from .checkpoint import get_rng_state as get_rng_state
from .checkpoint import load_checkpoint as load_checkpoint
from .checkpoint import save_checkpoint as save_checkpoint
from .checkpoint import set_rng_state as set_rng_state
from .custom_root import ImplicitFunction as ImplicitFunction
from .custom_root import custom_fixed_point as custom_fixed_point
from .custom_root import custom_root as custom_root

# --- FSDP2 exports (helper FSDP) ---
from .fsdp import SHARDED_HVP_MODES as SHARDED_HVP_MODES
from .fsdp import ShardedHessianOperator as ShardedHessianOperator
from .fsdp import ShardedHVPMode as ShardedHVPMode
from .fsdp import ShardedHypergradResult as ShardedHypergradResult
from .fsdp import shard_like as shard_like
from .fsdp import sharded_clip_grad_norm_ as sharded_clip_grad_norm_
from .fsdp import sharded_implicit_grad as sharded_implicit_grad
from .fsdp import sharded_proximal_grad as sharded_proximal_grad
from .fsdp import sharded_value_and_grad as sharded_value_and_grad
from .fsdp import sharded_vdot as sharded_vdot

# --- end FSDP2 exports ---
from .hypergradient import HypergradResult as HypergradResult
from .hypergradient import UnrolledResult as UnrolledResult
from .hypergradient import fixed_point_grad as fixed_point_grad
from .hypergradient import implicit_grad as implicit_grad
from .hypergradient import proximal_grad as proximal_grad
from .hypergradient import unrolled_grad as unrolled_grad
from .inverse_hvp import InverseHVPResult as InverseHVPResult
from .inverse_hvp import inverse_hvp as inverse_hvp
from .level import Level as Level
from .linearized import LinearizedHessian as LinearizedHessian
from .methods import AbstractHypergradMethod as AbstractHypergradMethod
from .methods import Implicit as Implicit
from .methods import Proximal as Proximal
from .methods import Unrolled as Unrolled
from .metrics import MetricsLogger as MetricsLogger
from .metrics import ProgressHook as ProgressHook
from .modules import BufferPolicy as BufferPolicy
from .modules import module_params as module_params
from .modules import stateless as stateless
from .modules import tracks_running_stats as tracks_running_stats
from .operators import HVP_MODES as HVP_MODES
from .operators import Damped as Damped
from .operators import FixedPointOperator as FixedPointOperator
from .operators import HessianOperator as HessianOperator
from .operators import HVPFallbackWarning as HVPFallbackWarning
from .operators import HVPMode as HVPMode
from .operators import LinearOperator as LinearOperator
from .operators import hvp as hvp
from .operators import mixed_hvp as mixed_hvp
from .problem import AbstractReduction as AbstractReduction
from .problem import BilevelProblem as BilevelProblem
from .problem import DataParallelMean as DataParallelMean
from .problem import LocalReduction as LocalReduction
from .records import NonFiniteError as NonFiniteError
from .records import SolveFailedWarning as SolveFailedWarning
from .records import SolveInfo as SolveInfo
from .records import StepCallback as StepCallback
from .records import StepRecord as StepRecord
from .solvers import KFAC as KFAC
from .solvers import AbstractLinearSolver as AbstractLinearSolver
from .solvers import AbstractPreconditioner as AbstractPreconditioner
from .solvers import CompiledCG as CompiledCG
from .solvers import CompileFallbackWarning as CompileFallbackWarning
from .solvers import HutchinsonDiagonal as HutchinsonDiagonal
from .solvers import Nystrom as Nystrom
from .solvers import Solution as Solution
from .solvers import SolverError as SolverError
from .solvers import SolverSpec as SolverSpec
from .solvers import Status as Status
from .solvers import SystemInfo as SystemInfo
from .solvers import materialize as materialize
from .solvers import registered_solvers as registered_solvers
from .tree import tree_add as tree_add
from .tree import tree_axpy as tree_axpy
from .tree import tree_cast as tree_cast
from .tree import tree_norm as tree_norm
from .tree import tree_ravel as tree_ravel
from .tree import tree_scale as tree_scale
from .tree import tree_sub as tree_sub
from .tree import tree_vdot as tree_vdot
from .tree import tree_zeros_like as tree_zeros_like

# Every registered solver class, re-exported from hypergrad.solvers (one registry entry, no import line).
globals().update({_s.name: getattr(solvers, _s.name) for _s in registered_solvers()})

__version__ = "0.1.0"

__all__ = [
    "solvers",
    "tree",
    # types
    "BilevelLoss",
    "FixedPointMap",
    "MatVec",
    "TensorTree",
    "BufferPolicy",
    "HVPMode",
    # hypergradients
    "implicit_grad",
    "proximal_grad",
    "fixed_point_grad",
    "unrolled_grad",
    "custom_root",
    "custom_fixed_point",
    "ImplicitFunction",
    "HypergradResult",
    "UnrolledResult",
    "inverse_hvp",
    "InverseHVPResult",
    # operators
    "HVP_MODES",
    "LinearOperator",
    "HessianOperator",
    "LinearizedHessian",
    "Damped",
    "FixedPointOperator",
    "HVPFallbackWarning",
    "hvp",
    "mixed_hvp",
    "materialize",
    # solvers
    "AbstractLinearSolver",
    "Solution",
    "SolverError",
    "Status",
    *(_s.name for _s in registered_solvers()),  # every registered solver (hypergrad/solvers/_registry.py)
    "CompiledCG",
    "CompileFallbackWarning",
    "AbstractPreconditioner",
    "HutchinsonDiagonal",
    "Nystrom",
    "KFAC",
    "SolverSpec",
    "SystemInfo",
    "registered_solvers",
    # modules
    "stateless",
    "module_params",
    "tracks_running_stats",
    # trees
    "tree_add",
    "tree_axpy",
    "tree_cast",
    "tree_norm",
    "tree_ravel",
    "tree_scale",
    "tree_sub",
    "tree_vdot",
    "tree_zeros_like",
    # training loops (BilevelProblem layer)
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "MetricsLogger",
    "ProgressHook",
    "SolveInfo",
    "StepCallback",
    "StepRecord",
    "distributed",
    "get_rng_state",
    "set_rng_state",
    "Level",
    "AbstractHypergradMethod",
    "Implicit",
    "Proximal",
    "Unrolled",
    "BilevelProblem",
    "NonFiniteError",
    "SolveFailedWarning",
    "AbstractReduction",
    "LocalReduction",
    "DataParallelMean",
    # FSDP2 sharded models (helper FSDP)
    "SHARDED_HVP_MODES",
    "ShardedHVPMode",
    "ShardedHessianOperator",
    "ShardedHypergradResult",
    "shard_like",
    "sharded_implicit_grad",
    "sharded_proximal_grad",
    "sharded_value_and_grad",
    "sharded_vdot",
    "sharded_clip_grad_norm_",
]

if TYPE_CHECKING:  # the registered solver classes are set at import time; type checkers see Any

    def __getattr__(name: str) -> Any: ...
