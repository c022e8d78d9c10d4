"""A reused operator reaches the solver as the same object, so a recycling solver's basis serves many steps."""

from __future__ import annotations

import pytest
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


@pytest.mark.parametrize("mode", ["rev_rev", "fwd_rev", "finite_diff"])
def test_reuse_with_a_recomputing_mode_keeps_the_operator_object_for_the_solver(mode: str) -> None:
    """reuse_operator=True with a mode that keeps no graph: the same object still reaches the solver."""
    H, inner, params, hparams = _proximal_setup()
    lam = 0.5
    solver = hypergrad.RecycledLanczos(basis_size=12, max_steps=20, rtol=1e-10)
    method = hypergrad.Proximal(lam=lam, coupling={"w": "w"}, solver=solver, hvp_mode=mode, reuse_operator=True)
    state = MethodState()
    tol = dict(rtol=1e-6, atol=1e-8) if mode == "finite_diff" else dict(rtol=1e-9, atol=1e-12)
    setups = []
    for token in ("alt-0", "alt-0", "alt-0", "alt-1"):
        target = torch.randn(12, dtype=F64)
        out = method.hypergradient(
            inner, lambda p, h, t=target: 0.5 * ((p["w"] - t) ** 2).sum(), params, hparams, state, _ident, token
        )
        assert out.solution.converged, out.solution.status
        ref = lam * torch.linalg.solve(H + lam * torch.eye(12, dtype=F64), params["w"] - target)
        torch.testing.assert_close(out.grad["w"], ref, **tol)
        assert state.operator is not None and state.operator.mode == mode
        setups.append(out.solution.stats["setup_matvecs"])
    assert setups[0] >= 12 and setups[3] >= 12, setups  # a basis per token ...
    assert setups[1] <= 1 and setups[2] <= 1, setups  # ... served again (residual check only) within it


def test_problem_recycles_one_basis_per_hessian_batch_with_rev_rev() -> None:
    """BilevelProblem + Proximal(rev_rev, reuse_operator) + RecycledLanczos: HVPs per upper step drop after the first."""
    torch.manual_seed(3)
    A = torch.randn(10, 10, dtype=F64)
    H = A @ A.T / 10 + 0.1 * torch.eye(10, dtype=F64)
    w = torch.nn.Parameter(torch.randn(10, dtype=F64))
    u = torch.nn.Parameter(torch.zeros(10, dtype=F64))
    lam = 0.3
    solver = hypergrad.RecycledLanczos(basis_size=10, max_steps=20, rtol=1e-10)
    problem = hypergrad.BilevelProblem(
        hypergrad.Level({"w": w}, torch.optim.SGD([w], lr=0.0)),
        hypergrad.Level({"w": u}, torch.optim.SGD([u], lr=0.0)),
        lambda i, o, b: 0.5 * b * (i.w @ H @ i.w),
        lambda i, o, t: 0.5 * ((i.w - t) ** 2).sum(),
        hypergrad.Proximal(lam=lam, coupling={"w": "w"}, solver=solver, hvp_mode="rev_rev", reuse_operator=True),
    )
    hvps = []
    for scale in (1.0, 2.0):  # two alternations: two Hessian batches (the matrix b * H)
        problem.new_hessian_batch(torch.tensor(scale, dtype=F64))
        for _ in range(3):
            target = torch.randn(10, dtype=F64)
            rec = problem.hypergradient(target)
            ref = lam * torch.linalg.solve(scale * H + lam * torch.eye(10, dtype=F64), w.detach() - target)
            torch.testing.assert_close(u.grad, ref, rtol=1e-8, atol=1e-10)
            assert rec.solve is not None and not rec.solve_failed
            hvps.append(rec.num_hvps)
            problem.outer_step()
    assert hvps[0] >= 10 and hvps[3] >= 10, hvps  # the basis, once per Hessian batch
    assert max(hvps[1:3] + hvps[4:6]) <= 2, hvps  # recycled: a residual check (+ at most one PCG step)
