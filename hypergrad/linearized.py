r"""A frozen forward-over-reverse Hessian: the linearisation of the gradient computed once.

:class:`LinearizedHessian` is ``HessianOperator(fn, params, mode="fwd_rev_linearized")`` with a
fall-back: ``torch.func.linearize`` runs on :math:`\nabla f` at construction (one forward and
backward pass, traced, with the forward-mode (tangent) program of the gradient kept as a graph
whose primal values are constants); every matvec then evaluates only that tangent program: no
forward re-run, no backward pass, no Python-level forward-mode decompositions per call. It is the
forward-over-reverse counterpart of ``HessianOperator(mode="rev_rev_cached")`` (which keeps the
reverse graph instead), and suits many solves or right-hand sides at one point.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from ._checks import check_callable
from ._typing import TensorTree
from .operators import HessianOperator, HVPFallbackWarning
from .tree import tree_map

__all__ = ["LinearizedHessian"]


class LinearizedHessian(HessianOperator):
    r"""The Hessian :math:`\nabla^2 f(\theta)` as a matvec, with the linearisation computed once.

    .. math::

        (\nabla f)(\theta + \epsilon v) = \nabla f(\theta) + \epsilon\,\nabla^2 f(\theta)\,v + O(\epsilon^2),
        \qquad v \mapsto \nabla^2 f(\theta)\,v = \partial_\epsilon (\nabla f)(\theta + \epsilon v)\big|_{\epsilon=0}

    ``torch.func.linearize(grad(fn), params)`` traces the JVP of the gradient once, here; each call
    then runs the stored tangent program (exact, not a finite difference). It is
    ``HessianOperator(fn, params, mode="fwd_rev_linearized")``, the mode every method and
    :class:`~hypergrad.BilevelProblem` accept, plus a fall-back: when tracing fails (an operation
    without forward-mode support, data-dependent control flow), the operator is built on the cached
    reverse graph instead (the ``"rev_rev_cached"`` mode) with an
    :class:`~hypergrad.HVPFallbackWarning`; :attr:`mode` says which one was built, once and for all.

    Buffers: pass a pure function (e.g. built with :func:`hypergrad.stateless`), so that BatchNorm
    running statistics are never updated inside the trace.

    Args:
        fn: ``fn(params) -> scalar tensor``, pure (close over batches and fixed hyper-parameters).
        params: the point :math:`\theta`, a dict of floating-point tensors.
        fallback: build on the cached reverse graph if linearisation fails (default ``True``);
            ``False`` re-raises the error.

    Attributes:
        mode: ``"fwd_rev_linearized"`` or ``"rev_rev_cached"`` (after a fallback).
        grad_value: :math:`\nabla f(\theta)` (computed while linearising), detached.

    Example:
        >>> import torch
        >>> from hypergrad import LinearizedHessian
        >>> f = lambda p: (p["w"] ** 3).sum()
        >>> H = LinearizedHessian(f, {"w": torch.tensor([1.0, 2.0])})
        >>> H({"w": torch.tensor([1.0, 1.0])})["w"], H.mode  # 6 w * v
        (tensor([ 6., 12.]), 'fwd_rev_linearized')
    """

    def __init__(self, fn: Callable[[TensorTree], Tensor], params: TensorTree, *, fallback: bool = True):
        check_callable("fn", fn, "params -> scalar", owner="LinearizedHessian")
        if not isinstance(params, dict) or not params:
            raise TypeError(
                f"LinearizedHessian: `params` must be a non-empty dict of tensors, got {type(params).__name__}; "
                "use dict(module.named_parameters())."
            )
        try:
            super().__init__(fn, params, mode="fwd_rev_linearized")
        except (RuntimeError, NotImplementedError, TypeError) as err:
            if not fallback:
                raise
            warnings.warn(
                f"torch.func.linearize failed ({type(err).__name__}: {str(err)[:200]}); LinearizedHessian "
                "uses the cached reverse graph (mode 'rev_rev_cached') instead.",
                HVPFallbackWarning,
                stacklevel=2,
            )
            super().__init__(fn, params, mode="rev_rev_cached")

    @property
    def grad_value(self) -> Any:
        r""":math:`\nabla f(\theta)`, detached (computed while building the operator)."""
        return tree_map(torch.Tensor.detach, self._grad_value)
