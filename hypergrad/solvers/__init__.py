"""Linear solvers with one protocol: ``solver(matvec, b, x0=None) -> Solution``.

Adding a solver: write ``hypergrad/solvers/<name>.py``, add one import line here and one
registry line in ``tests/registry.py``.
"""

from ._base import AbstractLinearSolver as AbstractLinearSolver
from ._base import Solution as Solution
from ._base import SolverError as SolverError
from ._base import Status as Status
from .cg import CG as CG
from .dense import Dense as Dense
from .dense import materialize as materialize
from .fixed_point import FixedPoint as FixedPoint
from .identity import Identity as Identity
from .neumann import Neumann as Neumann

__all__ = [
    "AbstractLinearSolver",
    "Solution",
    "SolverError",
    "Status",
    "CG",
    "Dense",
    "FixedPoint",
    "Identity",
    "Neumann",
    "materialize",
]
