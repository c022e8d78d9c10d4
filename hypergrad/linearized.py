r"""A frozen forward-over-reverse Hessian: the linearisation of the gradient computed once.

:class:`LinearizedHessian` runs ``torch.func.linearize`` on :math:`\nabla f` at construction: one
forward and backward pass, traced, with the forward-mode (tangent) program of the gradient kept as
a graph whose primal values are constants. Every matvec then evaluates only that tangent program:
no forward re-run, no backward pass, no Python-level forward-mode decompositions per call. It is
the forward-over-reverse counterpart of ``HessianOperator(mode="rev_rev_cached")`` (which keeps
the reverse graph instead), and suits several solves or right-hand sides at one point.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor
from torch.func import grad, linearize, vjp

from ._checks import check_callable
from ._typing import TensorTree, TreeOrTensor
from .operators import HVPFallbackWarning, LinearOperator
from .tree import tree_map

__all__ = ["LinearizedHessian"]


class LinearizedHessian(LinearOperator):
    r"""The Hessian :math:`\nabla^2 f(\theta)` as a matvec, with the linearisation computed once.

    .. math::

        (\nabla f)(\theta + \epsilon v) = \nabla f(\theta) + \epsilon\,\nabla^2 f(\theta)\,v + O(\epsilon^2),
        \qquad v \mapsto \nabla^2 f(\theta)\,v = \partial_\epsilon (\nabla f)(\theta + \epsilon v)\big|_{\epsilon=0}

    ``torch.func.linearize(grad(fn), params)`` traces the JVP of the gradient once, here; each call
    then runs the stored tangent program (exact, not a finite difference). The traced program keeps
    the point's intermediate values alive, like a cached reverse graph. When tracing fails (an
    operation without forward-mode support, data-dependent control flow), the operator is built on
    the cached reverse graph instead (``vjp(grad(fn))``, the ``"rev_rev_cached"`` mode) with an
    :class:`~hypergrad.HVPFallbackWarning`; :attr:`mode` says which one was built, once and for all.

    Buffers: pass a pure function (e.g. built with :func:`hypergrad.stateless`), so that BatchNorm
    running statistics are never updated inside the trace. Attention must run on a backend with
    forward-mode support (``sdpa_kernel(SDPBackend.MATH)``).

    Args:
        fn: ``fn(params) -> scalar tensor``, pure (close over batches and fixed hyper-parameters).
        params: the point :math:`\theta`, a dict of floating-point tensors.
        fallback: build on the cached reverse graph if linearisation fails (default ``True``);
            ``False`` re-raises the error.

    Attributes:
        mode: ``"linearized"`` or ``"rev_rev_cached"`` (after a fallback).
        grad_value: :math:`\nabla f(\theta)` (computed while linearising), detached.

    Example:
        >>> import torch
        >>> from hypergrad import LinearizedHessian
        >>> f = lambda p: (p["w"] ** 3).sum()
        >>> H = LinearizedHessian(f, {"w": torch.tensor([1.0, 2.0])})
        >>> H({"w": torch.tensor([1.0, 1.0])})["w"], H.mode  # 6 w * v
        (tensor([ 6., 12.]), 'linearized')
    """

    def __init__(self, fn: Callable[[TensorTree], Tensor], params: TensorTree, *, fallback: bool = True):
        check_callable("fn", fn, "params -> scalar", owner="LinearizedHessian")
        if not isinstance(params, dict) or not params:
            raise TypeError(
                f"LinearizedHessian: `params` must be a non-empty dict of tensors, got {type(params).__name__}; "
                "use dict(module.named_parameters())."
            )
        self.fn = fn
        self.params = {k: v.detach() for k, v in params.items()}
        self._apply: Callable[[Any], Any]
        try:
            with warnings.catch_warnings():  # torch's tracer warns about its own internals
                warnings.simplefilter("ignore")
                value, jvp_fn = linearize(grad(fn), self.params)
            self.mode = "linearized"
            self._apply = jvp_fn
        except (RuntimeError, NotImplementedError, TypeError) as err:
            if not fallback:
                raise
            warnings.warn(
                f"torch.func.linearize failed ({type(err).__name__}: {str(err)[:200]}); LinearizedHessian "
                "uses the cached reverse graph (mode 'rev_rev_cached') instead.",
                HVPFallbackWarning,
                stacklevel=2,
            )
            primal_and_vjp = vjp(grad(fn), self.params)
            value, vjp_fn = primal_and_vjp[0], primal_and_vjp[1]
            self.mode = "rev_rev_cached"
            self._apply = lambda v: vjp_fn(v)[0]
        self.grad_value = tree_map(torch.Tensor.detach, value)

    def matvec(self, v: TreeOrTensor) -> TreeOrTensor:
        return tree_map(torch.Tensor.detach, self._apply(v))
