r"""The autograd bridge: make any inner solver differentiable by the implicit function theorem.

:func:`custom_root` and :func:`custom_fixed_point` wrap a function ``solve(*args) -> x`` (a closed
form, an L-BFGS loop, a DEQ forward iteration: anything, run without a graph) into a
``torch.autograd.Function`` whose backward pass is one linear solve with a hypergrad solver
object, through the same assembly as :func:`~hypergrad.implicit_grad`
(:func:`hypergrad._assembly.root_vjp`). ``loss.backward()`` then works through it and gradients
flow to every tensor argument and everything upstream of it (an encoder that produced the input,
a module's parameters passed in as a dict).

For an optimality condition :math:`T(x^*(\theta), \theta) = 0` (e.g. :math:`T = \nabla_x G`), the
vector-Jacobian product of :math:`x^*` with a cotangent :math:`g` is

.. math::

    (\partial_x T)^\top u = g, \qquad
    \bar\theta = -(\partial_\theta T)^\top u ;

a fixed point :math:`x^* = \Phi(x^*, \theta)` is the root of :math:`T = x - \Phi`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor
from torch.func import vjp

from ._assembly import FunctionalFailurePolicy, apply_failure_policy, check_failure_policy, root_vjp
from ._checks import check_callable
from ._second_order import second_order
from .operators import LinearOperator, _check_no_inference_mode
from .solvers import AbstractLinearSolver, Solution
from .solvers._base import check_solver

__all__ = ["custom_root", "custom_fixed_point", "ImplicitFunction"]


class _Args:
    """The positional arguments split into tensor leaves (differentiable) and constants."""

    def __init__(self, args: tuple[Any, ...]):
        self.leaves: list[Tensor] = []
        self.spec: list[tuple[str, Any]] = []
        for a in args:
            if isinstance(a, Tensor):
                self.spec.append(("tensor", len(self.leaves)))
                self.leaves.append(a)
            elif isinstance(a, Mapping) and a and all(isinstance(v, Tensor) for v in a.values()):
                self.spec.append(("dict", [(k, len(self.leaves) + i) for i, k in enumerate(a)]))
                self.leaves.extend(a.values())
            else:
                self.spec.append(("const", a))

    def rebuild(self, leaves: list[Tensor]) -> tuple[Any, ...]:
        out: list[Any] = []
        for kind, info in self.spec:
            if kind == "tensor":
                out.append(leaves[info])
            elif kind == "dict":
                out.append({k: leaves[i] for k, i in info})
            else:
                out.append(info)
        return tuple(out)


def _as_tree(x: Any, what: str) -> tuple[dict[str, Tensor], bool]:
    """``(tree, was_tensor)``: a solution as a dict of floating tensors."""
    if isinstance(x, Tensor):
        tree, single = {"x": x}, True
    elif isinstance(x, Mapping) and x and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in x.items()):
        tree, single = dict(x), False
    else:
        raise TypeError(f"{what} must return a Tensor or a non-empty dict of tensors, got {type(x).__name__}.")
    for k, v in tree.items():
        if not v.is_floating_point():
            raise TypeError(f"{what} returned {k!r} of dtype {v.dtype}; the solution must be floating point.")
    return tree, single


class _JacobianTranspose(LinearOperator):
    r""":math:`u \mapsto (\partial_x T)^\top u` through a stored VJP (tagged as the caller says)."""

    def __init__(self, vjp_fn: Callable[[Any], Any], symmetric: bool):
        self._vjp_fn = vjp_fn
        self.symmetric = symmetric

    def matvec(self, v: Any) -> Any:
        with second_order():
            return {k: t.detach() for k, t in self._vjp_fn(v)[0].items()}


class ImplicitFunction:
    r"""A solver made differentiable by the implicit function theorem (made by :func:`custom_root`).

    Calling it runs the wrapped solver on detached arguments (no graph through its iterations)
    and returns its solution :math:`x^*` attached to the autograd graph; the backward pass solves

    .. math:: (\partial_x T)^\top u = \bar x,\qquad \bar\theta_i = -(\partial_{\theta_i} T)^\top u

    for every tensor argument :math:`\theta_i` (tensors and dicts of tensors; other arguments are
    constants). :attr:`last_solution` holds the :class:`~hypergrad.Solution` of the latest backward
    solve. Double backward through it is not supported.

    Attributes:
        last_solution: the latest backward pass's :class:`~hypergrad.Solution` (``None`` before).

    Example:
        >>> import torch, hypergrad
        >>> T = lambda x, a: x - a  # root x* = a, so dx*/da = I
        >>> f = hypergrad.custom_root(T, solver=hypergrad.Dense())(lambda a: a.detach().clone())
        >>> a = torch.ones(2, requires_grad=True)
        >>> (3 * f(a)).sum().backward()
        >>> a.grad, f.last_solution.status
        (tensor([3., 3.]), <Status.SUCCESS: 'success'>)
    """

    def __init__(
        self,
        solve: Callable[..., Any],
        optimality: Callable[..., Any],
        *,
        solver: AbstractLinearSolver,
        symmetric: bool,
        on_failure: FunctionalFailurePolicy,
        name: str,
    ):
        self.solve = solve
        self.optimality = optimality
        self.solver = solver
        self.symmetric = symmetric
        self.on_failure = on_failure
        self._name = name
        self.last_solution: Optional[Solution] = None
        functools.update_wrapper(self, solve)

    def __call__(self, *args: Any) -> Any:
        _check_no_inference_mode(self._name)
        spec = _Args(args)
        detached = spec.rebuild([t.detach() for t in spec.leaves])
        with torch.enable_grad():  # the wrapped solver may differentiate internally (L-BFGS, Newton)
            x = self.solve(*detached)
        tree, single = _as_tree(x, f"the function wrapped by {self._name}")
        tree = {k: v.detach() for k, v in tree.items()}
        self._check_optimality(tree, single, detached)
        needs = torch.is_grad_enabled() and any(t.requires_grad for t in spec.leaves)
        if not needs:
            return tree["x"] if single else tree
        keys = list(tree)
        outs = _RootFunction.apply(self, spec, keys, single, *tree.values(), *spec.leaves)
        return outs[0] if single else dict(zip(keys, outs))

    def _check_optimality(self, x: dict[str, Tensor], single: bool, args: tuple[Any, ...]) -> None:
        with torch.enable_grad():
            t = self.optimality(x["x"] if single else x, *args)
        tree, _ = _as_tree(t, f"`optimality` of {self._name}")
        if set(tree) != set(x) or any(tree[k].shape != x[k].shape for k in x):
            raise ValueError(
                f"{self._name}: `optimality(x, *args)` must return a tree shaped like the solution x "
                f"(keys {list(x)}, shapes {[tuple(v.shape) for v in x.values()]}), got keys {list(tree)}, "
                f"shapes {[tuple(v.shape) for v in tree.values()]}."
            )
        if any(v.requires_grad for v in tree.values()):
            raise TypeError(
                f"{self._name}: `optimality` depends on tensors that require grad but are not arguments of the "
                "call (a module's parameters, a captured tensor): their gradient would be silently missing. "
                "Pass them as arguments, e.g. f(x, dict(module.named_parameters())), and use "
                "torch.func.functional_call inside."
            )


class _RootFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, fn: ImplicitFunction, spec: _Args, keys: list[str], single: bool, *tensors: Tensor) -> Any:
        n = len(keys)
        ctx.fn, ctx.spec, ctx.keys, ctx.single = fn, spec, keys, single
        ctx.x = [t.detach() for t in tensors[:n]]
        ctx.args = [t.detach() for t in tensors[n:]]
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Optional[Tensor]) -> Any:
        fn: ImplicitFunction = ctx.fn
        n = len(ctx.keys)
        wants = [i for i in range(len(ctx.args)) if ctx.needs_input_grad[4 + n + i]]
        nothing = (None,) * (4 + n + len(ctx.args))
        if not wants:
            return nothing
        rhs = {k: (g if g is not None else torch.zeros_like(x)) for k, g, x in zip(ctx.keys, grads, ctx.x)}

        def wrap(tree: dict[str, Tensor]) -> Any:
            return tree["x"] if ctx.single else tree

        def T_of_x(x: dict[str, Tensor]) -> dict[str, Tensor]:
            return _as_tree(fn.optimality(wrap(x), *ctx.spec.rebuild(ctx.args)), "optimality")[0]

        def T_of_args(diff: list[Tensor]) -> dict[str, Tensor]:
            leaves = list(ctx.args)
            for i, t in zip(wants, diff):
                leaves[i] = t
            x = dict(zip(ctx.keys, ctx.x))
            return _as_tree(fn.optimality(wrap(x), *ctx.spec.rebuild(leaves)), "optimality")[0]

        with torch.enable_grad(), second_order():
            vjp_x = vjp(T_of_x, dict(zip(ctx.keys, ctx.x)))[1]
        operator = _JacobianTranspose(vjp_x, fn.symmetric)

        def cross(u: Any) -> dict[str, Tensor]:
            with torch.enable_grad(), second_order():
                vjp_a = vjp(T_of_args, [ctx.args[i] for i in wants])[1]
                (parts,) = vjp_a({k: t.detach() for k, t in u.items()})
            return {str(i): -p.detach() for i, p in zip(wants, parts)}

        result = root_vjp(operator, fn.solver, rhs, cross)
        fn.last_solution = result.solution
        apply_failure_policy(result.solution, fn.on_failure, fn.solver, stacklevel=2, grad=result.grad)
        out: list[Optional[Tensor]] = [None] * len(ctx.args)
        for i in wants:
            out[i] = result.grad[str(i)]
        return (None,) * (4 + n) + tuple(out)


def custom_root(
    optimality: Callable[..., Any],
    *,
    solver: AbstractLinearSolver,
    symmetric: bool = False,
    on_failure: FunctionalFailurePolicy = "warn",
) -> Callable[[Callable[..., Any]], ImplicitFunction]:
    r"""Decorator: differentiate ``solve(*args) -> x`` through the root of ``optimality(x, *args) = 0``.

    .. math::

        T(x^*(\theta), \theta) = 0 \;\Rightarrow\;
        \frac{\partial x^*}{\partial\theta}^{\!\top} \bar x = -(\partial_\theta T)^\top u,\quad
        (\partial_x T)^\top u = \bar x

    The wrapped ``solve`` runs on detached arguments (with grad mode on, so it may use autograd
    internally, e.g. ``torch.optim.LBFGS``); only its result matters, so any solver accurate to
    the root works. Arguments may be tensors, dicts of tensors (e.g. a module's
    ``dict(named_parameters())``) or constants; every tensor that requires grad receives one.
    Tensors that ``optimality`` uses must be passed as arguments (a captured tensor that requires
    grad is refused with a ``TypeError``, since its gradient would be silently missing).

    Args:
        optimality: :math:`T`, ``optimality(x, *args)`` returning a tree shaped like ``x`` (a
            tensor or dict of tensors), zero at the solution; e.g. the gradient of an inner
            objective, ``torch.func.grad(G)``.
        solver: the linear solver of the backward pass, e.g. ``hypergrad.CG(max_steps=50,
            rtol=1e-10)`` (with ``symmetric=True``), ``hypergrad.Dense()`` or ``hypergrad.Neumann``.
        symmetric: :math:`\partial_x T` is symmetric (true when :math:`T` is a gradient); tags the
            operator so CG accepts it (CG refuses it otherwise).
        on_failure: a failed backward solve: ``"warn"`` (default,
            :class:`~hypergrad.SolveFailedWarning`), ``"raise"`` (:class:`~hypergrad.SolverError`)
            or ``"apply"`` (quiet; inspect ``last_solution``).

    Returns:
        A decorator turning ``solve`` into an :class:`ImplicitFunction` (call it like ``solve``).

    Example:
        Ridge regression, :math:`w^*(\lambda) = (X^\top X + \lambda I)^{-1} X^\top y`:

        >>> import torch, hypergrad
        >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
        >>> def grad_G(w, lam):  # optimality: the gradient of 1/2 ||Xw - y||^2 + lam/2 ||w||^2
        ...     return X.T @ (X @ w - y) + lam * w
        >>> @hypergrad.custom_root(grad_G, solver=hypergrad.CG(max_steps=20, rtol=1e-12), symmetric=True)
        ... def ridge(lam):
        ...     return torch.linalg.solve(X.T @ X + lam * torch.eye(3, dtype=X.dtype), X.T @ y)
        >>> lam = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        >>> ridge(lam).sum().backward()
        >>> w = ridge(lam.detach())
        >>> exact = -(torch.linalg.solve(X.T @ X + 2.0 * torch.eye(3, dtype=X.dtype), w)).sum()
        >>> bool(torch.allclose(lam.grad, exact)), ridge.last_solution.converged
        (True, True)

    References:
        Blondel et al. (NeurIPS 2022), Efficient and modular implicit differentiation (JAXopt
        ``custom_root``).
    """
    check_callable("optimality", optimality, "(x, *args) -> tree shaped like x", owner="custom_root")
    solver = check_solver(solver, owner="custom_root")
    if not isinstance(symmetric, bool):
        raise TypeError(f"custom_root: `symmetric` must be True or False, got {symmetric!r}.")
    policy = check_failure_policy(on_failure, False, owner="custom_root")

    def decorate(solve: Callable[..., Any]) -> ImplicitFunction:
        check_callable("solve", solve, "(*args) -> x", owner="custom_root")
        return ImplicitFunction(
            solve, optimality, solver=solver, symmetric=symmetric, on_failure=policy, name="custom_root"
        )

    return decorate


def custom_fixed_point(
    phi: Callable[..., Any],
    *,
    solver: AbstractLinearSolver,
    on_failure: FunctionalFailurePolicy = "warn",
) -> Callable[[Callable[..., Any]], ImplicitFunction]:
    r"""Decorator: differentiate ``solve(*args) -> x`` through the fixed point ``x = phi(x, *args)``.

    The root of :math:`T(x, \theta) = x - \Phi(x, \theta)`, so the backward pass solves the adjoint
    equation :math:`u = \partial_x\Phi^\top u + \bar x` and returns
    :math:`\bar\theta = \partial_\theta\Phi^\top u`. The operator :math:`I - \partial_x\Phi^\top` is
    not symmetric: use ``hypergrad.FixedPoint`` (Grazzi et al.'s iteration), ``Neumann`` or
    ``Dense``. This is a deep equilibrium (DEQ) layer when ``phi`` is a network block; see the
    guide page "Differentiate any solver".

    Args:
        phi: :math:`\Phi`, ``phi(x, *args)`` returning a tree shaped like ``x``.
        solver: the backward pass's solver, e.g. ``hypergrad.FixedPoint(max_steps=100, rtol=1e-8)``.
        on_failure: as in :func:`custom_root`.

    Returns:
        A decorator turning ``solve`` into an :class:`ImplicitFunction`.

    Example:
        >>> import torch, hypergrad
        >>> phi = lambda z, a: 0.5 * torch.tanh(z) + a  # a contraction in z
        >>> @hypergrad.custom_fixed_point(phi, solver=hypergrad.FixedPoint(max_steps=100, rtol=1e-12))
        ... def equilibrium(a):
        ...     z = torch.zeros_like(a)
        ...     for _ in range(100):
        ...         z = phi(z, a)
        ...     return z
        >>> a = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
        >>> z = equilibrium(a)
        >>> z.backward()
        >>> dz = 1.0 / (1.0 - 0.5 * (1.0 - torch.tanh(z.detach()) ** 2))  # dz*/da = (1 - dphi/dz)^-1
        >>> bool(torch.allclose(a.grad, dz))
        True
    """
    check_callable("phi", phi, "(x, *args) -> tree shaped like x", owner="custom_fixed_point")
    solver = check_solver(solver, owner="custom_fixed_point")
    policy = check_failure_policy(on_failure, False, owner="custom_fixed_point")

    def residual(x: Any, *args: Any) -> Any:
        out = phi(x, *args)
        if isinstance(x, Tensor):
            return x - out
        if not isinstance(out, Mapping):
            raise TypeError(f"custom_fixed_point: `phi` must return a dict like x, got {type(out).__name__}.")
        return {k: x[k] - out[k] for k in x}

    def decorate(solve: Callable[..., Any]) -> ImplicitFunction:
        check_callable("solve", solve, "(*args) -> x", owner="custom_fixed_point")
        return ImplicitFunction(
            solve, residual, solver=solver, symmetric=False, on_failure=policy, name="custom_fixed_point"
        )

    return decorate
