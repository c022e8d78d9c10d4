"""The UMM bilevel objective: alignment term, dR rising under an upper step, and the hypergradient vs dense IFT."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from applications.umm.config import get_preset
from applications.umm.model import build_model, split_backbone
from applications.umm.objectives import (
    build_problem,
    encode_early,
    inner_loss_fn,
    make_levels,
    neighbour_alignment,
    outer_loss_fn,
    views_dr,
)


def test_alignment_matches_numpy_kl_and_carries_gradient() -> None:
    e, h = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    got = neighbour_alignment(e, h, tau=0.2)

    def nb(x: np.ndarray) -> np.ndarray:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        s = np.exp(x @ x.T / 0.2)
        np.fill_diagonal(s, 0.0)
        return s / s.sum(1, keepdims=True)

    P, Q = nb(e.numpy()), nb(h.detach().numpy())
    off = ~np.eye(7, dtype=bool)
    ref = (P[off] * np.log(P[off] / Q[off])).sum() / 7
    assert abs(float(got) - ref) <= 1e-10
    got.backward()
    assert h.grad is not None and float(h.grad.abs().sum()) > 0  # the published term has no gradient at all
    assert float(neighbour_alignment(e, e.clone())) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="tau"):
        neighbour_alignment(e, h, tau=0.0)


def test_outer_objective_is_minus_dr() -> None:
    late, proj = nn.Sequential(nn.Linear(4, 5), nn.Tanh()), nn.Linear(5, 3)
    inner, outer = make_levels(late, proj)
    e1, e2 = torch.randn(6, 4), torch.randn(6, 4)
    F = outer_loss_fn(eps2=0.5, ssl_weight=0.0)(inner, outer, (e1, e2))
    assert torch.allclose(F, -views_dr(late(e1), late(e2), 0.5))


@pytest.mark.parametrize("first_order", [True, False])
def test_one_upper_step_increases_dr_on_a_fixed_batch(first_order: bool) -> None:
    cfg = get_preset("tiny")
    backbone, projector = build_model(cfg)
    early, late = split_backbone(backbone, 4)  # late = layer4 only: keeps the CG passes cheap
    for p in early.parameters():
        p.requires_grad_(False)
    inner, outer = make_levels(late, projector)  # theta_U = theta_L at the start
    problem = build_problem(
        inner, outer, lam=1.0, damping=100.0, cg_steps=1, align_weight=1.0, align_tau=0.1, eps2=0.5,
        upper_ssl_weight=0.0, first_order=first_order, upper_lr=1e-3, clip_norm=None,
    )  # fmt: skip
    x1, x2 = torch.randn(8, 1, 12, 12), torch.randn(8, 1, 12, 12)
    batch = encode_early(early, x1, x2)
    inner.train()
    outer.train()

    def dr() -> float:
        with torch.no_grad():
            return float(views_dr(outer["late"](batch[0]), outer["late"](batch[1]), 0.5))

    before = dr()
    rec = problem.hypergradient(batch, batch)
    problem.outer_step()
    assert rec.outer_loss == pytest.approx(-before, rel=1e-5)
    assert dr() > before + 1e-7


class _Host(nn.Module):
    def __init__(self, inner: nn.Module, outer: nn.Module, fn) -> None:
        super().__init__()
        self.inner, self.outer, self.fn = inner, outer, fn

    def forward(self, batch):
        return self.fn(self.inner, self.outer, batch)


def test_hypergradient_equals_dense_implicit_function_computation_float64() -> None:
    torch.manual_seed(1)
    lam, beta, mu, gamma = 4.0, 0.5, 0.3, 0.2
    late = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).double()
    proj = nn.Linear(3, 3).double().requires_grad_(False)  # fixed: every trained lower parameter is coupled
    inner, outer = make_levels(late, proj)
    with torch.no_grad():
        for p in outer.parameters():
            p.add_(0.3 * torch.randn_like(p))  # omega = theta_U away from theta_L
    B = 6
    lower_batch = (torch.randn(B, 4, dtype=torch.float64), torch.randn(B, 4, dtype=torch.float64))
    upper_batch = (torch.randn(B, 4, dtype=torch.float64), torch.randn(B, 4, dtype=torch.float64))
    G0 = inner_loss_fn(beta, tau=0.5)
    Fn = outer_loss_fn(eps2=0.5, ssl_weight=mu, gamma=gamma)
    gh, fh = _Host(inner, outer, G0), _Host(inner, outer, Fn)
    names = [f"late.{n}" for n, _ in late.named_parameters()]
    shapes = [p.shape for p in late.parameters()]
    sizes = [p.numel() for p in late.parameters()]

    def unflat(v, prefix):
        return {f"{prefix}.{n}": t.view(s) for n, t, s in zip(names, torch.split(v, sizes), shapes)}

    omega = torch.cat([p.detach().flatten() for p in outer["late"].parameters()])

    def G(theta, om):  # full lower objective
        return functional_call(gh, unflat(theta, "inner"), (lower_batch,)) + lam / 2 * ((theta - om) ** 2).sum()

    def Phi_inner(theta, om):
        return functional_call(fh, {**unflat(theta, "inner"), **unflat(om, "outer")}, (upper_batch,))

    def solve(om):  # Newton on the lower problem (strongly convex for this lam) to machine precision
        theta = om.clone()
        for _ in range(30):
            g = torch.autograd.functional.jacobian(lambda t: G(t, om), theta)
            if float(g.norm()) < 1e-12:
                break
            H = torch.autograd.functional.hessian(lambda t: G(t, om), theta, vectorize=True)
            theta = theta - torch.linalg.solve(H, g)
        assert float(g.norm()) < 1e-12
        return theta

    theta = solve(omega)
    with torch.no_grad():
        for p, v in zip(late.parameters(), torch.split(theta, sizes)):
            p.copy_(v.view(p.shape))
    # dense IFT: d theta*/d omega = lam (H0 + lam I)^-1, H0 = Hessian of the lower loss without the penalty
    H0 = torch.autograd.functional.hessian(
        lambda t: G(t, omega) - lam / 2 * ((t - omega) ** 2).sum(), theta, vectorize=True
    )
    assert float(torch.linalg.eigvalsh(H0 + lam * torch.eye(len(theta), dtype=torch.float64)).min()) > 0
    g_theta = torch.autograd.functional.jacobian(lambda t: Phi_inner(t, omega), theta)
    g_omega = torch.autograd.functional.jacobian(lambda o: Phi_inner(theta, o), omega)
    dense = lam * torch.linalg.solve(H0 + lam * torch.eye(len(theta), dtype=torch.float64), g_theta) + g_omega

    problem = build_problem(
        inner, outer, lam=lam, damping=0.0, cg_steps=16, align_weight=beta, align_tau=0.5, eps2=0.5,
        upper_ssl_weight=mu, gamma=gamma, clip_norm=None,
    )  # fmt: skip
    problem.hypergradient(upper_batch, lower_batch)
    got = torch.cat([p.grad.flatten() for p in outer["late"].parameters()])
    assert torch.allclose(got, dense, atol=1e-9, rtol=1e-7)

    # and the dense IFT is the true total derivative: central differences through the Newton solve
    v = torch.randn_like(omega)
    h = 1e-5
    fd = (Phi_inner(solve(omega + h * v), omega + h * v) - Phi_inner(solve(omega - h * v), omega - h * v)) / (2 * h)
    assert abs(float(fd) - float(dense @ v)) <= 1e-6 * max(1.0, abs(float(fd)))

    # the first-order baseline differs from it (it drops the Hessian)
    inner2, outer2 = copy.deepcopy(inner), copy.deepcopy(outer)
    fo = build_problem(inner2, outer2, lam=lam, damping=0.0, cg_steps=1, align_weight=beta, align_tau=0.5, eps2=0.5,
                       upper_ssl_weight=mu, gamma=gamma, first_order=True, clip_norm=None)  # fmt: skip
    fo.hypergradient(upper_batch, lower_batch)
    got_fo = torch.cat([p.grad.flatten() for p in outer2["late"].parameters()])
    assert torch.allclose(got_fo, g_theta + g_omega, atol=1e-10)
    assert float((got_fo - dense).norm()) > 1e-4
