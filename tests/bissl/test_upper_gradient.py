"""The BiSSL upper-level gradient against dense float64 references.

g_D = lam_e (H + lam_e I)^-1 grad_{theta_P} L_D + gamma grad_{theta_D} L_D, with H the dense
torch.func.hessian of the pretext loss w.r.t. the flattened lower backbone and lam_e = lam + damping.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hypergrad
from applications.bissl.bilevel import (
    ImplicitJacobian,
    PretextNet,
    downstream_grads,
    exact_norm_layers,
    make_pretext_loss,
    proximal_penalty,
)
from applications.bissl.losses import BYOLLoss, NTXentLoss


def _nets(byol: bool = False):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    projector = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    predictor = nn.Sequential(nn.Linear(4, 4)).double() if byol else None
    lower = PretextNet(backbone, projector, predictor)
    upper = copy.deepcopy(backbone)
    with torch.no_grad():
        for p in upper.parameters():
            p.add_(0.3 * torch.randn_like(p))
    head = nn.Linear(3, 3).double()
    return lower, upper, head


def _batch(n: int = 12):
    x1 = torch.randn(n, 4, dtype=torch.float64)
    return x1, x1 + 0.3 * torch.randn_like(x1)


def _dense(loss, params: dict):
    flat, unravel = hypergrad.tree_ravel(params)
    H = torch.func.hessian(lambda v: loss(unravel(v)))(flat)
    return H, flat, unravel


def _textbook_cg(A: torch.Tensor, b: torch.Tensor, steps: int, x0: torch.Tensor | None = None) -> torch.Tensor:
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - A @ x
    p = r.clone()
    for _ in range(steps):
        ap = A @ p
        alpha = (r @ r) / (p @ ap)
        x = x + alpha * p
        r_new = r - alpha * ap
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    return x


def _setup(kind: str):
    lower, upper, head = _nets(byol=kind == "byol")
    x1, x2 = _batch()
    target = None
    if kind == "byol":
        tnet = copy.deepcopy(lower)
        with torch.no_grad():
            target = (tnet(x1)[0] + 0.1, tnet(x2)[0] - 0.1)
    loss_fn = NTXentLoss(temperature=0.5, gather=False) if kind == "simclr" else BYOLLoss()
    loss = make_pretext_loss(lower, kind, loss_fn, x1, x2, target)
    theta_p = {k: v.detach() for k, v in lower.backbone.named_parameters()}
    xd = torch.randn(10, 4, dtype=torch.float64)
    yd = torch.randint(0, 3, (10,))
    return lower, upper, head, loss, theta_p, xd, yd


@pytest.mark.parametrize("kind", ["simclr", "byol"])
@pytest.mark.parametrize("lam,damping", [(1e-3, 10.0), (0.05, 4.0)])
@pytest.mark.parametrize("solver", [hypergrad.Dense(), hypergrad.CG(max_steps=300, rtol=1e-13)], ids=["dense", "cg"])
@pytest.mark.parametrize("reuse", [False, True], ids=["fresh", "reuse"])
def test_upper_gradient_matches_dense_formula(kind, lam, damping, solver, reuse):
    gamma = 0.7
    lower, upper, head, loss, theta_p, xd, yd = _setup(kind)
    g_low, g_up, g_head, _, _ = downstream_grads(lower.backbone, upper, head, xd, yd, gamma)
    lam_eff = lam + damping
    ij = ImplicitJacobian(loss, theta_p, lam_eff=lam_eff, solver=solver, reuse_operator=reuse)
    x, sol = ij.apply(g_low)
    assert not sol.failed
    got = hypergrad.tree_ravel({k: x[k] + g_up[k] for k in x})[0]

    H, _, _ = _dense(loss, theta_p)
    assert torch.allclose(H, H.T, atol=1e-10)
    g = hypergrad.tree_ravel(g_low)[0]
    gd = hypergrad.tree_ravel(g_up)[0]  # already gamma * grad L_D(theta_D)
    n = H.shape[0]
    expected = lam_eff * torch.linalg.solve(H + lam_eff * torch.eye(n, dtype=H.dtype), g) + gd
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
    # The Hessian term matters here: dropping it (H = 0) gives a measurably different gradient.
    assert (g + gd - expected).norm() > 1e-4 * expected.norm()


@pytest.mark.parametrize("reuse", [False, True], ids=["fresh", "reuse"])
def test_default_five_step_cg_matches_textbook_cg(reuse):
    lower, upper, head, loss, theta_p, xd, yd = _setup("simclr")
    g_low = downstream_grads(lower.backbone, upper, head, xd, yd, 1.0)[0]
    lam_eff = 1e-3 + 4.0  # H has eigenvalues down to -3.49 here: SPD, yet far from identity
    H, _, unravel = _dense(loss, theta_p)
    A = torch.eye(H.shape[0], dtype=H.dtype) + H / lam_eff
    g = hypergrad.tree_ravel(g_low)[0]
    ij = ImplicitJacobian(loss, theta_p, lam_eff=lam_eff, solver=hypergrad.CG(max_steps=5), reuse_operator=reuse,
                          warm_start=True)
    x, sol = ij.apply(g_low)
    assert sol.num_matvecs == 5
    x_ref = _textbook_cg(A, g, 5)
    torch.testing.assert_close(hypergrad.tree_ravel(x)[0], x_ref, rtol=1e-8, atol=1e-12)
    exact = torch.linalg.solve(A, g)
    assert (x_ref - exact).norm() > 1e-6 * exact.norm()  # 5 steps really are a truncated solve
    # Warm start: the next right-hand side starts from the previous solution (same matrix).
    g2 = 0.5 * g + 0.01 * torch.randn_like(g)
    x2, sol2 = ij.apply(unravel(g2))
    assert sol2.num_matvecs == 6  # one for the initial residual
    torch.testing.assert_close(hypergrad.tree_ravel(x2)[0], _textbook_cg(A, g2, 5, x0=x_ref), rtol=1e-8, atol=1e-12)


def test_downstream_grads_are_the_ordinary_gradients():
    lower, upper, head, _, theta_p, xd, yd = _setup("simclr")
    gamma = 0.3
    g_low, g_up, g_head, l_low, l_up = downstream_grads(lower.backbone, upper, head, xd, yd, gamma)
    f_low = hypergrad.stateless(lower.backbone)
    f_up = hypergrad.stateless(upper)
    ce = torch.nn.functional.cross_entropy
    hp = dict(head.named_parameters())
    hf = hypergrad.stateless(head)
    up = {k: v.detach() for k, v in upper.named_parameters()}
    ref_low = torch.func.grad(lambda p: ce(head(f_low(p, xd)), yd))(theta_p)
    ref_up = torch.func.grad(lambda p: gamma * ce(head(f_up(p, xd)), yd))(up)
    ref_head = torch.func.grad(lambda h: ce(hf(h, f_low(theta_p, xd)), yd) + gamma * ce(hf(h, f_up(up, xd)), yd))(
        {k: v.detach() for k, v in hp.items()})
    for got, ref in ((g_low, ref_low), (g_up, ref_up), (g_head, ref_head)):
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12)
    # The lower backbone's running statistics were not touched by the downstream pass.
    assert int(lower.backbone[1].num_batches_tracked) == 0


def test_proximal_term_touches_backbone_only():
    lower, upper, _, _, _, _, _ = _setup("simclr")
    x1, x2 = _batch()
    loss_fn = NTXentLoss(temperature=0.5, gather=False)

    def grads(lam: float) -> dict:
        lower.zero_grad(set_to_none=True)
        z1, z2 = lower(x1)[0], lower(x2)[0]
        (loss_fn(z1, z2) + proximal_penalty(lower.backbone, upper, lam)).backward()
        for p in upper.parameters():
            assert p.grad is None  # theta_D is a constant of the lower problem
        return {k: p.grad.clone() for k, p in lower.named_parameters()}

    lower.eval()  # BatchNorm in eval mode: both passes see the same function
    g0, g1 = grads(0.0), grads(0.5)
    up = dict(upper.named_parameters())
    for k in g0:
        if k.startswith("backbone."):
            diff = 0.5 * (dict(lower.named_parameters())[k] - up[k[len("backbone."):]]).detach()
            torch.testing.assert_close(g1[k] - g0[k], diff, rtol=1e-10, atol=1e-12)
            assert diff.abs().max() > 0
        else:
            torch.testing.assert_close(g1[k], g0[k], rtol=0, atol=0)  # projector unaffected


def test_exact_norm_layers_hvp_matches_double_backward():
    """torch.func HVPs through BatchNorm (training mode) must equal classic double backward."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 2)).double()
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    params = {k: v.detach() for k, v in net.named_parameters()}
    v = {k: torch.randn_like(p) for k, p in params.items()}
    f = hypergrad.stateless(net)

    def loss(p):
        with exact_norm_layers(net):
            return torch.tanh(f(p, x)).pow(2).sum()

    got = hypergrad.hvp(loss, params, v)
    leaves = [p.clone().requires_grad_(True) for p in params.values()]
    out = torch.tanh(torch.func.functional_call(net, dict(zip(params, leaves)), (x,))).pow(2).sum()
    g = torch.autograd.grad(out, leaves, create_graph=True)
    ref = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v.values())), leaves)
    for k, r in zip(params, ref):
        torch.testing.assert_close(got[k], r, rtol=1e-9, atol=1e-11)
