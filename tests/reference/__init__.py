"""Reference bilevel problems with known answers for the core tests (closed forms, dense formulas).

A copy owned by the tests, so that core tests do not depend on ``applications/`` (which may change
for demos); the toy application keeps its own copy for docs and benchmarks.
"""

from .base import ToyProblem as ToyProblem
from .logistic import LogisticProblem as LogisticProblem
from .quadratic import QuadraticProblem as QuadraticProblem
from .ridge import RidgeProblem as RidgeProblem

__all__ = ["ToyProblem", "QuadraticProblem", "RidgeProblem", "LogisticProblem"]
