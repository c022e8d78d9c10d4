"""Toy bilevel problems with known answers, for docs, tests and benchmarks.

Each problem exposes the losses, the inner solution and the exact hypergradient (closed forms or
dense formulas that do not use :mod:`hypergrad`), plus the inner Hessian's extreme eigenvalues
(to set a stable Neumann or gradient step). ``python -m applications.toy`` runs the demo.
"""

from hypergrad.testing import LogisticProblem as LogisticProblem
from hypergrad.testing import QuadraticProblem as QuadraticProblem
from hypergrad.testing import RidgeProblem as RidgeProblem
from hypergrad.testing import ToyProblem as ToyProblem

__all__ = ["ToyProblem", "QuadraticProblem", "RidgeProblem", "LogisticProblem"]
