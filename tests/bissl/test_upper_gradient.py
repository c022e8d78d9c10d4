"""The BiSSL upper-level gradient (through hypergrad.BilevelProblem) against dense float64 references.

g_D = lam_e (H + lam_e I)^-1 grad_{theta_P} L_D + gamma grad_{theta_D} L_D, with H the dense
Hessian of the pretext loss w.r.t. the flattened lower backbone (classic double backward,
torch.autograd.functional.hessian) and lam_e = lam + damping.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad
from applications.bissl.bilevel import PretextBatch, build_problem
from applications.bissl.config import BiSSLConfig, paper_method
from applications.bissl.losses import BYOLLoss, NTXentLoss
from applications.bissl.ssl_model import SSLModel
from tests.bissl.conftest import pop_method_kwargs


def _setup(kind: str, **cfg_kw):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    projector = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    predictor = nn.Sequential(nn.Linear(4, 4)).double() if kind == "byol" else None
    ssl = SSLModel(kind, backbone, projector, predictor, temperature=0.5)
    if kind == "byol":
        with torch.no_grad():  # a target that differs from the online network
            for p in ssl.target.parameters():
                p.add_(0.2 * torch.randn_like(p))
    upper = copy.deepcopy(backbone)
    with torch.no_grad():
        for p in upper.parameters():
            p.add_(0.3 * torch.randn_like(p))
    head = nn.Linear(3, 3).double()
    method = pop_method_kwargs(cfg_kw)
    cfg = BiSSLConfig(**{"clip_norm": 1e9, **cfg_kw}, method=paper_method(**method))
    reference = (copy.deepcopy(ssl), copy.deepcopy(upper), copy.deepcopy(head))
    problem = build_problem(
        ssl,
        upper,
        head,
        cfg,
        lower_opt=torch.optim.SGD([p for p in ssl.parameters() if p.requires_grad], lr=1.0),
        upper_opt=torch.optim.SGD([*upper.parameters(), *head.parameters()], lr=1.0),
    )
    x1 = torch.randn(12, 4, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn_like(x1)
    xd = torch.randn(10, 4, dtype=torch.float64)
    yd = torch.randint(0, 3, (10,))
    return problem, (ssl, upper, head), reference, PretextBatch(x1, x2, True), (xd, yd), cfg


def _reference(kind, reference, h_batch, d_batch):
    """Dense H, g = grad_{theta_P} L_D, direct grad_{theta_D} L_D and the head gradient, by plain autograd."""
    ssl, upper, head = reference
    x1, x2, _ = h_batch
    xd, yd = d_batch
    names = [k for k, _ in ssl.backbone.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in ssl.backbone.parameters()])
    shapes = [p.shape for p in ssl.backbone.parameters()]

    def unflat(v):
        out, i = {}, 0
        for k, s in zip(names, shapes):
            n = s.numel()
            out[k] = v[i : i + n].reshape(s)
            i += n
        return out

    bb = copy.deepcopy(ssl.backbone)
    for m in bb.modules():  # plain batch statistics, no running statistics: torch's own kernel
        if isinstance(m, nn.BatchNorm1d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None

    def feats(v, x):
        return torch.func.functional_call(bb, unflat(v), (x,))

    if kind == "simclr":
        lp = lambda v: NTXentLoss(0.5, gather=False)(ssl.projector(feats(v, x1)), ssl.projector(feats(v, x2)))
    else:
        with torch.no_grad():
            t1, t2 = (ssl.target[1](ssl.target[0](x)) for x in (x1, x2))
        lp = lambda v: BYOLLoss()(
            ssl.predictor(ssl.projector(feats(v, x1))), ssl.predictor(ssl.projector(feats(v, x2))), t1, t2
        )
    H = torch.autograd.functional.hessian(lp, flat0)  # double backward
    up = copy.deepcopy(upper)
    for m in up.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    v = flat0.clone().requires_grad_(True)
    loss_p = F.cross_entropy(head(feats(v, xd)), yd)
    loss_d = F.cross_entropy(head(up(xd)), yd)
    g = torch.autograd.grad(loss_p, v, retain_graph=True)[0]
    gd = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_d, list(up.parameters()), retain_graph=True)])
    gh_p = torch.autograd.grad(loss_p, list(head.parameters()), retain_graph=True)
    gh_d = torch.autograd.grad(loss_d, list(head.parameters()))
    return H.detach(), g.detach(), gd.detach(), gh_p, gh_d


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


def _upper_grad(upper: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in upper.parameters()])


@pytest.mark.parametrize("kind", ["simclr", "byol"])
@pytest.mark.parametrize("lam,damping", [(1e-3, 10.0), (0.05, 4.0)])
@pytest.mark.parametrize(
    "solver,reuse",
    [(hypergrad.Dense(), False), (hypergrad.CG(max_steps=300, rtol=1e-13), True)],
    ids=["dense-fresh", "cg-reuse"],
)
def test_upper_gradient_matches_dense_formula(kind, lam, damping, solver, reuse):
    gamma = 0.7
    problem, (ssl, upper, head), ref, h_batch, d_batch, cfg = _setup(
        kind, lam=lam, damping=damping, gamma=gamma, solver=solver, reuse_operator=reuse
    )
    rec = problem.hypergradient(d_batch, h_batch)
    assert not rec.skipped and rec.solve is not None
    H, g, gd, gh_p, gh_d = _reference(kind, ref, h_batch, d_batch)
    assert torch.allclose(H, H.T, atol=1e-12)
    lam_eff = lam + damping
    n = H.shape[0]
    assert torch.linalg.eigvalsh(H).min() > -lam_eff  # I + H / lam_eff is positive definite
    expected = lam_eff * torch.linalg.solve(H + lam_eff * torch.eye(n, dtype=H.dtype), g) + gamma * gd
    torch.testing.assert_close(_upper_grad(upper), expected, rtol=1e-9, atol=1e-11)
    # The Hessian term matters here: dropping it (H = 0) gives a measurably different gradient.
    assert (g + gamma * gd - expected).norm() > 1e-4 * expected.norm()
    for p, a, b in zip(head.parameters(), gh_p, gh_d):  # the head gets both terms' plain gradients
        torch.testing.assert_close(p.grad, a + gamma * b, rtol=1e-10, atol=1e-12)
    # Hessian passes never touch running statistics or the BYOL target.
    assert int(ssl.backbone[1].num_batches_tracked) == 0
    if kind == "byol":
        for a, b in zip(ssl.target.parameters(), ref[0].target.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("reuse", [False, True], ids=["fresh", "reuse"])
def test_default_five_step_cg_matches_textbook_cg(reuse):
    lam_eff = 1e-3 + 4.0  # H has eigenvalues down to about -3.5 here: SPD, yet far from identity
    problem, (ssl, upper, head), ref, h_batch, d_batch, cfg = _setup(
        "simclr",
        lam=1e-3,
        damping=4.0,
        gamma=1.0,
        solver=hypergrad.CG(max_steps=5),
        reuse_operator=reuse,
        warm_start=True,
    )
    H, g, gd, _, _ = _reference("simclr", ref, h_batch, d_batch)
    A = torch.eye(H.shape[0], dtype=H.dtype) + H / lam_eff
    problem.new_hessian_batch(h_batch)  # one Hessian batch for the alternation, declared once
    rec = problem.hypergradient(d_batch)
    assert rec.solve.num_steps == 5
    x_ref = _textbook_cg(A, g, 5)
    torch.testing.assert_close(_upper_grad(upper) - gd, x_ref, rtol=1e-8, atol=1e-11)
    exact = torch.linalg.solve(A, g)
    assert (x_ref - exact).norm() > 1e-6 * exact.norm()  # 5 steps really are a truncated solve
    # Warm start: the next upper step (same parameters, same Hessian batch, new downstream batch)
    # starts CG from the previous solution.
    xd2 = torch.randn_like(d_batch[0])
    d2 = (xd2, d_batch[1])
    rec2 = problem.hypergradient(d2)
    _, g2, gd2, _, _ = _reference("simclr", ref, h_batch, d2)
    assert rec2.operator_reused == reuse
    torch.testing.assert_close(_upper_grad(upper) - gd2, _textbook_cg(A, g2, 5, x0=x_ref), rtol=1e-8, atol=1e-11)


def test_proximal_term_touches_backbone_only():
    """One lower SGD step (lr 1) with lam = 0.5 versus lam = 1e-12: only backbone updates differ,
    by exactly lr * lam * (theta_P - theta_D)."""
    deltas = {}
    for lam in (1e-12, 0.5):
        problem, (ssl, upper, head), _, h_batch, _, _ = _setup("simclr", lam=lam)
        ssl.eval()  # fixed BatchNorm statistics: both runs see the same pretext loss
        before = {k: p.detach().clone() for k, p in ssl.named_parameters()}
        up = {k: p.detach().clone() for k, p in upper.named_parameters()}
        problem.inner_step(h_batch[:2])
        deltas[lam] = {k: p.detach() - before[k] for k, p in ssl.named_parameters() if p.requires_grad}
        for k, p in upper.named_parameters():
            assert torch.equal(p.detach(), up[k])  # theta_D is a constant of the lower problem
    for k, d in deltas[0.5].items():
        if k.startswith("backbone."):
            prox = -0.5 * (before[k] - up[k[len("backbone.") :]])
            torch.testing.assert_close(d - deltas[1e-12][k], prox, rtol=1e-8, atol=1e-12)
            assert prox.abs().max() > 0
        else:
            torch.testing.assert_close(d, deltas[1e-12][k], rtol=0, atol=1e-15)  # projector unaffected


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_rev", "rev_rev_cached"])
def test_batch_norm_hvp_matches_double_backward(mode):
    """hypergrad HVPs through training-mode BatchNorm (batch statistics, via hypergrad.stateless)
    equal classic double backward; no patch of BatchNorm is needed. (torch.func.hessian, which
    nests vmap, is wrong through F.batch_norm in torch 2.15, so it is not the reference here.)"""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 2)).double()
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    params = {k: v.detach() for k, v in net.named_parameters()}
    v = {k: torch.randn_like(p) for k, p in params.items()}
    f = hypergrad.stateless(net)
    got = hypergrad.hvp(lambda p: torch.tanh(f(p, x)).pow(2).sum(), params, v, mode=mode)
    ref_net = copy.deepcopy(net)
    ref_net[1].track_running_stats, ref_net[1].running_mean, ref_net[1].running_var = False, None, None
    leaves = [p.clone().requires_grad_(True) for p in params.values()]
    out = torch.tanh(torch.func.functional_call(ref_net, dict(zip(params, leaves)), (x,))).pow(2).sum()
    g = torch.autograd.grad(out, leaves, create_graph=True)
    ref = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v.values())), leaves)
    for k, r in zip(params, ref):
        torch.testing.assert_close(got[k], r, rtol=1e-9, atol=1e-11)
    assert int(net[1].num_batches_tracked) == 0
