"""A reused operator reaches the solver as the same object, so a recycling solver's basis serves many steps."""

from __future__ import annotations

import torch

import hypergrad
from hypergrad.methods import MethodState

F64 = torch.float64


def _ident(t: dict) -> dict:
    return t


def _proximal_setup() -> tuple:
    torch.manual_seed(1)
    A = torch.randn(12, 12, dtype=F64)
    H = A @ A.T / 12 + torch.eye(12, dtype=F64)  # SPD Hessian of the lower loss
    inner = lambda p, h: 0.5 * p["w"] @ H @ p["w"]
    params = {"w": torch.randn(12, dtype=F64)}
    hparams = {"w": torch.zeros(12, dtype=F64)}
    return H, inner, params, hparams


def test_recycled_basis_built_once_per_token_and_rebuilt_on_a_new_one() -> None:
    H, inner, params, hparams = _proximal_setup()
    lam = 0.5
    solver = hypergrad.RecycledLanczos(basis_size=12, max_steps=20, rtol=1e-12)
    method = hypergrad.Proximal(lam=lam, coupling={"w": "w"}, solver=solver, reuse_operator=True)
    state = MethodState()
    setups, grads = [], []
    for k in range(4):  # four upper steps of one alternation: same token, new right-hand sides
        target = torch.randn(12, dtype=F64)
        outer = lambda p, h, t=target: 0.5 * ((p["w"] - t) ** 2).sum()
        out = method.hypergradient(inner, outer, params, hparams, state, _ident, "alternation-0")
        setups.append(out.solution.stats["setup_matvecs"])
        # dense reference: lam (H + lam I)^-1 g with g = w - target
        g = params["w"] - target
        ref = lam * torch.linalg.solve(H + lam * torch.eye(12, dtype=F64), g)
        torch.testing.assert_close(out.grad["w"], ref, rtol=1e-9, atol=1e-12)
        grads.append(out)
    assert setups[0] >= 12, setups  # the Lanczos basis is built on the first solve ...
    assert all(s <= 1 for s in setups[1:]), setups  # ... and only checked (one residual matvec) later
    assert all(o.operator_reused for o in grads[1:])

    out = method.hypergradient(inner, lambda p, h: p["w"].sum(), params, hparams, state, _ident, "alternation-1")
    assert out.solution.stats["setup_matvecs"] >= 12  # a new linearisation: a new basis
