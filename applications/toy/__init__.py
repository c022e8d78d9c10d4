"""Toy bilevel problems with known answers, for docs, tests and benchmarks.

Each problem exposes the losses, the inner solution and the exact hypergradient (closed forms or
dense formulas that do not use :mod:`hypergrad`), plus the inner Hessian's extreme eigenvalues
(to set a stable Neumann or gradient step). ``python -m applications.toy`` runs the demo.
"""

from .base import ToyProblem as ToyProblem
from .logistic import LogisticProblem as LogisticProblem
from .quadratic import QuadraticProblem as QuadraticProblem
from .ridge import RidgeProblem as RidgeProblem

__all__ = ["ToyProblem", "QuadraticProblem", "RidgeProblem", "LogisticProblem"]
