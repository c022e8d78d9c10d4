r"""The problem registry of the benchmarks: toy bilevel problems with exact hypergradients.

Each entry builds a :class:`ProblemCase` at the sizes of a preset ("small": seconds, used in CI;
"full": the committed report). A case holds everything a method needs (losses, the inner solution
:math:`\theta^*`, the hyper-parameters) and the exact answer to compare with, computed without
:mod:`hypergrad` (closed forms, or dense ``torch.linalg.solve``).

Two kinds of cases:

* ``kind="implicit"``: a :class:`~hypergrad.testing.ToyProblem`; the answer is
  :math:`\nabla_\lambda F` (``problem.exact_hypergradient``).
* ``kind="proximal"``: the BiSSL-shaped problem, :math:`G = L(\theta) + \frac{\lambda}{2}\|\theta -
  \omega\|^2` on a small ResNet with BatchNorm; the answer is
  :math:`\lambda (H + \lambda I)^{-1} g`, from the dense Hessian (``torch.func.hessian``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as nnf
from torch import Tensor

import hypergrad
from applications.toy import LogisticProblem, QuadraticProblem, RidgeProblem

from .models import SmallResNet

__all__ = [
    "ProblemCase",
    "PROBLEMS",
    "build_problem",
    "problem_names",
    "problem_kind",
    "PEER_PROBLEMS",
    "PROXIMAL_PROBLEMS",
]


@dataclass
class ProblemCase:
    """One benchmark problem with its exact hypergradient.

    Attributes:
        name: registry key.
        kind: ``"implicit"`` or ``"proximal"``.
        description: one line with the sizes, for the report.
        hparams: :math:`\\lambda` (implicit) - a dict of tensors.
        params: :math:`\\theta^*`, the inner solution (or the point of the proximal system).
        exact: the exact answer, keyed like ``hparams`` (implicit) or ``params`` (proximal).
        lambda_max, lambda_min: extreme eigenvalues of the inner Hessian (of :math:`I + H/\\lambda`
            for proximal cases); set the Neumann/gradient step ``1 / lambda_max``.
        problem: the toy problem (implicit cases), with ``inner_loss``, ``outer_loss``,
            ``inner_step``, ``init_params``.
        loss: proximal cases: :math:`L(\\theta)`; ``outer_grad``: :math:`g`; ``lam``: :math:`\\lambda`.
    """

    name: str
    kind: str
    description: str
    params: dict[str, Tensor]
    exact: dict[str, Tensor]
    lambda_max: float
    lambda_min: float
    hparams: dict[str, Tensor] = field(default_factory=dict)
    problem: Any = None
    loss: Callable[[dict[str, Tensor]], Tensor] | None = None
    outer_grad: dict[str, Tensor] | None = None
    lam: float = 1.0

    @property
    def num_params(self) -> int:
        """Size of the linear system."""
        return sum(p.numel() for p in self.params.values())

    @property
    def device(self) -> torch.device:
        """Where the case lives."""
        return next(iter(self.params.values())).device


def _toy_case(name: str, problem: Any, description: str) -> ProblemCase:
    hparams = problem.init_hparams()
    params = problem.inner_solution(hparams)
    lo, hi = problem.hessian_bounds(hparams)
    return ProblemCase(
        name,
        "implicit",
        description,
        params,
        problem.exact_hypergradient(hparams),
        hi,
        lo,
        hparams=hparams,
        problem=problem,
    )


_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "small": {
        "quadratic_k10": dict(dim=30, hdim=5, cond=10.0),
        "quadratic_k1000": dict(dim=30, hdim=5, cond=1000.0),
        "ridge": dict(n_train=60, n_val=30, dim=20),
        "logistic": dict(n_train=80, n_val=40, dim=10),
        "hyper_cleaning": dict(n_train=40, n_val=40),
        "bissl_resnet": dict(widths=(2,), hw=4, batch=4),
    },
    "full": {
        "quadratic_k10": dict(dim=500, hdim=50, cond=10.0),
        "quadratic_k1000": dict(dim=500, hdim=50, cond=1000.0),
        "ridge": dict(n_train=2000, n_val=1000, dim=500),
        "logistic": dict(n_train=1000, n_val=500, dim=100),
        "hyper_cleaning": dict(n_train=300, n_val=300),
        "bissl_resnet": dict(widths=(4, 8), hw=8, batch=8),
    },
}


def _quadratic(s: dict, device: str, dtype: torch.dtype) -> QuadraticProblem:
    return QuadraticProblem(dim=s["dim"], hdim=s["hdim"], cond=s["cond"], device=device, dtype=dtype)


def _build_quadratic(name: str, s: dict, device: str, dtype: torch.dtype) -> ProblemCase:
    return _toy_case(
        name,
        _quadratic(s, device, dtype),
        f"quadratic, dim {s['dim']}, {s['hdim']} hparams, condition number {s['cond']:g}",
    )


def _build_ridge(name: str, s: dict, device: str, dtype: torch.dtype) -> ProblemCase:
    prob = RidgeProblem(n_train=s["n_train"], n_val=s["n_val"], dim=s["dim"], device=device, dtype=dtype)
    return _toy_case(
        name,
        prob,
        f"ridge regression, {s['n_train']} x {s['dim']} train, {s['n_val']} val, log-strength hparam (closed form)",
    )


def _build_logistic(name: str, s: dict, device: str, dtype: torch.dtype) -> ProblemCase:
    prob = LogisticProblem(n_train=s["n_train"], n_val=s["n_val"], dim=s["dim"], device=device, dtype=dtype)
    return _toy_case(
        name,
        prob,
        f"logistic regression, per-feature L2, {s['n_train']} x {s['dim']} train (Newton + dense IFT reference)",
    )


def _build_hyper_cleaning(name: str, s: dict, device: str, dtype: torch.dtype) -> ProblemCase:
    # benchmarks.hyper_cleaning has the exact hypergradient; applications.toy.hyper_cleaning is the app.
    from .hyper_cleaning import HyperCleaningProblem

    prob = HyperCleaningProblem(n_train=s["n_train"], n_val=s["n_val"], device=device, dtype=dtype)
    return _toy_case(
        name,
        prob,
        f"data hyper-cleaning on sklearn digits, {s['n_train']} train labels (one weight each), {s['n_val']} val",
    )


def _dense_hessian(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Dense Hessian by double backward, one row per unit vector (plain ``torch.autograd``).

    Not ``torch.func.hessian``: on this BatchNorm network (batch statistics) its vmapped
    jacobians differ from double backward by about 2% in torch 2.15, while single HVPs agree.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        g = torch.autograd.grad(fn(x), x, create_graph=True)[0]
        rows = [
            torch.autograd.grad(g, x, e, retain_graph=True)[0]
            for e in torch.eye(len(x), dtype=x.dtype, device=x.device)
        ]
    hess = torch.stack(rows).detach()
    return 0.5 * (hess + hess.T)


def _build_bissl(name: str, s: dict, device: str, dtype: torch.dtype) -> ProblemCase:
    """Proximal system of a BiSSL upper step: backbone = small ResNet with BatchNorm (batch stats)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = SmallResNet(s["widths"]).to(device=device, dtype=dtype).train()
    x = torch.randn(s["batch"], 3, s["hw"], s["hw"], generator=gen, dtype=dtype).to(device)
    y = torch.randint(0, 10, (s["batch"],), generator=gen).to(device)
    x_up = torch.randn(s["batch"], 3, s["hw"], s["hw"], generator=gen, dtype=dtype).to(device)
    y_up = torch.randint(0, 10, (s["batch"],), generator=gen).to(device)
    f = hypergrad.stateless(net, buffers="batch_stats")
    params = hypergrad.module_params(net)

    def loss(p: dict[str, Tensor]) -> Tensor:  # the lower-level (downstream) loss L
        return nnf.cross_entropy(f(p, x), y)

    outer_grad = torch.func.grad(lambda p: nnf.cross_entropy(f(p, x_up), y_up))(params)
    flat, unravel = hypergrad.tree_ravel(params)
    hess = _dense_hessian(lambda v: loss(unravel(v)), flat)
    eig = torch.linalg.eigvalsh(hess)
    # lambda makes I + H / lambda positive definite with a moderate condition number.
    lam = float(2.0 * max(-float(eig[0]), 0.0) + 0.05 * float(eig[-1]))
    system = torch.eye(len(flat), dtype=dtype, device=device) + hess / lam
    g_flat = hypergrad.tree_ravel(outer_grad)[0]
    exact = unravel(torch.linalg.solve(system, g_flat))
    sys_eig = 1.0 + eig / lam
    n = len(flat)
    return ProblemCase(
        name,
        "proximal",
        f"BiSSL proximal system (I + H/lam) x = g on a ResNet with BatchNorm, "
        f"widths {s['widths']}, {n} params, batch {s['batch']}x3x{s['hw']}x{s['hw']}, "
        f"lam={lam:.3g}",
        params,
        exact,
        float(sys_eig[-1]),
        float(sys_eig[0]),
        loss=loss,
        outer_grad=outer_grad,
        lam=lam,
    )


PROBLEMS: dict[str, Callable[[str, dict, str, torch.dtype], ProblemCase]] = {
    "quadratic_k10": _build_quadratic,
    "quadratic_k1000": _build_quadratic,
    "ridge": _build_ridge,
    "logistic": _build_logistic,
    "hyper_cleaning": _build_hyper_cleaning,
    "bissl_resnet": _build_bissl,
}

#: Cases that are proximal systems (no inner step map); all others are implicit toy problems.
PROXIMAL_PROBLEMS: tuple[str, ...] = ("bissl_resnet",)

#: The problems on which peers are compared (the issue's "must show": quadratic and ridge).
PEER_PROBLEMS: tuple[str, ...] = ("quadratic_k10", "ridge")


def problem_names() -> list[str]:
    """Registry keys, in report order."""
    return list(PROBLEMS)


def problem_kind(name: str) -> str:
    """``"proximal"`` or ``"implicit"``, known without building the problem."""
    return "proximal" if name in PROXIMAL_PROBLEMS else "implicit"


def build_problem(
    name: str, preset: str = "small", device: str = "cpu", dtype: torch.dtype = torch.float64
) -> ProblemCase:
    """Build problem ``name`` at the sizes of ``preset`` on ``device`` (float64 by default)."""
    if name not in PROBLEMS:
        raise ValueError(f"build_problem: unknown problem {name!r}; choose one of {problem_names()}.")
    if preset not in _SIZES:
        raise ValueError(f"build_problem: unknown preset {preset!r}; choose 'small' or 'full'.")
    return PROBLEMS[name](name, _SIZES[preset][name], device, dtype)
