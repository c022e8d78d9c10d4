"""Linear solvers with one protocol: ``solver(matvec, b, x0=None) -> Solution``.

The solver classes are exported from the registry (:func:`registered_solvers`): adding a solver is
one file in ``hypergrad/solvers/`` and one :class:`SolverSpec` line in
``hypergrad/solvers/_registry.py`` (see CONTRIBUTING.md); this module, ``hypergrad``, the contract
tests, the benchmarks and the API docs all read that list. :class:`CompiledCG` (a fixed-budget CG
compiled as one ``torch.compile`` graph) is exported here but not registered: its first solve per
operator compiles, which the registry-wide contract tests would pay for every case.
"""

from typing import TYPE_CHECKING, Any

from ._base import AbstractLinearSolver as AbstractLinearSolver
from ._base import Solution as Solution
from ._base import SolverError as SolverError
from ._base import Status as Status
from ._registry import SolverSpec as SolverSpec
from ._registry import SystemInfo as SystemInfo
from ._registry import registered_solvers as registered_solvers
from .compiled_cg import CompiledCG as CompiledCG
from .compiled_cg import CompileFallbackWarning as CompileFallbackWarning
from .dense import materialize as materialize
from .kfac import KFAC as KFAC
from .preconditioners import AbstractPreconditioner as AbstractPreconditioner
from .preconditioners import HutchinsonDiagonal as HutchinsonDiagonal
from .preconditioners import Nystrom as Nystrom

# The registered solver classes, imported from their modules and exported under their names.
_CLASSES: dict[str, type[AbstractLinearSolver]] = {s.name: s.load() for s in registered_solvers()}
globals().update(_CLASSES)

__all__ = [
    "AbstractLinearSolver",
    "Solution",
    "SolverError",
    "Status",
    *_CLASSES,
    "CompiledCG",
    "CompileFallbackWarning",
    "materialize",
    "AbstractPreconditioner",
    "HutchinsonDiagonal",
    "Nystrom",
    "KFAC",
    "SolverSpec",
    "SystemInfo",
    "registered_solvers",
]

if TYPE_CHECKING:  # the registered classes are set above at import time; type checkers see Any

    def __getattr__(name: str) -> Any: ...
