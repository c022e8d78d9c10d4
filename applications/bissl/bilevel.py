r"""The BiSSL bilevel objectives and the upper-level gradient, on the public hypergrad API.

Notation (BISSL.md): :math:`\theta_P` lower (pretext) backbone, :math:`\theta_D` upper (downstream)
backbone, :math:`\phi` downstream head, :math:`L_P` pretext loss, :math:`L_D` downstream loss.

Lower level (backbone *and* projector/predictor trained, proximal term on the backbone only):

.. math:: \min_{\theta_P}\; L_P(\theta_P) + \frac{\lambda}{2}\|\theta_P - \theta_D\|^2 .

Upper level: :math:`\min_{\theta_D,\phi}\; L_D(\theta_P^*(\theta_D), \phi) + \gamma L_D(\theta_D, \phi)`,
whose backbone gradient is, with :math:`H = \nabla^2_{\theta_P} L_P` and
:math:`\lambda_e = \lambda + \text{damping}`,

.. math::

    g_{\theta_D} = \lambda_e (H + \lambda_e I)^{-1}\, \nabla_{\theta_P} L_D(\theta_P, \phi)
                   + \gamma\, \nabla_{\theta_D} L_D(\theta_D, \phi),

i.e. :math:`x` solving :math:`(I + H/\lambda_e)\,x = \nabla_{\theta_P} L_D` plus the direct term.
:class:`ImplicitJacobian` owns that solve for one alternation: ``reuse_operator`` keeps the pretext
gradient graph (``HessianOperator(mode="rev_rev_cached")``) for all upper steps of the alternation,
``warm_start`` starts each solve from the previous one's solution (the matrix is the same; only the
right-hand side changes), and ``reduce`` averages Hessian-vector products over DDP ranks.
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hypergrad import (
    AbstractLinearSolver,
    HessianOperator,
    Solution,
    Status,
    TensorTree,
    proximal_grad,
    stateless,
    tree_axpy,
)

__all__ = [
    "PretextNet",
    "make_pretext_loss",
    "proximal_penalty",
    "downstream_grads",
    "ImplicitJacobian",
    "exact_norm_layers",
]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _batch_stats_bn(self: nn.Module, x: Tensor) -> Tensor:
    if not (self.training or self.running_mean is None):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + self.eps)
    if self.weight is not None:
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
    return y


@contextlib.contextmanager
def exact_norm_layers(module: nn.Module) -> Iterator[nn.Module]:
    r"""Inside the block, BatchNorm layers normalise with an explicit batch-statistics formula.

    With torch 2.15 the second derivatives that ``torch.func`` (``jvp``/``vjp`` of ``grad``)
    produces through ``F.batch_norm`` in training mode are wrong (off by O(1); classic
    double-backward and first derivatives are right), and every hypergrad HVP mode except
    ``finite_diff`` goes through ``torch.func``. The formula
    :math:`(x - \mu_B)/\sqrt{\sigma_B^2 + \epsilon}\,w + b` is the same function, written with
    elementwise ops whose second derivatives are right. Running statistics are neither read
    (in training mode) nor written.

    Example:
        >>> bn = nn.BatchNorm1d(3)
        >>> x = torch.randn(8, 3)
        >>> with exact_norm_layers(bn):
        ...     y = bn(x)
        >>> torch.allclose(y, F.batch_norm(x, None, None, bn.weight, bn.bias, True), atol=1e-5), int(bn.num_batches_tracked)
        (True, 0)
    """
    patched = [m for m in module.modules() if isinstance(m, _BN_TYPES)]
    for m in patched:
        m.forward = types.MethodType(_batch_stats_bn, m)
    try:
        yield module
    finally:
        for m in patched:
            del m.forward


class PretextNet(nn.Module):
    """Backbone + projector (+ BYOL predictor): ``x -> (z, p)`` with ``p = predictor(z)`` or ``None``.

    Args:
        backbone: maps ``(B, C, H, W)`` images to ``(B, D)`` features.
        projector: ``(B, D) -> (B, K)``.
        predictor: BYOL's ``(B, K) -> (B, K)``, or ``None`` for SimCLR.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None = None):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        z = self.projector(self.backbone(x))
        return z, (self.predictor(z) if self.predictor is not None else None)


def pretext_objective(
    kind: str, loss_fn: Callable[..., Tensor], out1: tuple, out2: tuple, target: tuple[Tensor, Tensor] | None
) -> Tensor:
    """:math:`L_P` from the two views' ``(z, p)``; BYOL needs the target projections ``(t1, t2)``."""
    if kind == "simclr":
        return loss_fn(out1[0], out2[0])
    if target is None:
        raise ValueError("BYOL needs the target network's projections of both views (`target`).")
    return loss_fn(out1[1], out2[1], target[0], target[1])


def make_pretext_loss(
    net: PretextNet,
    kind: str,
    loss_fn: Callable[..., Tensor],
    x1: Tensor,
    x2: Tensor,
    target: tuple[Tensor, Tensor] | None = None,
) -> Callable[[TensorTree], Tensor]:
    r"""A pure ``f(backbone_params) -> L_P`` on one fixed two-view batch, for Hessian products.

    The projector/predictor enter as constants (the Hessian is w.r.t. the backbone only).
    BatchNorm layers normalise with batch statistics and their running statistics are never
    touched (``hypergrad.stateless``), and they run through :func:`exact_norm_layers` so that the
    Hessian is right; BYOL's target projections are computed once, outside.

    Args:
        net: the lower :class:`PretextNet`.
        kind: ``"simclr"`` or ``"byol"``.
        loss_fn: ``NTXentLoss`` / ``BYOLLoss`` instance.
        x1, x2: the two views, ``(B, C, H, W)``.
        target: BYOL target projections of ``x1`` and ``x2``.
    """
    f = stateless(net)

    def loss(params: TensorTree) -> Tensor:
        full = {"backbone." + k: v for k, v in params.items()}
        with exact_norm_layers(net):
            return pretext_objective(kind, loss_fn, f(full, x1), f(full, x2), target)

    return loss


def proximal_penalty(lower: nn.Module, upper: nn.Module, lam: float) -> Tensor:
    r""":math:`\frac{\lambda}{2}\|\theta_P - \theta_D\|^2` over the *backbone* parameters only.

    ``upper`` (:math:`\theta_D`) is held constant (detached); gradients flow into ``lower`` only.

    Example:
        >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
        >>> float(proximal_penalty(a, a, 0.1))
        0.0
    """
    up = dict(upper.named_parameters())
    total = torch.zeros((), device=next(lower.parameters()).device)
    for k, p in lower.named_parameters():
        total = total + (p - up[k].detach()).pow(2).sum()
    return 0.5 * lam * total


def downstream_grads(
    lower: nn.Module, upper: nn.Module, head: nn.Module, x: Tensor, y: Tensor, gamma: float
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], Tensor, Tensor]:
    r"""Ordinary gradients of the upper objective :math:`L_D(\theta_P, \phi) + \gamma L_D(\theta_D, \phi)`.

    The lower backbone runs statelessly (its BatchNorm running statistics are not updated by
    downstream data); the upper backbone runs as a module in its current mode.

    Returns:
        ``(g_lower, g_upper, g_head, loss_lower, loss_upper)``: :math:`\nabla_{\theta_P} L_D(\theta_P,\phi)`,
        :math:`\gamma\nabla_{\theta_D} L_D(\theta_D,\phi)`, the head gradient of the sum, and both losses.
    """
    lp = {k: v.detach().requires_grad_(True) for k, v in lower.named_parameters()}
    loss_l = F.cross_entropy(head(stateless(lower)(lp, x)), y)
    loss_u = F.cross_entropy(head(upper(x)), y)
    up = dict(upper.named_parameters())
    hp = dict(head.named_parameters())
    grads = torch.autograd.grad(loss_l + gamma * loss_u, [*lp.values(), *up.values(), *hp.values()], allow_unused=True)
    n1, n2 = len(lp), len(lp) + len(up)
    fill = lambda g, p: torch.zeros_like(p) if g is None else g  # noqa: E731
    g_lower = {k: fill(g, lp[k]) for k, g in zip(lp, grads[:n1])}
    g_upper = {k: fill(g, up[k]) for k, g in zip(up, grads[n1:n2])}
    g_head = {k: fill(g, hp[k]) for k, g in zip(hp, grads[n2:])}
    return g_lower, g_upper, g_head, loss_l.detach(), loss_u.detach()


class ImplicitJacobian:
    r"""Applies :math:`\lambda_e (H + \lambda_e I)^{-1}` to right-hand sides for one alternation.

    Solves :math:`(I + H/\lambda_e)\,x = g` with ``solver``, where :math:`H` is the Hessian of
    ``pretext_loss`` at ``params`` (fixed for the alternation).

    Args:
        pretext_loss: ``f(backbone_params) -> scalar`` (:func:`make_pretext_loss`).
        params: the lower backbone :math:`\theta_P` (detached dict).
        lam_eff: :math:`\lambda + \text{damping} > 0`.
        solver: a hypergrad solver, e.g. ``CG(max_steps=5)``.
        reuse_operator: build the gradient graph once and reuse it for every HVP of every solve
            (one backward pass per HVP); otherwise each solve calls ``hypergrad.proximal_grad``,
            which re-runs the forward pass per HVP.
        warm_start: start each solve from the previous solution.
        hvp_mode: HVP mode when ``reuse_operator`` is off.
        reduce: applied to every HVP (e.g. an all-reduce mean across DDP ranks), or ``None``.

    Example:
        >>> import torch, hypergrad
        >>> L = lambda p: 1.5 * (p["w"] ** 2).sum()  # H = 3 I
        >>> ij = ImplicitJacobian(L, {"w": torch.zeros(2)}, lam_eff=1.0, solver=hypergrad.Dense())
        >>> x, sol = ij.apply({"w": torch.ones(2)})
        >>> x["w"]
        tensor([0.2500, 0.2500])
    """

    def __init__(
        self,
        pretext_loss: Callable[[TensorTree], Tensor],
        params: dict[str, Tensor],
        *,
        lam_eff: float,
        solver: AbstractLinearSolver,
        reuse_operator: bool = False,
        warm_start: bool = False,
        hvp_mode: str = "auto",
        reduce: Callable[[TensorTree], TensorTree] | None = None,
    ):
        if not lam_eff > 0:
            raise ValueError(f"`lam_eff` (lam + damping) must be > 0, got {lam_eff!r}.")
        self.loss, self.params, self.lam_eff, self.solver = pretext_loss, params, float(lam_eff), solver
        self.warm_start, self.reduce, self.hvp_mode = warm_start, reduce, hvp_mode
        self.reuse = reuse_operator or reduce is not None
        mode = "rev_rev_cached" if reuse_operator else hvp_mode
        self.operator = HessianOperator(pretext_loss, params, mode=mode) if self.reuse else None
        self.x_prev: TensorTree | None = None
        self.num_hvps = 0
        self.num_fallbacks = 0

    def _matvec(self, v: TensorTree) -> TensorTree:
        hv = self.operator(v)
        if self.reduce is not None:
            hv = self.reduce(hv)
        return tree_axpy(1.0 / self.lam_eff, hv, v)

    def apply(self, g: dict[str, Tensor]) -> tuple[dict[str, Tensor], Solution]:
        """Return ``x`` with :math:`(I + H/\\lambda_e) x = g` and the solver's Solution."""
        x0 = self.x_prev if self.warm_start else None
        if self.reuse:
            sol = self.solver(self._matvec, g, x0)
        else:
            sol = proximal_grad(self.loss, self.params, g, lam=self.lam_eff, solver=self.solver,
                                hvp_mode=self.hvp_mode, x0=x0).solution
        self.num_hvps += sol.num_matvecs
        x = dict(sol.x)
        if sol.status is Status.NONFINITE:  # never step along NaNs: fall back to H = 0 (x = g)
            self.num_fallbacks += 1
            x = {k: v.clone() for k, v in g.items()}
        self.x_prev = x
        return x, sol
