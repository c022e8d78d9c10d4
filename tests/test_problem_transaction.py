"""Transactional BilevelProblem: a skipped or raising phase leaves every piece of state as it was."""

from __future__ import annotations

import pytest
import torch

import hypergrad
from tests.helpers_problem import bn_problem as _bn_problem
from tests.helpers_problem import full_state as _state
from tests.helpers_problem import state_diff as _equal


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
