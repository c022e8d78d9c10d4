"""Transactional BilevelProblem: a skipped or raising phase leaves every piece of state as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hypergrad


def _bn_problem(on_nonfinite: str, **method_kw):
    """Inner: Linear-BatchNorm-Linear with learnt per-layer weight decay (outer), Adam + schedulers."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    hp = nn.ParameterDict({"log_wd": nn.Parameter(torch.tensor([-2.0, -1.0], dtype=torch.float64))})
    opt_i = torch.optim.Adam(net.parameters(), lr=0.01)
    opt_o = torch.optim.SGD(hp.parameters(), lr=0.1, momentum=0.9)

    def G(inner, outer, b):
        wd = outer["log_wd"].exp()
        return (
            ((inner(b[0]) - b[1]) ** 2).mean()
            + wd[0] * (inner[0].weight ** 2).sum()
            + wd[1] * (inner[3].weight ** 2).sum()
        )

    def F(inner, outer, b):
        return ((inner(b[0]) - b[1]) ** 2).mean()

    method = hypergrad.Implicit(
        solver=hypergrad.CG(max_steps=3), damping=10.0, warm_start=True, hvp_mode="rev_rev", **method_kw
    )
    problem = hypergrad.BilevelProblem(
        hypergrad.Level(net, opt_i, scheduler=torch.optim.lr_scheduler.StepLR(opt_i, 1, 0.9)),
        hypergrad.Level(hp, opt_o, scheduler=torch.optim.lr_scheduler.StepLR(opt_o, 1, 0.5)),
        G,
        F,
        method,
        on_nonfinite=on_nonfinite,
    )
    gen = torch.Generator().manual_seed(1)
    batch = lambda: (torch.randn(8, 3, generator=gen, dtype=torch.float64), torch.randn(8, 1, generator=gen))
    return problem, net, hp, batch


def _state(problem) -> dict:
    """Everything a step may touch, copied: parameters, buffers, optimiser and scheduler state,
    counters, warm-start vector, the outer .grad."""
    out = {}
    for which in ("inner", "outer"):
        level = getattr(problem, which)
        for k, v in level.module.state_dict().items():  # parameters and every buffer
            out[f"{which}.module.{k}"] = v.detach().clone()
        for pid, st in level.optimizer.state_dict()["state"].items():
            for k, v in st.items():
                out[f"{which}.opt.{pid}.{k}"] = v.clone() if isinstance(v, torch.Tensor) else v
        out[f"{which}.sched"] = dict(level.scheduler.state_dict())
        out[f"{which}.lr"] = level.optimizer.param_groups[0]["lr"]
    for k in ("inner_steps", "outer_steps", "inner_skipped", "outer_skipped", "failed_solves"):
        out[k] = getattr(problem, k)
    x0 = problem.method_state.x0
    out["x0"] = None if x0 is None else {k: v.clone() for k, v in x0.items()}
    return out


def _equal(a: dict, b: dict, skip: tuple = ()) -> list[str]:
    bad = []
    for k in a:
        if k in skip:
            continue
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        elif isinstance(x, dict):
            same = x.keys() == y.keys() and all(
                torch.equal(x[i], y[i]) if isinstance(x[i], torch.Tensor) else x[i] == y[i] for i in x
            )
        else:
            same = x == y
        if not same:
            bad.append(k)
    return sorted(bad)


def _trained(problem, batch) -> None:
    assert not problem.step([batch(), batch()], batch()).skipped  # optimiser, scheduler, x0 all populated


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_inner_batch_leaves_every_buffer_and_scheduler_bitwise_unchanged(policy: str) -> None:
    problem, net, hp, batch = _bn_problem(policy)
    _trained(problem, batch)
    before = _state(problem)
    assert before["x0"] is not None and before["inner.module.1.num_batches_tracked"].item() == 2
    x, y = batch()
    x[3, 0] = float("nan")  # one bad sample: BatchNorm's running statistics would all turn NaN
    if policy == "raise":
        with pytest.raises(hypergrad.NonFiniteError) as info:
            problem.inner_step((x, y))
        msg = str(info.value)
        assert "the inner loss is nan" in msg and "buffers" in msg and "scheduler state" in msg
        assert _equal(before, _state(problem)) == []  # so the message is true
    else:
        record = problem.inner_step((x, y))
        assert record.skipped and record.reason == "the inner loss is nan"
        assert _equal(before, _state(problem)) == ["inner_skipped"] and problem.inner_skipped == 1
    assert all(p.grad is None for p in net.parameters())
    with torch.no_grad():  # the model still evaluates to finite values
        assert bool(torch.isfinite(net.eval()(batch()[0])).all())
    net.train()
    assert not problem.step([batch()], batch()).skipped  # training goes on normally


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_skipped_outer_step_does_not_advance_the_scheduler(policy: str) -> None:
    problem, net, hp, batch = _bn_problem(policy)
    _trained(problem, batch)
    problem.inner_step(batch())
    before = _state(problem)
    xv, yv = batch()
    bad = (xv, yv * float("nan"))
    if policy == "raise":
        with pytest.raises(hypergrad.NonFiniteError, match="outer loss is nan.*scheduler state"):
            problem.outer_step(bad)
        assert _equal(before, _state(problem)) == []
    else:
        record = problem.outer_step(bad)
        assert record.skipped and "outer loss is nan" in record.reason
        assert _equal(before, _state(problem)) == ["outer_skipped"]
    assert all(p.grad is None for p in hp.parameters())


def test_nonfinite_outer_gradient_restores_grad_under_raise_and_keeps_scheduler() -> None:
    problem, net, hp, batch = _bn_problem("raise")
    _trained(problem, batch)
    before = _state(problem)
    hp["log_wd"].grad = torch.tensor([float("inf"), 0.0], dtype=torch.float64)  # a user-written gradient
    with pytest.raises(hypergrad.NonFiniteError, match="outer gradient is non-finite"):
        problem.outer_step()
    assert _equal(before, _state(problem)) == []
    assert hp["log_wd"].grad is not None and hp["log_wd"].grad[0].item() == float("inf")  # kept for inspection


def test_a_raising_loss_restores_buffers_and_counters() -> None:
    problem, net, hp, batch = _bn_problem("skip")
    _trained(problem, batch)
    before = _state(problem)

    def broken(inner, outer, b):
        inner(b[0])  # the forward updates the BatchNorm statistics, then the user's code fails
        raise RuntimeError("user bug")

    problem.inner_loss = broken
    with pytest.raises(RuntimeError, match="user bug"):
        problem.inner_step(batch())
    assert _equal(before, _state(problem)) == []


def test_step_error_says_which_inner_steps_were_applied() -> None:
    problem, net, hp, batch = _bn_problem("raise")
    _trained(problem, batch)
    xv, yv = batch()
    with pytest.raises(hypergrad.NonFiniteError, match=r"the 2 inner step\(s\) before it in this call were applied"):
        problem.step([batch(), batch()], (xv, yv * float("nan")))
    assert problem.inner_steps == 4 and problem.outer_steps == 1


def test_one_sample_batch_on_batchnorm_is_refused_clearly_and_leaves_no_trace() -> None:
    problem, net, hp, batch = _bn_problem("skip")
    _trained(problem, batch)
    before = _state(problem)
    x, y = batch()
    with pytest.raises(ValueError, match=r"`inner_batch`: a BatchNorm layer in training mode got a batch with 1"):
        problem.inner_step((x[:1], y[:1]))
    assert _equal(before, _state(problem)) == []  # num_batches_tracked was incremented before torch's check
    with pytest.raises(ValueError, match=r"`hessian_batch`: a BatchNorm layer .* at least 2 samples"):
        problem.hypergradient(batch(), hessian_batch=(x[:1], y[:1]))
    assert _equal(before, _state(problem)) == []
