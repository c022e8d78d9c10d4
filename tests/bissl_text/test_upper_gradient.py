"""The text BiSSL upper gradient on a tiny GPT equals the dense implicit-function formula (float64).

g_D = lam_e (H + lam_e I)^-1 grad_{theta_P} L_D + gamma grad_{theta_D} L_D, H = the dense Hessian of
the next-token loss over the coupled parameters (the whole backbone, or its LoRA adapters only) by
double backward on the MATH attention backend, lam_e = lam + damping.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from applications.bissl.text.stage import math_attention
from hypergrad import Dense

from .helpers import batches, tiny_problem


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _dense_reference(lower, upper, head, cfg, h_batch, d_batch):
    lower, upper, head = copy.deepcopy(lower), copy.deepcopy(upper), copy.deepcopy(head)
    xp, yp, _ = h_batch
    xd, yd = d_batch
    params = [p for p in lower.backbone.parameters() if p.requires_grad]
    with math_attention():
        loss = lower(xp, yp)
        g1 = _flat(torch.autograd.grad(loss, params, create_graph=True))
        H = torch.stack([_flat(torch.autograd.grad(g1[i], params, retain_graph=True)) for i in range(len(g1))])
        g = _flat(torch.autograd.grad(F.cross_entropy(head(lower.backbone(xd)), yd), params))
        up = [p for p in upper.parameters() if p.requires_grad]
        gD = _flat(torch.autograd.grad(F.cross_entropy(head(upper(xd)), yd), up))
    lam_e = cfg.lam_eff
    n = len(g)
    assert torch.allclose(H, H.T, atol=1e-10)
    return lam_e * torch.linalg.solve(H + lam_e * torch.eye(n, dtype=H.dtype), g) + cfg.gamma * gD, n


@pytest.mark.parametrize("lora", [0, 2], ids=["full", "lora"])
def test_upper_gradient_equals_dense_formula(lora):
    problem, lower, upper, head, cfg = tiny_problem(lora=lora, lam=0.3, damping=0.5, gamma=0.7, solver=Dense())
    h_batch, d_batch = batches()
    expected, n = _dense_reference(lower, upper, head, cfg, h_batch, d_batch)
    problem.hypergradient(d_batch, h_batch)  # hypergrad picks the attention backend itself
    trained = [p for p in upper.parameters() if p.requires_grad]
    got = _flat([p.grad for p in trained])
    assert got.shape == expected.shape == (n,)
    if lora:  # only the adapters are coupled and trained; the frozen base gets no gradient
        assert all("lora_" in k for k, p in upper.named_parameters() if p.requires_grad)
        assert all(p.grad is None for p in upper.parameters() if not p.requires_grad)
        assert n < sum(p.numel() for p in upper.parameters()) / 2
    # the implicit term is not negligible: the test would catch a missing or wrong solve
    direct_only = cfg.gamma * _flat(torch.autograd.grad(F.cross_entropy(head(upper(d_batch[0])), d_batch[1]), trained))
    assert (expected - direct_only).norm() > 1e-3 * expected.norm()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
