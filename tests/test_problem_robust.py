"""BilevelProblem robustness: non-finite values, BatchNorm policy, bf16 autocast, configuration errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hypergrad
from tests.helpers_problem import (
    PROBLEM_ERRORS,
    bissl_batches,
    bissl_problem,
    dense_implicit,
    ridge_data,
    ridge_problem,
    same,
    snapshot,
)


def _prox(**kw):
    return hypergrad.Proximal(
        lam=0.5, damping=1.0, coupling={"backbone": "backbone"}, solver=hypergrad.CG(max_steps=4), **kw
    )


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    out.view(-1)[0] = float("nan")
    return out


@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("where", ["inner_loss", "outer_loss", "hvp", "step"])
def test_nonfinite_never_touches_parameters_or_optimiser_state(policy: str, where: str) -> None:
    problem, lower, upper = bissl_problem(_prox(), on_nonfinite=policy)
    pre, down = bissl_batches()
    problem.step([pre, pre], down)  # momentum buffers exist from here on
    before = snapshot(lower, upper, optimizers=(problem.inner.optimizer, problem.outer.optimizer))
    counters = (problem.inner_steps, problem.outer_steps)
    bad_down = (_nan_like(down[0]), down[1])
    calls = {
        "inner_loss": lambda: problem.inner_step(_nan_like(pre)),
        "outer_loss": lambda: problem.outer_step(bad_down, hessian_batch=pre),
        "hvp": lambda: problem.outer_step(down, hessian_batch=_nan_like(pre)),
        "step": lambda: problem.step([_nan_like(pre)], bad_down, hessian_batch=pre),
    }
    expected = {
        "inner_loss": "inner loss is nan",
        "outer_loss": "outer loss is nan",
        "hvp": "linear solve of the proximal hypergradient produced a non-finite",
        "step": "inner loss is nan",
    }[where]
    if policy == "raise":
        with pytest.raises(hypergrad.NonFiniteError, match=expected):
            calls[where]()
    else:
        record = calls[where]()
        assert record.skipped and expected in record.reason
        if where == "step":  # both phases report their reason
            assert record.reason == "the inner loss is nan; the outer loss is nan"
    assert same(before, snapshot(lower, upper, optimizers=(problem.inner.optimizer, problem.outer.optimizer)))
    assert all(p.grad is None for p in [*lower.parameters(), *upper.parameters()])
    if where != "step":
        assert (problem.inner_steps, problem.outer_steps) == counters
    record = problem.step([pre], down)  # training goes on normally afterwards
    assert not record.skipped and problem.outer_steps == counters[1] + 1


@pytest.mark.parametrize(
    "method", [hypergrad.Implicit(solver=hypergrad.CG(max_steps=2)), hypergrad.Unrolled(steps=2, lr=0.1)]
)
def test_infinite_hypergradient_is_skipped(method) -> None:
    inner, outer = nn.Linear(1, 1, bias=False).double(), nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        outer.weight.zero_()
    G = lambda i, o, b: ((i.weight - o.weight) ** 2).sum()
    F = lambda i, o, b: ((i.weight - 1.0) ** 2).sum() + o.weight.abs().sqrt().sum()  # d/d lam sqrt|lam| = inf at 0
    opt = torch.optim.Adam(outer.parameters(), lr=0.1)
    problem = hypergrad.BilevelProblem(
        hypergrad.Level(inner, torch.optim.SGD(inner.parameters(), lr=0.1)), hypergrad.Level(outer, opt), G, F, method
    )
    record = problem.step([None], None)
    assert record.skipped and "hypergradient is non-finite" in record.reason
    assert outer.weight.item() == 0.0 and opt.state == {} and problem.outer_skipped == 1


def test_unrolled_nonfinite_outer_loss_is_reported() -> None:
    train, val = ridge_data()
    problem, inner, outer = ridge_problem(hypergrad.Unrolled(steps=2, lr=0.1), on_nonfinite="raise")
    with pytest.raises(hypergrad.NonFiniteError, match="outer loss after 2 unrolled steps is nan"):
        problem.hypergradient((val[0], _nan_like(val[1])), hessian_batch=train)


# ---------------------------------------------------------------- BatchNorm policy
def _bn_net() -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("policy", ["batch_stats", "running_stats"])
def test_batchnorm_policy(policy: str) -> None:
    net = _bn_net()
    hp = nn.ParameterDict({"wd": nn.Parameter(torch.tensor(0.1, dtype=torch.float64))})
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    xv, yv = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    G_mod = lambda i, o, b: ((i(b[0]) - b[1]) ** 2).mean() + o["wd"] * sum((p**2).sum() for p in i.parameters())
    F_mod = lambda i, o, b: ((i(b[0]) - b[1]) ** 2).mean()
    problem = hypergrad.BilevelProblem(
        hypergrad.Level(net, torch.optim.SGD(net.parameters(), lr=0.05)),
        hypergrad.Level(hp, torch.optim.SGD(hp.parameters(), lr=0.1)),
        G_mod,
        F_mod,
        hypergrad.Implicit(solver=hypergrad.Dense()),
        buffers=policy,
    )
    stats = lambda: [net[1].running_mean.clone(), net[1].running_var.clone(), net[1].num_batches_tracked.clone()]
    s0 = stats()
    problem.hypergradient((xv, yv), hessian_batch=(x, y))
    assert same(s0, stats())  # Hessian and outer passes never touch running statistics
    # reference: a copy whose BatchNorm has no running statistics (batch stats) or runs in eval mode
    ref_net = copy.deepcopy(net)
    if policy == "batch_stats":
        ref_net[1] = nn.BatchNorm1d(4, track_running_stats=False).double()
    else:
        ref_net.eval()
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}
    out = lambda t, inp: torch.func.functional_call(ref_net, t, (inp,))
    G = lambda t, l: ((out(t, x) - y) ** 2).mean() + l["wd"] * sum((v**2).sum() for v in t.values())
    F = lambda t, l: ((out(t, xv) - yv) ** 2).mean()
    ref = dense_implicit(G, F, theta, {"wd": hp["wd"].detach().clone()})["wd"]
    assert torch.allclose(hp["wd"].grad, ref, rtol=1e-9, atol=1e-13)
    problem.outer_step()
    problem.inner_step((x, y))  # an ordinary training step does update them
    assert net[1].num_batches_tracked.item() == 1 and not torch.equal(net[1].running_mean, s0[0])


# ---------------------------------------------------------------- bf16 autocast on CPU
def test_bf16_autocast_keeps_fp32_gradients_and_solver_scalars() -> None:
    torch.manual_seed(0)
    dtypes = []

    def G_mod(inner, outer, batch):
        h = inner[0](batch[0])
        dtypes.append(h.dtype)
        out = inner[2](torch.tanh(h))
        return ((out.float() - batch[1]) ** 2).mean() + outer["wd"] * (inner[0].weight ** 2).sum()

    F_mod = lambda inner, outer, batch: ((inner(batch[0]).float() - batch[1]) ** 2).mean()
    results = {}
    for amp in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        hp = nn.ParameterDict({"wd": nn.Parameter(torch.tensor(0.05))})
        problem = hypergrad.BilevelProblem(
            hypergrad.Level(net, torch.optim.SGD(net.parameters(), lr=0.1)),
            hypergrad.Level(hp, torch.optim.SGD(hp.parameters(), lr=0.01)),
            G_mod,
            F_mod,
            hypergrad.Implicit(solver=hypergrad.CG(max_steps=10), damping=1.0, warm_start=True),
        )
        x, y = torch.randn(64, 8), torch.randn(64, 1)
        dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            record = problem.hypergradient((x, y), hessian_batch=(x, y))
        assert set(dtypes) == {torch.bfloat16 if amp else torch.float32}  # autocast reached the functional passes
        assert hp["wd"].grad.dtype == torch.float32
        assert problem.method_state.x0["0.weight"].dtype == torch.float32
        assert (
            isinstance(record.solve.residual_norm, float) and record.solve.residual_norm == record.solve.residual_norm
        )
        results[amp] = hp["wd"].grad.clone()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            assert not problem.step([(x, y)], (x, y)).skipped
        assert all(p.dtype == torch.float32 for p in net.parameters())
    rel = (results[True] - results[False]).abs() / results[False].abs()
    assert rel.item() < 0.05  # bf16 keeps ~3 significant digits; measured 0.007 here


# ---------------------------------------------------------------- configuration errors
@pytest.mark.parametrize("build, exc, match", [e[1:] for e in PROBLEM_ERRORS], ids=[e[0] for e in PROBLEM_ERRORS])
def test_configuration_errors(build, exc, match) -> None:
    with pytest.raises(exc, match=match):
        build()
