"""Bilevel problems with known answers: a kit for checking hypergradients (closed forms, dense formulas).

Each problem gives the inner and outer losses, the exact inner solution and the exact
hypergradient, in float64, so any method or solver can be checked against them. The core tests,
the benchmarks and the toy application (``applications/toy``) all use these problems; none of them
depends on the others.

Example:
    >>> import torch, hypergrad
    >>> from hypergrad.testing import RidgeProblem
    >>> prob = RidgeProblem(n_train=20, n_val=10, dim=3)
    >>> lam = prob.init_hparams()
    >>> g, _ = hypergrad.implicit_grad(prob.inner_loss, prob.outer_loss, prob.inner_solution(lam), lam,
    ...                                solver=hypergrad.Dense())
    >>> exact = prob.exact_hypergradient(lam)
    >>> all(torch.allclose(g[k], exact[k], rtol=1e-8) for k in exact)
    True
"""

from .base import ToyProblem as ToyProblem
from .logistic import LogisticProblem as LogisticProblem
from .quadratic import QuadraticProblem as QuadraticProblem
from .ridge import RidgeProblem as RidgeProblem

__all__ = ["ToyProblem", "QuadraticProblem", "RidgeProblem", "LogisticProblem"]
