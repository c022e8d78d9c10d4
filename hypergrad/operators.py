r"""Linear operators built with ``torch.func``: Hessian-vector products and friends.

All operators act on parameter trees (``dict[str, Tensor]``) and are plain callables ``v -> A v``,
so any :mod:`hypergrad.solvers` solver accepts them. Their outputs are detached: the solvers need
values, not graphs.

HVP modes (``mode=``):

* ``"fwd_rev"``: forward-over-reverse, :math:`Hv = \partial_\epsilon \nabla f(\theta + \epsilon v)`
  via ``jvp(grad(f))``. The cheapest in memory and usually in time; the default.
* ``"rev_rev"``: reverse-over-reverse, ``vjp(grad(f))`` recomputed on each call. Covers operators
  that lack forward-mode rules.
* ``"rev_rev_cached"``: reverse-over-reverse with the gradient graph built once, when the operator
  is constructed, and reused by every call: one backward pass per HVP, no forward re-run, at the
  price of keeping the graph alive. Pays off for solves with several steps or right-hand sides.
* ``"finite_diff"``: central differences of gradients, :math:`(\nabla f(\theta+\epsilon v) -
  \nabla f(\theta-\epsilon v)) / 2\epsilon`: two gradients, no second-order AD at all, about
  :math:`\epsilon_{\text{mach}}^{2/3}` relative accuracy.
* ``"auto"``: ``"fwd_rev"``, falling back once to ``"rev_rev"`` (with a warning) if the forward
  mode raises, e.g. for an attention kernel without forward-mode support.
"""

from __future__ import annotations

import abc
import warnings
from typing import Any, Callable, Literal

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp

from ._checks import check_callable, check_choice, check_positive
from ._typing import FixedPointMap, TensorTree, TreeOrTensor
from .tree import tree_axpy, tree_check_like, tree_map, tree_norm, tree_scale, tree_sub

__all__ = [
    "HVP_MODES",
    "HVPMode",
    "LinearOperator",
    "HessianOperator",
    "Damped",
    "FixedPointOperator",
    "hvp",
    "mixed_hvp",
]

HVPMode = Literal["auto", "fwd_rev", "rev_rev", "rev_rev_cached", "finite_diff"]
HVP_MODES: tuple[str, ...] = ("auto", "fwd_rev", "rev_rev", "rev_rev_cached", "finite_diff")


class HVPFallbackWarning(UserWarning):
    """Forward-over-reverse failed for this function and ``"auto"`` switched to reverse mode.

    Emitted once per :class:`HessianOperator` built with ``mode="auto"``; pass ``mode="rev_rev"``
    to skip the forward-mode attempt (and the warning).

    Example:
        >>> import warnings, hypergrad
        >>> warnings.simplefilter("ignore", hypergrad.HVPFallbackWarning)  # silence it
    """


def _check_mode(mode: Any) -> None:
    check_choice("mode", mode, HVP_MODES)


def _detach(tree: TreeOrTensor) -> TreeOrTensor:
    return tree_map(torch.Tensor.detach, tree)


class LinearOperator(abc.ABC):
    r"""A linear map :math:`v \mapsto A v` on parameter trees. Subclasses implement :meth:`matvec`.

    Calling the operator is :meth:`matvec`, so any operator is a ``MatVec`` for the solvers.

    Example:
        >>> import torch
        >>> from hypergrad import LinearOperator
        >>> class Scale(LinearOperator):
        ...     def matvec(self, v):
        ...         return {k: 2.0 * x for k, x in v.items()}
        >>> Scale()({"w": torch.ones(2)})["w"]
        tensor([2., 2.])
    """

    def __call__(self, v: TreeOrTensor) -> TreeOrTensor:
        return self.matvec(v)

    @abc.abstractmethod
    def matvec(self, v: TreeOrTensor) -> TreeOrTensor:
        """Return :math:`A v`.

        Args:
            v: a tree (or tensor) shaped like the operator's domain.

        Returns:
            :math:`A v`, shaped like ``v``, detached from any autograd graph.
        """


class HessianOperator(LinearOperator):
    r"""The Hessian :math:`H = \nabla^2 f(\theta)` of a scalar function, as a matvec.

    .. math:: v \mapsto H v = \nabla^2 f(\theta)\, v

    Args:
        fn: ``fn(params) -> scalar tensor``; close over batches and fixed hyper-parameters.
        params: the point :math:`\theta`, a dict of floating-point tensors.
        mode: one of :data:`HVP_MODES` (see the module docstring). ``"rev_rev_cached"`` runs the
            forward and backward pass once here, at construction.

    Example:
        >>> import torch
        >>> from hypergrad import HessianOperator
        >>> f = lambda p: (p["w"] ** 3).sum()
        >>> H = HessianOperator(f, {"w": torch.tensor([1.0, 2.0])})
        >>> H({"w": torch.tensor([1.0, 1.0])})["w"]  # 6 w * v
        tensor([ 6., 12.])
    """

    def __init__(self, fn: Callable[[TensorTree], Tensor], params: TensorTree, *, mode: HVPMode = "auto"):
        check_callable("fn", fn, "params -> scalar", owner="HessianOperator")
        _check_mode(mode)
        self.fn = fn
        self.params = _detach(params)
        self.requested_mode = mode
        self.mode = "fwd_rev" if mode == "auto" else mode
        self._vjp_fn = None
        if self.mode == "rev_rev_cached":
            _, self._vjp_fn = vjp(grad(fn), self.params)

    def matvec(self, v: TreeOrTensor) -> TreeOrTensor:
        if self.requested_mode == "auto" and self.mode == "fwd_rev":
            try:
                return _detach(_hvp_once(self.fn, self.params, v, "fwd_rev"))
            except (RuntimeError, NotImplementedError) as err:
                warnings.warn(
                    f"forward-over-reverse HVP failed ({type(err).__name__}: {str(err)[:200]}); "
                    "hypergrad switched this operator to mode='rev_rev'. Pass mode='rev_rev' to "
                    "silence this warning.",
                    HVPFallbackWarning,
                    stacklevel=2,
                )
                self.mode = "rev_rev"
        if self._vjp_fn is not None:
            return _detach(self._vjp_fn(v)[0])
        return _detach(_hvp_once(self.fn, self.params, v, self.mode))


def _hvp_once(fn: Callable[[TensorTree], Tensor], params: TensorTree, v: TreeOrTensor, mode: str) -> TreeOrTensor:
    if mode == "fwd_rev":
        return jvp(grad(fn), (params,), (v,))[1]
    if mode in ("rev_rev", "rev_rev_cached"):
        return vjp(grad(fn), params)[1](v)[0]
    # finite_diff: central difference of gradients with a step scaled to the point and direction.
    # By linearity, H v = |v|_max * H (v / |v|_max): differencing along the rescaled direction keeps
    # the step well defined when ||v||^2 under- or overflows (a converged solver's tiny residuals).
    leaves = [v] if isinstance(v, Tensor) else list(v.values())
    v_max = float(torch.stack([t.detach().abs().max() for t in leaves]).max())
    if v_max == 0.0:
        return tree_map(torch.zeros_like, v)
    u = tree_scale(v, 1.0 / v_max)
    eps_mach = torch.finfo(next(iter(params.values())).dtype).eps
    eps = (eps_mach ** (1.0 / 3.0)) * (1.0 + float(tree_norm(params))) / float(tree_norm(u))
    g_plus = grad(fn)(tree_axpy(eps, u, params))
    g_minus = grad(fn)(tree_axpy(-eps, u, params))
    return tree_scale(tree_sub(g_plus, g_minus), v_max / (2.0 * eps))


def hvp(
    fn: Callable[[TensorTree], Tensor], params: TensorTree, v: TreeOrTensor, *, mode: HVPMode = "fwd_rev"
) -> TreeOrTensor:
    r"""One Hessian-vector product :math:`\nabla^2 f(\theta) v`.

    For repeated products at the same point, build a :class:`HessianOperator` instead.

    Args:
        fn: ``fn(params) -> scalar tensor``.
        params: the point :math:`\theta`, a dict of floating-point tensors.
        v: the direction, a tree keyed and shaped like ``params``.
        mode: one of :data:`HVP_MODES` (see the module docstring).

    Returns:
        :math:`\nabla^2 f(\theta) v`, a detached tree keyed like ``params``.

    Example:
        >>> import torch
        >>> from hypergrad import hvp
        >>> f = lambda p: (p["w"] ** 2).sum() * p["b"].sum()
        >>> p = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
        >>> hvp(f, p, {"w": torch.zeros(2), "b": torch.ones(1)})["w"]  # d2f/dw db = 2w
        tensor([2., 4.])
    """
    _check_mode(mode)
    return HessianOperator(fn, params, mode=mode)(v)


def mixed_hvp(
    fn: Callable[[TensorTree, TensorTree], Tensor],
    params: TensorTree,
    hparams: TensorTree,
    v: TreeOrTensor,
    *,
    mode: HVPMode = "fwd_rev",
) -> TensorTree:
    r"""The mixed second-derivative product :math:`\big(\partial^2_{\lambda\theta} G\big) v`.

    .. math:: \big(\partial^2_{\lambda\theta} G\big) v = \nabla_\lambda \langle \nabla_\theta G(\theta, \lambda), v \rangle

    computed forward-over-reverse as the JVP (in :math:`\theta`, along :math:`v`) of
    :math:`\nabla_\lambda G`, or reverse-over-reverse as the VJP (in :math:`\lambda`) of
    :math:`\nabla_\theta G`.

    Args:
        fn: :math:`G`, ``fn(params, hparams) -> scalar tensor``.
        params: :math:`\theta`, a dict of tensors.
        hparams: :math:`\lambda`, a dict of tensors.
        v: a tree keyed and shaped like ``params``.
        mode: one of :data:`HVP_MODES`; ``"auto"`` and ``"fwd_rev"`` use forward-over-reverse,
            the ``"rev_rev"`` modes reverse-over-reverse.

    Returns:
        A detached dict keyed like ``hparams``.

    Example:
        >>> import torch
        >>> from hypergrad import mixed_hvp
        >>> G = lambda p, h: (h["lam"] * p["w"] ** 2).sum()
        >>> mixed_hvp(G, {"w": torch.tensor([1.0, 2.0])}, {"lam": torch.tensor(0.5)}, {"w": torch.ones(2)})["lam"]
        tensor(6.)
    """
    _check_mode(mode)
    params, hparams = _detach(params), _detach(hparams)
    if mode == "finite_diff":
        mode = "rev_rev"
    if mode in ("auto", "fwd_rev"):
        try:
            out = jvp(lambda th: grad(fn, argnums=1)(th, hparams), (params,), (v,))[1]
            return _detach(out)
        except (RuntimeError, NotImplementedError):
            if mode == "fwd_rev":
                raise
    out = vjp(lambda lam: grad(fn, argnums=0)(params, lam), hparams)[1](v)[0]
    return _detach(out)


class Damped(LinearOperator):
    r"""Tikhonov damping: :math:`v \mapsto (A + \mu I) v`.

    Wraps any operator; solvers stay unaware of damping. Use it to regularise an indefinite or
    ill-conditioned Hessian (``mu > 0``) before :class:`~hypergrad.solvers.CG`.

    Args:
        operator: any callable ``v -> A v`` (a :class:`HessianOperator`, a lambda).
        mu: the damping :math:`\mu \ge 0`.

    Example:
        >>> import torch
        >>> from hypergrad import Damped
        >>> Damped(lambda v: 2 * v, 0.5)(torch.ones(2))
        tensor([2.5000, 2.5000])
    """

    def __init__(self, operator: Callable[[TreeOrTensor], TreeOrTensor], mu: float):
        check_callable("operator", operator, "v -> A v", owner="Damped")
        self.operator = operator
        self.mu = check_positive("mu", mu, allow_zero=True, owner="Damped")

    def matvec(self, v: TreeOrTensor) -> TreeOrTensor:
        return tree_axpy(self.mu, v, self.operator(v))


class FixedPointOperator(LinearOperator):
    r"""The adjoint operator of a fixed-point map: :math:`v \mapsto (I - \partial_\theta\Phi^\top) v`.

    For :math:`\theta^* = \Phi(\theta^*, \lambda)` the hypergradient needs
    :math:`v = \partial_\theta\Phi^\top v + \nabla_\theta F`, i.e. :math:`(I - \partial_\theta\Phi^\top) v
    = \nabla_\theta F`, and then :math:`\partial_\lambda\Phi^\top v` (:meth:`hparam_vjp`). The map
    is run forward once, at construction; every matvec is one VJP through that graph.

    Args:
        phi: ``phi(params, hparams) -> params`` (same keys and shapes as ``params``).
        params: the fixed point :math:`\theta^*` (approximately).
        hparams: :math:`\lambda`.

    Example:
        >>> import torch
        >>> from hypergrad import FixedPointOperator
        >>> phi = lambda p, h: {"w": 0.5 * p["w"] + h["b"]}
        >>> op = FixedPointOperator(phi, {"w": torch.ones(2)}, {"b": torch.zeros(2)})
        >>> op({"w": torch.ones(2)})["w"]
        tensor([0.5000, 0.5000])
    """

    def __init__(self, phi: FixedPointMap, params: TensorTree, hparams: TensorTree):
        check_callable("phi", phi, "(params, hparams) -> params", owner="FixedPointOperator")
        self.params, self.hparams = _detach(params), _detach(hparams)
        out, self._vjp_fn = vjp(phi, self.params, self.hparams)
        if not isinstance(out, dict):
            raise TypeError(f"`phi` must return a dict of tensors keyed like `params`, got {type(out).__name__}.")
        tree_check_like("phi(params, hparams)", out, self.params, "params")
        self.phi_value = _detach(out)

    def matvec(self, v: TreeOrTensor) -> TreeOrTensor:
        return tree_sub(v, _detach(self._vjp_fn(v)[0]))

    def hparam_vjp(self, v: TensorTree) -> TensorTree:
        r"""The hyper-parameter VJP :math:`\partial_\lambda\Phi(\theta, \lambda)^\top v` through the stored graph.

        Args:
            v: a tree keyed and shaped like ``params`` (the solution of the adjoint system).

        Returns:
            A detached dict keyed like ``hparams``.
        """
        return _detach(self._vjp_fn(v)[1])
