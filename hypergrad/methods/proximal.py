"""Proximal coupling between the levels (BiSSL, iMAML): no mixed second derivative."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

from .._assembly import proximal_assembly
from .._checks import check_invertible
from .._typing import TensorTree
from ..operators import HVPMode
from ..solvers import CG, AbstractLinearSolver
from ._base import FailurePolicy, MethodOutput, PureLoss, _independent, _LinearSolveMethod, reduced_outer_grads

__all__ = ["Proximal"]


@dataclass(frozen=True)
class Proximal(_LinearSolveMethod):
    r"""Proximal coupling (BiSSL, iMAML): the inner level is tied to outer parameters by a penalty.

    The inner step minimises :math:`L(\theta) + \frac{\lambda}{2}\sum_{c}\|\theta_c - \omega_c\|^2`
    (the method adds the penalty itself; ``inner_loss`` returns :math:`L`). The outer gradient of a
    coupled outer parameter :math:`\omega_c` is

    .. math::

        \nabla_{\omega} F = x + \partial_{\omega} F,\qquad
        \Big(I + \frac{H_{cc}}{\lambda + d}\Big) x = \nabla_{\theta_c} F,

    where :math:`H_{cc}` is the Hessian of :math:`L` (on the Hessian batch) over the coupled inner
    parameters only, the other inner parameters (a projector head, say) held fixed; uncoupled outer
    parameters get their direct partial :math:`\partial F`. :math:`d` is extra damping (BiSSL uses
    :math:`d = 10`). Equivalent to :func:`hypergrad.proximal_grad` with ``lam = lam + damping``.
    ``inner_loss`` must depend on the outer parameters only through the coupling (checked once).

    Args:
        lam: proximal strength :math:`\lambda > 0` of the inner penalty.
        coupling: ``{inner_name: outer_name}``; names are parameter names of the inner / outer
            modules, or module prefixes (``{"backbone": "backbone"}`` couples every parameter
            below them, matched by their remaining names; ``{"": ""}`` couples everything).
        solver: e.g. ``CG(max_steps=5)``.
        damping: :math:`d \ge 0`, added to :math:`\lambda` in the linear system only.
        hvp_mode, warm_start, reuse_operator, on_failure: as in :class:`Implicit`; here the
            Hessian does not depend on the outer parameters, so a reused operator survives outer
            steps and is rebuilt only when the inner parameters or the Hessian batch change.

    Example:
        >>> import hypergrad
        >>> m = hypergrad.Proximal(lam=1e-3, damping=10.0, coupling={"backbone": "backbone"})
        >>> m.lam + m.damping
        10.001

    References:
        Rajeswaran et al. (NeurIPS 2019), Meta-learning with implicit gradients (iMAML).
        Zakarias et al. (2024), BiSSL: bilevel optimization for self-supervised pre-training and fine-tuning.
    """

    lam: float = 1.0
    coupling: Mapping[str, str] = field(default_factory=dict)
    solver: AbstractLinearSolver = field(default_factory=lambda: CG(max_steps=5))
    damping: float = 0.0
    hvp_mode: HVPMode = "auto"
    warm_start: bool = False
    reuse_operator: bool = False
    on_failure: FailurePolicy = "warn"

    hessian_depends_on_outer = False

    def __post_init__(self) -> None:
        check_invertible("lam", self.lam, owner="Proximal")
        if not isinstance(self.coupling, Mapping):
            raise TypeError(
                f"Proximal: `coupling` must be a dict {{inner_name: outer_name}}, got {type(self.coupling).__name__} "
                f"{self.coupling!r}; e.g. coupling={{'backbone': 'backbone'}} (exact names or module prefixes) or "
                "{'': ''} to couple all parameters by name."
            )
        if not self.coupling:
            raise ValueError(
                f"Proximal: `coupling` must be a non-empty dict {{inner_name: outer_name}}, got {self.coupling!r}; "
                "e.g. coupling={'backbone': 'backbone'} or {'': ''} to couple all parameters by name."
            )
        for k, v in self.coupling.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"Proximal: `coupling` keys and values must be strings, got {k!r}: {v!r}.")
        self._check_settings("Proximal")

    def pairs(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> dict[str, str]:
        """Resolve :attr:`coupling` to ``{inner_param: outer_param}`` (exact names or prefixes).

        Args:
            params: the inner level's trained parameters, ``{name: tensor}``.
            hparams: the outer level's trained parameters.

        Returns:
            ``{inner_name: outer_name}`` for every coupled pair.

        Raises:
            ValueError: a key matches no inner parameter, a target is not an outer parameter, or
                the shapes of a pair differ.

        Example:
            >>> import torch, hypergrad
            >>> m = hypergrad.Proximal(coupling={"backbone": "net"})
            >>> inner = {"backbone.w": torch.zeros(2), "head.w": torch.zeros(1)}
            >>> m.pairs(inner, {"net.w": torch.zeros(2)})
            {'backbone.w': 'net.w'}
        """
        out: dict[str, str] = {}
        for src, dst in self.coupling.items():
            if src in params:
                matches = {src: dst}
            else:
                pre_s, pre_d = (src + ".") if src else "", (dst + ".") if dst else ""
                matches = {k: pre_d + k[len(pre_s) :] for k in params if k.startswith(pre_s)}
            if not matches:
                raise ValueError(
                    f"Proximal: `coupling` key {src!r} names no trained inner parameter or module; "
                    f"trained inner parameters are {sorted(params)[:8]}{' ...' if len(params) > 8 else ''}."
                )
            for i, o in matches.items():
                if o not in hparams:
                    raise ValueError(
                        f"Proximal: `coupling` maps inner {i!r} to outer {o!r}, which is not a trained outer parameter."
                    )
                if params[i].shape != hparams[o].shape:
                    raise ValueError(
                        f"Proximal: `coupling` pairs inner {i!r} of shape {tuple(params[i].shape)} with outer "
                        f"{o!r} of shape {tuple(hparams[o].shape)}; coupled tensors must have equal shapes."
                    )
            out.update(matches)
        return out

    def check(self, params, hparams) -> None:
        self.pairs(params, hparams)

    def unreached(self, inner_fn, outer_fn, params, hparams) -> list[str]:
        """Outer keys neither coupled nor used by ``outer_fn`` (``inner_fn`` may not use outer keys at all)."""
        coupled = set(self.pairs(params, hparams).values())
        return [k for k in _independent("outer_loss", outer_fn, params, hparams, list(hparams)) if k not in coupled]

    def inner_penalty(self, params, hparams) -> Tensor:
        terms = [((params[i] - hparams[o].detach()) ** 2).sum() for i, o in self.pairs(params, hparams).items()]
        return 0.5 * self.lam * torch.stack(terms).sum()

    def hypergradient(self, inner_fn, outer_fn, params, hparams, state, reduce, operator_key) -> MethodOutput:
        pairs = self.pairs(params, hparams)
        frozen_h = {k: v.detach() for k, v in hparams.items()}
        if not state.checked:
            _check_inner_ignores_outer(inner_fn, params, frozen_h)
            state.checked = True
        value, g_theta, g_lam = reduced_outer_grads(outer_fn, params, hparams, reduce)
        rest = {k: v.detach() for k, v in params.items() if k not in pairs}

        def lower(theta_c: TensorTree) -> Tensor:
            return inner_fn({**rest, **theta_c}, frozen_h)

        theta_c = {k: params[k].detach() for k in pairs}
        op, reused = self._operator(lower, theta_c, state, operator_key)
        rhs = {k: g_theta[k] for k in pairs}
        grad, solution = proximal_assembly(
            lower,
            theta_c,
            rhs,
            lam=self.lam + self.damping,
            solver=self.solver,
            hvp_mode=self.hvp_mode,
            rename=pairs,
            direct=dict(g_lam),
            operator=op,
            reduce=reduce,
            x0=self._x0(state, rhs),
            on_solution=self._on_solution(state, "proximal hypergradient"),
            memo=self._memo(state),
        )
        return MethodOutput(grad, value, solution, solution.num_matvecs, reused)


def _check_inner_ignores_outer(inner_fn: PureLoss, params: dict, hparams: dict) -> None:
    h = {k: v.detach().requires_grad_(True) for k, v in hparams.items()}
    with torch.enable_grad():
        value = inner_fn({k: v.detach() for k, v in params.items()}, h)
        if not value.requires_grad:
            return
        grads = torch.autograd.grad(value, list(h.values()), allow_unused=True)
    used = [k for k, g in zip(h, grads) if g is not None and bool(g.abs().sum() > 0)]
    if used:
        raise ValueError(
            f"Proximal: `inner_loss` depends on the outer parameters {used[:5]} directly, but the proximal "
            "method assumes the levels interact only through `coupling` (it skips the mixed second "
            "derivative). Use hypergrad.Implicit, or remove the outer parameters from inner_loss."
        )
