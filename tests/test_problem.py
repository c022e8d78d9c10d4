"""BilevelProblem numerics: hypergradients against closed forms, dense references and finite differences."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hypergrad
from tests.helpers_problem import (
    bissl_batches,
    bissl_problem,
    dense_hessian,
    dense_implicit,
    downstream_loss,
    flat,
    pretext_loss,
    ridge_data,
    ridge_problem,
    ridge_solve,
    unflat,
)


def _ridge_outer(val, w):
    X, y = val
    return 0.5 * ((X @ w - y) ** 2).mean()


@pytest.mark.parametrize("hvp_mode", ["fwd_rev", "rev_rev"])
def test_implicit_matches_closed_form_and_finite_differences(hvp_mode: str) -> None:
    train, val = ridge_data()
    log_lam = -1.0
    problem, inner, outer = ridge_problem(
        hypergrad.Implicit(solver=hypergrad.CG(max_steps=50, rtol=1e-13), hvp_mode=hvp_mode)
    )
    w_star = ridge_solve(train, log_lam)
    with torch.no_grad():
        inner.weight.copy_(w_star[None])
    record = problem.hypergradient(val, hessian_batch=train)
    # closed form: dw*/dlog_lam = -lam (A + lam I)^-1 w*
    X, _ = train
    lam = math.exp(log_lam)
    A = X.T @ X / X.shape[0] + lam * torch.eye(5, dtype=X.dtype)
    Xv, yv = val
    gF = Xv.T @ (Xv @ w_star - yv) / Xv.shape[0]
    exact = gF @ (-lam * torch.linalg.solve(A, w_star))
    h = 1e-5
    fd = (_ridge_outer(val, ridge_solve(train, log_lam + h)) - _ridge_outer(val, ridge_solve(train, log_lam - h))) / (
        2 * h
    )
    got = outer.log_lam.grad
    assert torch.allclose(got, exact, rtol=1e-10, atol=0)
    assert torch.allclose(got, fd, rtol=1e-7, atol=0)
    assert record.solve.status == "success" and record.solve.num_steps <= 5
    assert record.num_hvps == record.solve.num_matvecs + 1  # the mixed product
    assert record.outer_loss == pytest.approx(float(_ridge_outer(val, w_star)), rel=1e-12)
    assert inner.weight.grad is None  # the hypergradient touches only the outer level


def test_implicit_on_a_network_matches_dense_reference() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    hp = nn.ParameterDict({"log_wd": nn.Parameter(torch.tensor([-2.0, -1.0], dtype=torch.float64))})
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    xv, yv = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)

    def G_mod(inner, outer, batch):
        wd = outer["log_wd"].exp()
        return (
            ((inner(batch[0]) - batch[1]) ** 2).mean()
            + wd[0] * (inner[0].weight ** 2).sum()
            + wd[1] * (inner[2].weight ** 2).sum()
        )

    def F_mod(inner, outer, batch):
        return ((inner(batch[0]) - batch[1]) ** 2).mean()

    problem = hypergrad.BilevelProblem(
        hypergrad.Level(net, torch.optim.SGD(net.parameters(), lr=0.1)),
        hypergrad.Level(hp, torch.optim.SGD(hp.parameters(), lr=0.1)),
        G_mod,
        F_mod,
        hypergrad.Implicit(solver=hypergrad.Dense()),  # exact solve, even if H is indefinite
    )
    for _ in range(60):  # approach the inner minimum (the reference is evaluated at the same point anyway)
        problem.inner_step((x, y))
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}
    lam = {"log_wd": hp["log_wd"].detach().clone()}

    def G(t, l):
        out = torch.func.functional_call(net, t, (x,))
        wd = l["log_wd"].exp()
        return ((out - y) ** 2).mean() + wd[0] * (t["0.weight"] ** 2).sum() + wd[1] * (t["2.weight"] ** 2).sum()

    def F(t, l):
        return ((torch.func.functional_call(net, t, (xv,)) - yv) ** 2).mean()

    problem.hypergradient((xv, yv))
    ref = dense_implicit(G, F, theta, lam)["log_wd"]
    assert torch.allclose(hp["log_wd"].grad, ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("damping", [0.0, 10.0])
def test_proximal_matches_dense_formula_bissl_shape(damping: float) -> None:
    lam_p, gamma = 0.5, 0.5
    problem, lower, upper = bissl_problem(
        hypergrad.Proximal(
            lam=lam_p,
            damping=damping,
            coupling={"backbone": "backbone"},
            solver=hypergrad.CG(max_steps=200, rtol=1e-14),
        )
    )
    pre, down = bissl_batches()
    for _ in range(5):
        problem.inner_step(pre)
    record = problem.hypergradient(down, hessian_batch=pre)
    theta = {k: v.detach().clone() for k, v in lower.named_parameters()}
    omega = {k: v.detach().clone() for k, v in upper.named_parameters()}
    coupled = {k: v for k, v in theta.items() if k.startswith("backbone.")}
    fixed = {k: v for k, v in theta.items() if k not in coupled}

    def L(tc):  # the pretext loss over the coupled backbone only, projector fixed
        return pretext_loss(_Swap(lower, {**fixed, **tc}), None, pre)

    def Fd(t_c, om):
        return downstream_loss(_Swap(lower, t_c), _Swap(upper, om), down, gamma=gamma)

    H = dense_hessian(L, coupled)
    g_t, g_o = torch.func.grad(lambda tc, om: Fd(tc, om), argnums=(0, 1))(coupled, omega)
    n = H.shape[0]
    x = torch.linalg.solve(torch.eye(n, dtype=H.dtype) + H / (lam_p + damping), flat(g_t))
    expected = dict(g_o)
    for k, v in unflat(x, coupled).items():
        expected[k] = expected[k] + v
    for k, p in upper.named_parameters():
        assert torch.allclose(p.grad, expected[k], rtol=1e-9, atol=1e-13), k
    # the same x through the functional core API
    ref = hypergrad.proximal_grad(L, coupled, g_t, lam=lam_p + damping, solver=hypergrad.Dense())
    assert torch.allclose(flat(ref.grad), x, rtol=1e-9, atol=1e-13)
    assert record.solve.status == "success" and record.num_hvps == record.solve.num_matvecs
    assert all(p.grad is None for p in lower.parameters())


def test_proximal_inner_step_adds_the_penalty() -> None:
    lam_p = 0.3
    problem, lower, upper = bissl_problem(hypergrad.Proximal(lam=lam_p, coupling={"backbone": "backbone"}))
    with torch.no_grad():
        for p in upper.backbone.parameters():
            p.add_(0.1)  # theta != omega so the penalty has a gradient
    pre, _ = bissl_batches()
    before = {k: v.detach().clone() for k, v in lower.named_parameters()}
    omega = {k: v.detach().clone() for k, v in upper.named_parameters()}
    base = torch.func.grad(lambda p: pretext_loss(_Swap(lower, p), None, pre))(before)
    record = problem.inner_step(pre)
    for k, p in lower.named_parameters():
        pen = lam_p * (before[k] - omega[k]) if k.startswith("backbone.") else 0.0
        # SGD with momentum 0.9 on its first step: p <- p - lr * g
        assert torch.allclose(p.detach(), before[k] - 0.05 * (base[k] + pen), rtol=0, atol=1e-14), k
    pen_value = 0.5 * lam_p * sum(((before[k] - omega[k]) ** 2).sum() for k in before if k.startswith("backbone."))
    assert record.inner_losses[0] == pytest.approx(
        float(pretext_loss(_Swap(lower, before), None, pre) + pen_value), rel=1e-12
    )


class _Swap:
    """Call sub-modules of ``module`` with parameters from a flat tree (test-side functional view)."""

    def __init__(self, module: nn.Module, params: dict):
        self.module, self.params = module, params

    def __getattr__(self, name: str):
        sub = getattr(self.module, name)
        p = {k[len(name) + 1 :]: v for k, v in self.params.items() if k.startswith(name + ".")}
        return lambda *a: torch.func.functional_call(sub, p, a)


def test_unrolled_matches_manual_autograd_unroll() -> None:
    train, val = ridge_data()
    steps, lr = 4, 0.2
    problem, inner, outer = ridge_problem(hypergrad.Unrolled(steps=steps, lr=lr))
    w0 = inner.weight.detach().clone()
    problem.hypergradient(val, hessian_batch=train)
    log_lam = outer.log_lam.detach().clone().requires_grad_(True)
    X, y = train
    w = w0.reshape(-1)
    for _ in range(steps):  # differentiable SGD written out by hand
        g = X.T @ (X @ w - y) / X.shape[0] + log_lam.exp() * w
        w = w - lr * g
    (ref,) = torch.autograd.grad(_ridge_outer(val, w), log_lam)
    assert torch.allclose(outer.log_lam.grad, ref, rtol=1e-12, atol=0)
    assert torch.equal(inner.weight.detach(), w0)  # the real inner parameters are not moved


def test_step_updates_both_levels_with_clipping_and_schedulers() -> None:
    train, val = ridge_data()
    inner = nn.Linear(5, 1, bias=False).double()
    outer = nn.ParameterDict({"log_lam": nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))})
    G = lambda i, o, b: (
        0.5 * ((i(b[0]).squeeze(-1) - b[1]) ** 2).mean() + 0.5 * o["log_lam"].exp() * (i.weight**2).sum()
    )
    F = lambda i, o, b: 0.5 * ((i(b[0]).squeeze(-1) - b[1]) ** 2).mean()
    opt_o = torch.optim.SGD(outer.parameters(), lr=1.0)
    sched_o = torch.optim.lr_scheduler.StepLR(opt_o, step_size=1, gamma=0.5)
    problem = hypergrad.BilevelProblem(
        hypergrad.Level(inner, torch.optim.SGD(inner.parameters(), lr=0.1)),
        hypergrad.Level(outer, opt_o, scheduler=sched_o, max_grad_norm=1e-3),
        G,
        F,
        hypergrad.Implicit(solver=hypergrad.CG(max_steps=3)),
    )
    before = outer["log_lam"].item()
    record = problem.step([train] * 4, val)
    assert record.phase == "step" and record.inner_steps == 4 and record.outer_steps == 1
    assert len(record.inner_losses) == 4 and record.inner_losses[-1] < record.inner_losses[0]
    assert record.solve.status == "fixed_budget" and record.solve.num_steps == 3 and record.num_hvps == 4
    assert set(record.times) == {"inner", "hypergradient", "outer"} and not record.skipped
    assert record.hypergrad_norm > 1e-3  # so clipping to 1e-3 is active
    assert abs(outer["log_lam"].item() - before) == pytest.approx(
        1e-3, rel=1e-5
    )  # lr 1 * clipped norm (eps 1e-6 in torch)
    assert opt_o.param_groups[0]["lr"] == 0.5 and outer["log_lam"].grad is None


def test_operator_reuse_across_outer_steps() -> None:
    calls = {"n": 0}

    def counting_pretext(lower, upper, batch):
        calls["n"] += 1
        return pretext_loss(lower, upper, batch)

    pre, down = bissl_batches()
    grads = {}
    for reuse in (False, True):
        method = hypergrad.Proximal(
            lam=1e-3,
            damping=10.0,
            coupling={"backbone": "backbone"},
            solver=hypergrad.CG(max_steps=5),
            reuse_operator=reuse,
        )
        problem, lower, upper = bissl_problem(method, inner_loss=counting_pretext)
        problem.inner_step(pre)
        problem.new_hessian_batch(pre)  # the caller declares the linearisation
        counts, reused, out = [], [], []
        for _ in range(3):
            calls["n"] = 0
            rec = problem.outer_step(down)
            counts.append(calls["n"])
            reused.append(rec.operator_reused)
            out.append(flat({k: p.detach().clone() for k, p in upper.named_parameters()}))
        grads[reuse] = out
        if reuse:
            assert reused == [False, True, True]
            assert counts[1] == counts[2] == 0  # no forward pass of the inner loss at all
            problem.inner_step(pre)  # the inner parameters change: rebuilt
            assert [problem.outer_step(down).operator_reused for _ in range(2)] == [False, True]
            problem.new_hessian_batch(pre + 0)  # a new batch: rebuilt
            assert [problem.outer_step(down).operator_reused for _ in range(2)] == [False, True]
            # a batch passed to the call is used for that call only, never served from a cache
            assert problem.outer_step(down, hessian_batch=pre).operator_reused is False
            assert problem.outer_step(down, hessian_batch=pre).operator_reused is False
        else:
            # no reuse: a fresh operator per call, so at least one forward pass of the inner loss per call
            # (the default "auto" caches its graph within the call: one pass, not one per CG step; this
            # pinned ">= 5" while the default was the recomputing forward-over-reverse mode)
            assert reused == [False, False, False] and min(counts) >= 1
    for a, b in zip(grads[False], grads[True]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_warm_start_reduces_solver_steps_and_is_saved() -> None:
    train, val = ridge_data()
    method = hypergrad.Implicit(solver=hypergrad.CG(max_steps=50, rtol=1e-10), warm_start=True)
    problem, inner, outer = ridge_problem(method)
    with torch.no_grad():
        inner.weight.copy_(ridge_solve(train, -1.0)[None])
    first = problem.hypergradient(val, hessian_batch=train).solve
    again = problem.hypergradient(val, hessian_batch=train).solve
    assert first.num_steps >= 3 and again.num_steps < first.num_steps and again.status == "success"
    state = problem.state_dict()
    assert set(state["warm_start"]) == {"weight"} and state["warm_start"]["weight"].shape == (1, 5)
    cold = ridge_problem(hypergrad.Implicit(solver=hypergrad.CG(max_steps=50, rtol=1e-10)))[0]
    cold.load_state_dict(state)  # the vector travels with the checkpoint even to a cold-start method
    assert torch.equal(cold.method_state.x0["weight"], state["warm_start"]["weight"])


def test_callbacks_receive_every_record(tmp_path) -> None:
    train, val = ridge_data()
    seen = []
    logger = hypergrad.MetricsLogger(tmp_path)
    problem, _, _ = ridge_problem(hypergrad.Implicit(solver=hypergrad.CG(max_steps=2)), callbacks=[seen.append, logger])
    problem.inner_step(train)
    problem.hypergradient(val)
    problem.outer_step()
    problem.step([train, train], val)
    logger.close()
    assert [r.phase for r in seen] == ["inner", "hypergradient", "outer", "step"]
    assert [r.outer_steps for r in seen] == [0, 0, 1, 2] and seen[-1].inner_steps == 3
    text = (tmp_path / "metrics.csv").read_text()
    assert "step/outer_loss" in text.splitlines()[0] and "inner/inner_loss" in text.splitlines()[0]


def test_dict_levels_expose_entries_in_both_passes() -> None:
    x = torch.randn(20, 2, dtype=torch.float64)
    net = nn.Linear(2, 1).double()
    weights = nn.Parameter(torch.zeros(20, dtype=torch.float64))

    def G(inner, outer, batch):
        return (torch.sigmoid(outer["w"]) * (inner["net"](batch).squeeze(-1) - 1.0) ** 2).mean()

    def F(inner, outer, batch):
        return (inner.net(batch) ** 2).mean()

    problem = hypergrad.BilevelProblem(
        hypergrad.Level({"net": net}, torch.optim.SGD(net.parameters(), lr=0.1)),
        hypergrad.Level({"w": weights}, torch.optim.SGD([weights], lr=0.1)),
        G,
        F,
        hypergrad.Implicit(solver=hypergrad.CG(max_steps=3), damping=0.1),
    )
    rec = problem.step([x] * 3, x)
    assert (
        weights.grad is None
        and rec.outer_steps == 1
        and not torch.equal(weights.detach(), torch.zeros(20, dtype=torch.float64))
    )


def test_proximal_step_same_on_every_device(device: str) -> None:
    """The same BiSSL-shaped step on ``device`` (CUDA where present) as on the CPU, in float64."""
    pre, down = bissl_batches()
    results = []
    for dev in ("cpu", device):
        method = hypergrad.Proximal(
            lam=0.5,
            damping=1.0,
            coupling={"backbone": "backbone"},
            solver=hypergrad.CG(max_steps=5),
            warm_start=True,
            reuse_operator=True,
        )
        problem, lower, upper = bissl_problem(method)
        lower.to(dev), upper.to(dev)
        for opt in (problem.inner.optimizer, problem.outer.optimizer):
            opt.state.clear()
        rec = problem.step([pre.to(dev)] * 3, tuple(t.to(dev) for t in down))
        problem.new_hessian_batch(pre.to(dev))
        problem.outer_step(tuple(t.to(dev) for t in down))
        rec2 = problem.outer_step(tuple(t.to(dev) for t in down))
        assert (
            not rec.skipped
            and rec2.operator_reused
            and problem.method_state.x0["backbone.0.weight"].device.type == torch.device(dev).type
        )
        results.append(flat({k: v.detach().cpu() for k, v in upper.named_parameters()}))
    assert torch.allclose(results[0], results[1], rtol=1e-10, atol=1e-12)
