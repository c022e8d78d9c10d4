r"""Inverse-Hessian-vector products for a block of vectors: :math:`(H + \mu I)^{-1} V`."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ._assembly import FunctionalFailurePolicy, apply_failure_policy, check_failure_policy
from ._checks import check_callable, check_choice, check_int, check_positive
from ._typing import TensorTree
from .operators import (
    HVP_MODES,
    Damped,
    HessianOperator,
    HVPMode,
    _check_block_direction,
    _check_no_inference_mode,
    _check_params_real,
    _column,
    _stack_columns,
)
from .solvers import AbstractLinearSolver, Solution, Status
from .solvers._base import check_solver
from .solvers.block_cg import BlockCG

__all__ = ["InverseHVPResult", "inverse_hvp"]


class InverseHVPResult(NamedTuple):
    """``(x, solution)``: the block of solutions and the solve behind it.

    Attributes:
        x: :math:`X = (H + \\mu I)^{-1} V`, a dict keyed like ``params`` whose leaves carry the
            block dimension of ``vectors``.
        solution: one :class:`~hypergrad.Solution` for the whole block: a block solver's own, or,
            for a single-right-hand-side solver, the column solves merged (``num_matvecs`` and
            ``num_steps`` summed, ``status`` the first failed column's, ``residual_norm`` the
            Frobenius norm, ``stats["residual_norms"]`` per column and ``stats["solutions"]`` the
            column :class:`~hypergrad.Solution` objects).

    Example:
        >>> import torch, hypergrad
        >>> res = hypergrad.inverse_hvp(lambda p: (p["w"] ** 2).sum(), {"w": torch.ones(2)}, {"w": torch.eye(2)})
        >>> res.x["w"], res.solution.status
        (tensor([[0.5000, 0.0000],
                [0.0000, 0.5000]]), <Status.FIXED_BUDGET: 'fixed_budget'>)
    """

    x: dict[str, Tensor]
    solution: Solution


def inverse_hvp(
    fn: Callable[[TensorTree], Tensor],
    params: TensorTree,
    vectors: TensorTree,
    *,
    damping: float = 0.0,
    solver: Optional[AbstractLinearSolver] = None,
    hvp_mode: HVPMode = "auto",
    on_failure: FunctionalFailurePolicy = "warn",
    chunk_size: Optional[int] = None,
) -> InverseHVPResult:
    r"""Solve :math:`(\nabla^2 f(\theta) + \mu I)\, X = V` for a block of vectors :math:`V = [v_1, \dots, v_s]`.

    .. math:: x_j = \big(\nabla^2 f(\theta) + \mu I\big)^{-1} v_j,\qquad j = 1, \dots, s

    The inverse-Hessian-vector products ("iHVPs") of influence functions (:math:`s` test points'
    gradients, :math:`f` the training loss: Koh & Liang 2017) and of several outer objectives
    sharing one inner problem. The Hessian operator is built once (:class:`HessianOperator`, the
    cached graph under ``"auto"``) and serves every column. With a block solver
    (:class:`~hypergrad.BlockCG`, the default) the whole block is ONE solve, whose products are
    batched (:meth:`HessianOperator.matmat`); with any other solver each column is solved on its
    own (same operator, same answers to the solvers' tolerances). The HVP count is
    ``solution.num_matvecs`` either way (a block of :math:`r` products counts :math:`r`).

    Args:
        fn: :math:`f`, ``fn(params) -> scalar tensor`` (close over data and fixed hyper-parameters).
        params: the point :math:`\theta`, a dict of floating tensors.
        vectors: :math:`V`, a dict keyed like ``params`` whose leaves are shaped
            ``(s, *params[k].shape)``: column :math:`j` is ``{k: vectors[k][j]}``.
        damping: :math:`\mu \ge 0` (regularises an indefinite or singular Hessian).
        solver: a solver object; ``None`` is ``BlockCG()`` (its defaults: a fixed budget of 10 block
            steps; pass e.g. ``BlockCG(max_steps=100, rtol=1e-6)`` for a tolerance).
        hvp_mode: see :mod:`hypergrad.operators`.
        on_failure: a failed solve (any column): ``"warn"`` (default) returns it with a
            :class:`~hypergrad.SolveFailedWarning`, ``"raise"`` raises
            :class:`~hypergrad.SolverError`, ``"apply"`` returns it quietly; a non-finite solution
            raises unless ``"apply"`` (the policy of :func:`implicit_grad`).
        chunk_size: with a block solver, batch at most this many columns per product (``None``: the
            whole block at once). A batched product holds the double-backward buffers of each of
            its columns at once: on the BiSSL ResNet-18 system a batch of 8 products peaked at 5.3x
            the memory of 8 products one by one for 1.24-1.26x their speed, chunks of 4 at 2.9x for
            1.33x, chunks of 2 at 1.6x for 1.07x (``benchmarks/bench_block_cg.py --products small``,
            CPU, docs/benchmarks.md). The same products either way, so the same solution.

    Returns:
        :class:`InverseHVPResult` ``(x, solution)``; ``x`` is shaped like ``vectors``.

    Raises:
        TypeError / ValueError: bad arguments (the message names the argument and shows the value).
        SolverError: a failed solve under ``on_failure="raise"``, or a non-finite one unless ``"apply"``.

    Example:
        >>> import torch, hypergrad
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> f = lambda p: 0.5 * p["w"] @ A @ p["w"]  # Hessian A
        >>> V = {"w": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)}
        >>> res = hypergrad.inverse_hvp(f, {"w": torch.zeros(2, dtype=torch.float64)}, V,
        ...                             solver=hypergrad.BlockCG(max_steps=5, rtol=1e-12))
        >>> torch.allclose(res.x["w"], V["w"] @ torch.linalg.inv(A)), res.solution.num_matvecs
        (True, 2)

    References:
        Koh & Liang (ICML 2017), Understanding black-box predictions via influence functions.
        O'Leary (1980), The block conjugate gradient algorithm and related methods.
    """
    _check_no_inference_mode("inverse_hvp")
    check_callable("fn", fn, "params -> scalar", owner="inverse_hvp")
    _check_params_real(params, owner="inverse_hvp")
    s = _check_block_direction(vectors, params, owner="inverse_hvp")
    damping = check_positive("damping", damping, allow_zero=True, owner="inverse_hvp")
    solver = BlockCG() if solver is None else check_solver(solver, owner="inverse_hvp")
    check_choice("hvp_mode", hvp_mode, HVP_MODES, owner="inverse_hvp")
    policy = check_failure_policy(on_failure, False, owner="inverse_hvp")
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, owner="inverse_hvp")
    vectors = {k: vectors[k].detach() for k in params}
    operator: Any = HessianOperator(fn, params, mode=hvp_mode)
    if damping > 0:
        operator = Damped(operator, damping)
    if isinstance(solver, BlockCG):
        solution = solver.solve_block(operator if chunk_size is None else _chunked(operator, chunk_size), vectors)
    else:
        solution = _merge([solver(operator, _column(vectors, j)) for j in range(s)])
    apply_failure_policy(solution, policy, solver, stacklevel=3)
    return InverseHVPResult(solution.x, solution)  # type: ignore[arg-type]


def _chunked(operator: Any, chunk_size: int) -> Callable[[dict], dict]:
    """``V -> A V`` through ``operator.matmat`` on at most ``chunk_size`` columns at a time."""

    def matmat(V: dict) -> dict:
        s = next(iter(V.values())).shape[0]
        parts = [operator.matmat({k: t[i : i + chunk_size] for k, t in V.items()}) for i in range(0, s, chunk_size)]
        return {k: torch.cat([p[k] for p in parts]) for k in V}

    return matmat


def _merge(solutions: list[Solution]) -> Solution:
    """The column solves of one block as one :class:`Solution` (see :class:`InverseHVPResult`)."""
    failed = [sol for sol in solutions if sol.failed]
    nonfinite = [sol for sol in failed if sol.status is Status.NONFINITE]
    status = (nonfinite or failed or solutions)[0].status
    res = [sol.residual_norm for sol in solutions]
    b_norms = [sol.b_norm for sol in solutions]
    frob = _frobenius(res)
    b_frob = _frobenius(b_norms)
    stats = {"residual_norms": res, "b_norms": b_norms, "statuses": [s.status.value for s in solutions]}
    return Solution(
        _stack_columns([sol.x for sol in solutions]),
        status,
        sum(sol.num_steps for sol in solutions),
        sum(sol.num_matvecs for sol in solutions),
        frob,
        {**stats, "solutions": tuple(solutions)},
        b_frob,
    )


def _frobenius(norms: list[Optional[float]]) -> Optional[float]:
    """:math:`\\sqrt{\\sum_j n_j^2}`, or ``None`` when a column's norm is unknown."""
    known = [n for n in norms if n is not None]
    return math.sqrt(sum(n * n for n in known)) if len(known) == len(norms) else None
