"""Conjugate gradient for a fixed budget, the whole loop compiled by ``torch.compile``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .._checks import check_int
from .._typing import MatVec, TreeOrTensor
from ..tree import tree_axpy, tree_sub, tree_vdot, tree_zeros_like
from ._base import AbstractLinearSolver, Solution, Status, curvature_final_status, refuse_nonsymmetric

__all__ = ["CompiledCG", "CompileFallbackWarning"]

_BACKENDS = ("inductor", "aot_eager", "eager")


class CompileFallbackWarning(UserWarning):
    """``torch.compile`` of a :class:`CompiledCG` loop failed; the solve ran eagerly instead.

    Raised as a warning once per solver settings and kind of operator (the first failure), with the
    compiler's error in the message; later solves of the same kind run eagerly without retrying
    (their :class:`~hypergrad.solvers.Solution` has ``stats["compiled"] = False`` and the reason in
    ``stats["compile_error"]``). The result is the eager conjugate gradient's: correct, only slower.

    Example:
        >>> from hypergrad import CompileFallbackWarning
        >>> issubclass(CompileFallbackWarning, UserWarning)
        True
    """


def _cg_steps(matvec: MatVec, b: TreeOrTensor, x0: Optional[TreeOrTensor], steps: int) -> tuple[Any, Tensor, Tensor]:
    """``steps`` CG steps from ``x0`` (``None``: zero): ``(x, ||r||^2, min Rayleigh quotient)``, no host sync.

    The same recursion as :class:`~hypergrad.solvers.CG` with ``rtol = atol = 0``: no step along a
    direction of non-positive curvature, the smallest Rayleigh quotient carried as a tensor.
    """
    if x0 is None:
        x, r = tree_zeros_like(b), b
    else:
        x, r = x0, tree_sub(b, matvec(x0))
    p = r
    rr = tree_vdot(r, r)
    pp = rr
    zero = torch.zeros_like(rr)
    min_curv = torch.full_like(rr, float("inf"))
    for _ in range(steps):
        ap = matvec(p)
        pap = tree_vdot(p, ap)
        min_curv = torch.fmin(min_curv, pap / pp)
        alpha = torch.where(pap > 0, rr / pap, zero)
        x = tree_axpy(alpha, p, x)
        r = tree_axpy(-alpha, ap, r)
        rr_new = tree_vdot(r, r)
        beta = torch.where(rr > 0, rr_new / rr, zero)
        p = tree_axpy(beta, p, r)
        pp = rr_new + beta * beta * pp
        rr = rr_new
    return x, rr, min_curv


# One compiled loop per (backend, mode): dynamo caches its graphs per operator and budget on it.
_COMPILED: dict[tuple[str, Optional[str]], Callable[..., Any]] = {}
# Settings x kind of operator whose compilation failed once -> the error (warned once, then eager).
_FAILED: dict[tuple[Any, ...], str] = {}


def _compiled_loop(backend: str, mode: Optional[str]) -> Callable[..., Any]:
    key = (backend, mode)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_cg_steps, backend=backend, mode=mode, fullgraph=True, dynamic=False)
    return _COMPILED[key]


def _operator_kind(matvec: Any) -> tuple[Any, ...]:
    """What identifies "the same kind of operator" for remembering a failed compilation."""
    fn = getattr(matvec, "wrapped", matvec)  # the solver entry point wraps the user's matvec
    return (type(fn), getattr(fn, "__code__", None), getattr(fn, "mode", None))


@dataclass(frozen=True)
class CompiledCG(AbstractLinearSolver):
    r"""Conjugate gradient for a fixed budget of ``max_steps``, the whole loop one ``torch.compile`` graph.

    Runs exactly ``max_steps`` steps of :class:`~hypergrad.solvers.CG` (no tolerance, no early
    exit) inside one compiled region, matvecs included, so the compiler sees the HVPs and the
    vector updates together and the host never waits on the device inside the loop:

    .. math::

        r_0 = b - A x_0,\ p_0 = r_0;\quad
        \alpha_k = \frac{r_k^\top r_k}{p_k^\top A p_k},\
        x_{k+1} = x_k + \alpha_k p_k,\ r_{k+1} = r_k - \alpha_k A p_k,\
        p_{k+1} = r_{k+1} + \frac{r_{k+1}^\top r_{k+1}}{r_k^\top r_k} p_k ,
        \quad k = 0, \dots, K - 1 .

    The status is decided once, after the loop, from :math:`\|r_K\|` and the smallest Rayleigh
    quotient :math:`\min_k p_k^\top A p_k / \|p_k\|^2` (one host sync): a non-finite residual is
    :attr:`Status.NONFINITE`, non-positive curvature :attr:`Status.NEGATIVE_CURVATURE` (such a
    direction is never stepped along), otherwise :attr:`Status.FIXED_BUDGET`, or with
    ``budget_rtol > 0`` :attr:`Status.SUCCESS` / :attr:`Status.MAX_STEPS_REACHED` judged on
    :math:`\|r_K\| \le \text{budget\_rtol}\, \|b\|`. ``stats["compiled"]`` says whether the
    compiled loop ran.

    The matvec must be traceable by dynamo without a graph break, e.g. a ``torch.func`` closure
    ``lambda v: jvp(grad(f), (theta,), (v,))[1]`` or a :class:`hypergrad.HessianOperator` in mode
    ``"fwd_rev"`` (``fullgraph=True``: a graph break is a compilation failure, not a silent split).
    The loop is unrolled, so compilation time grows with ``max_steps``; it is paid on the first
    solve for a given operator kind, shapes and budget (dynamo's cache serves the later ones).
    **Fallback**: when compilation raises (a graph break, an unsupported operation, no C++
    compiler for inductor), the same loop runs eagerly, a :class:`CompileFallbackWarning` with the
    error is issued once, and later solves of that kind run eagerly without retrying. A compiler
    that crashes the process instead of raising cannot be caught: with torch 2.14.1 on the CPU the
    inductor-compiled second derivatives of a small ResNet with BatchNorm aborted with a heap
    corruption unless ``torch._inductor.config.layout_optimization = False``
    (``docs/benchmarks.md``). Dynamo's recompile limit applies (8 shapes/budgets per process by
    default); past it the compilation fails and the fallback above takes over.

    Args:
        max_steps: the fixed budget :math:`K` (>= 1): matvecs per solve (one more with ``x0``).
        backend: the ``torch.compile`` backend, one of ``"inductor"`` (generated kernels),
            ``"aot_eager"`` or ``"eager"`` (tracing only: checks the loop is one graph).
        mode: the ``torch.compile`` mode (``None``, ``"default"``, ``"reduce-overhead"``,
            ``"max-autotune"``, ...), passed through.

    Returns:
        A :class:`~hypergrad.solvers.Solution` (``residual_norm`` is CG's recursive residual).

    Example:
        >>> import torch
        >>> from hypergrad import CompiledCG
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.ones(2, dtype=torch.float64)
        >>> sol = CompiledCG(max_steps=2, backend="eager", budget_rtol=1e-10)(lambda v: A @ v, b)
        >>> sol.status.value, sol.num_matvecs, sol.stats["compiled"]
        ('success', 2, True)
        >>> torch.allclose(sol.x, torch.linalg.solve(A, b))
        True

    References:
        Hestenes & Stiefel (1952), Methods of conjugate gradients for solving linear systems.
        Ansel et al. (ASPLOS 2024), PyTorch 2: faster machine learning through dynamic Python
        bytecode transformation and graph compilation.
    """

    max_steps: int = 10
    backend: str = "inductor"
    mode: Optional[str] = None

    symmetric_only = True

    def __post_init__(self) -> None:
        check_int("max_steps", self.max_steps, owner="CompiledCG")
        if self.backend not in _BACKENDS:
            raise ValueError(
                f"CompiledCG: `backend` must be one of {_BACKENDS}, got {self.backend!r}. Use 'inductor' for speed, "
                "'eager' to check that the loop traces as one graph."
            )
        if self.mode is not None and not isinstance(self.mode, str):
            raise TypeError(
                f"CompiledCG: `mode` must be None or a torch.compile mode string such as 'reduce-overhead', "
                f"got {type(self.mode).__name__}."
            )

    def _solve(self, matvec: MatVec, b: TreeOrTensor, x0: TreeOrTensor | None) -> Solution:
        refuse_nonsymmetric("CompiledCG", matvec, "Use FixedPoint, Neumann or Dense.")
        key = (self.backend, self.mode, *_operator_kind(matvec))
        error = _FAILED.get(key)
        if error is None:
            try:
                x, rr, min_curv = _compiled_loop(self.backend, self.mode)(matvec, b, x0, self.max_steps)
            except Exception as err:  # any compiler failure: run eagerly below, then warn once
                error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        if error is not None:
            # A genuine error of the matvec or of the inputs raises here, before any warning.
            x, rr, min_curv = _cg_steps(matvec, b, x0, self.max_steps)
            if key not in _FAILED:
                _FAILED[key] = error
                warnings.warn(
                    f"CompiledCG: torch.compile(backend={self.backend!r}, mode={self.mode!r}) failed for this "
                    f"matvec ({type(getattr(matvec, 'wrapped', matvec)).__name__}), so the loop ran eagerly "
                    f"(same result, not faster); later solves with it run eagerly. Reason: {error}. A matvec "
                    "built on torch.func (e.g. HessianOperator(mode='fwd_rev')) traces without graph breaks.",
                    CompileFallbackWarning,
                    stacklevel=3,
                )
        res_sq, mc = torch.stack([rr.detach(), min_curv.detach()]).tolist()  # the one host sync
        res = res_sq**0.5 if res_sq >= 0 else float("nan")
        status = curvature_final_status(res, mc, Status.FIXED_BUDGET, check=False)
        num_matvecs = self.max_steps + (0 if x0 is None else 1)
        stats = {"min_curvature": mc, "compiled": error is None}
        if error is not None:
            stats["compile_error"] = error
        return Solution(x, status, self.max_steps, num_matvecs, res, stats)
