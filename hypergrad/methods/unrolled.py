"""Unrolled (reverse-mode through inner SGD steps) hypergradients: the comparison baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.func import grad

from .._checks import check_int, check_positive, check_truncate
from .._typing import TensorTree
from ..hypergradient import unrolled_grad
from ..records import NonFiniteError
from ..tree import tree_axpy
from ._base import AbstractHypergradMethod, MethodOutput, PureLoss, _wide

__all__ = ["Unrolled"]


@dataclass(frozen=True)
class Unrolled(AbstractHypergradMethod):
    r"""Differentiate through ``steps`` SGD steps on the inner loss (the comparison baseline).

    .. math::

        \theta_{k+1} = \theta_k - \eta \nabla_\theta G(\theta_k, \lambda),\quad k < K;
        \qquad \nabla_\lambda F(\theta_K(\lambda), \lambda)

    started at the current inner parameters and run functionally on the Hessian batch (the real
    inner parameters and optimiser are not touched). Memory grows with ``truncate`` (default: all
    ``steps``). Under data parallelism each rank unrolls on its own batch and the results are
    averaged (an approximation of the single-process unrolled gradient).

    Args:
        steps: :math:`K \ge 1`.
        lr: inner step :math:`\eta > 0` of the unrolled SGD.
        truncate: differentiate only the last ``truncate`` steps (``None``: all).

    Example:
        >>> import hypergrad
        >>> hypergrad.Unrolled(steps=5, lr=0.1).steps
        5
    """

    steps: int = 10
    lr: float = 0.1
    truncate: Optional[int] = None

    def __post_init__(self) -> None:
        check_int("steps", self.steps, owner="Unrolled")
        check_positive("lr", self.lr, owner="Unrolled")
        check_truncate(self.truncate, "steps", self.steps, owner="Unrolled")

    def hypergradient(self, inner_fn, outer_fn, params, hparams, state, reduce, operator_key) -> MethodOutput:
        def sgd_step(theta: TensorTree, lam: TensorTree) -> dict[str, Tensor]:
            g = grad(inner_fn)(theta, lam)
            return dict(tree_axpy(-self.lr, g, theta))

        try:
            result = unrolled_grad(sgd_step, outer_fn, params, hparams, num_steps=self.steps, truncate=self.truncate)
        except ValueError:
            self._raise_if_nonfinite(sgd_step, outer_fn, params, hparams)
            raise  # not a numerical problem
        final, g_lam = result.params, result.grad
        with torch.no_grad():
            value = _wide(outer_fn(final, hparams))
        packed = reduce({**{"h." + k: v for k, v in g_lam.items()}, "loss": value.reshape(1)})
        value = packed["loss"].reshape(())
        if not bool(torch.isfinite(value)):
            raise NonFiniteError(f"the outer loss after {self.steps} unrolled steps is {value.item()}")
        return MethodOutput({k: packed["h." + k] for k in g_lam}, value, None, 0, False)

    def _raise_if_nonfinite(self, sgd_step: Callable, outer_fn: PureLoss, params: dict, hparams: dict) -> None:
        theta = dict(params)
        for _ in range(self.steps):
            theta = {k: v.detach() for k, v in sgd_step(theta, hparams).items()}
        value = outer_fn(theta, hparams).detach()
        if not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"the outer loss after {self.steps} unrolled steps is {value.reshape(-1)[0].item()}")
