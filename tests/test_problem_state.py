"""BilevelProblem.load_state_dict validates everything before it writes anything; RNG capture is opt-in."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch

import hypergrad
from tests.helpers_problem import bn_problem, full_state, state_diff


def _other(**kw: Any) -> Callable[[hypergrad.BilevelProblem], dict]:
    """The state dict of a problem built differently (one inner step: its optimiser has state)."""

    def make(_: hypergrad.BilevelProblem) -> dict:
        problem, _, _, batch = bn_problem(**kw)
        problem.inner_step(batch())
        return copy.deepcopy(problem.state_dict())

    return make


def _edit(fn: Callable[[dict], None]) -> Callable[[hypergrad.BilevelProblem], dict]:
    """This problem's own state dict with one entry spoiled."""

    def make(problem: hypergrad.BilevelProblem) -> dict:
        state = copy.deepcopy(problem.state_dict())
        fn(state)
        return state

    return make


def _drop(d: dict, key: str) -> None:
    del d[key]


# (id, how the saved state is produced, regex of the error): every entry is a "half-valid" state dict
# whose other parts would load fine (the outer level always fits).
MISMATCHES: list[tuple[str, Callable[[hypergrad.BilevelProblem], dict], str]] = [
    ("width", _other(width=5), r"inner_module\['0.weight'\] has shape \(5, 3\), the module's has \(4, 3\)"),
    ("optimizer-class", _other(inner_opt="sgd"), r"inner_optimizer group 0 has other settings .* Adam"),
    ("optimizer-groups", _other(inner_opt="adam2"), r"inner_optimizer has 2 parameter group\(s\), this"),
    ("scheduler-class", _other(scheduler="exp"), r"inner_scheduler has other entries .* StepLR"),
    ("scheduler-missing", _other(scheduler=None), r"has no inner scheduler but this problem has one"),
    (
        "module-key",
        _edit(lambda s: _drop(s["inner_module"], "1.running_var")),
        r"inner_module lacks 1 entries of the module: \['1.running_var'\]",
    ),
    (
        "module-dtype",
        _edit(lambda s: s["inner_module"].update({"0.bias": s["inner_module"]["0.bias"].float()})),
        r"inner_module\['0.bias'\] has dtype torch.float32, the module's has torch.float64",
    ),
    (
        "optimizer-state-shape",
        _edit(lambda s: s["inner_optimizer"]["state"][0].update(exp_avg=torch.zeros(2))),
        r"inner_optimizer\['state'\]\[0\]\['exp_avg'\] has shape \(2,\), its parameter \(4, 3\)",
    ),
    (
        "warm-start",
        _edit(lambda s: s["warm_start"].update({"0.weight": torch.zeros(3)})),
        r"warm_start\['0.weight'\] has shape \(3,\), the parameter \(4, 3\)",
    ),
    (
        "counters",
        _edit(lambda s: s["counters"].update(outer_steps=-1)),
        r"counters\['outer_steps'\] = -1, expected an integer >= 0",
    ),
]


@pytest.fixture(scope="module")
def trained() -> tuple:
    """A problem after one full step (optimiser, scheduler, warm start and counters populated)."""
    problem, net, hp, batch = bn_problem()
    problem.step([batch(), batch()], batch())
    return problem, batch


@pytest.mark.parametrize("make, match", [m[1:] for m in MISMATCHES], ids=[m[0] for m in MISMATCHES])
def test_half_valid_state_dict_leaves_the_problem_bitwise_unchanged(trained, make, match) -> None:
    problem, batch = trained
    before = full_state(problem)
    assert before["x0"] is not None and before["inner.opt.0.exp_avg"].shape == (4, 3)
    state = make(problem)
    with pytest.raises(ValueError, match=match) as info:
        problem.load_state_dict(state)
    assert "nothing was loaded" in str(info.value) and "Build the problem exactly as" in str(info.value)
    assert state_diff(before, full_state(problem)) == []


def test_error_lists_every_mismatch_at_once(trained) -> None:
    problem, _ = trained
    with pytest.raises(ValueError) as info:
        problem.load_state_dict(_other(width=5, inner_opt="sgd")(problem))
    msg = str(info.value)
    assert "inner_module['0.weight'] has shape" in msg and "inner_optimizer group 0 has other settings" in msg


def test_not_a_state_dict(trained) -> None:
    problem, _ = trained
    with pytest.raises(TypeError, match=r"`state` must be a dict from BilevelProblem.state_dict\(\), got list"):
        problem.load_state_dict([1])
    with pytest.raises(ValueError, match=r"its 'format' is None"):
        problem.load_state_dict({"inner_module": {}})
    state = problem.state_dict()
    del state["counters"]
    with pytest.raises(ValueError, match=r"`state` lacks the entries \['counters'\]"):
        problem.load_state_dict(state)


def test_round_trip_restores_everything_and_drops_cached_operators() -> None:
    problem, _, _, batch = bn_problem()
    problem.step([batch(), batch()], batch())
    saved, before = copy.deepcopy(problem.state_dict()), full_state(problem)
    assert "rng" not in saved and saved["format"] == "hypergrad.BilevelProblem/2"
    for _ in range(2):
        problem.step([batch()], batch())
    assert state_diff(before, full_state(problem)) != []
    problem.load_state_dict(saved)
    assert state_diff(before, full_state(problem)) == []
    with pytest.raises(ValueError, match="no default Hessian batch"):  # the old batch is forgotten
        problem.hypergradient(batch())


def test_rng_is_opt_in_and_untouched_by_state_dict() -> None:
    problem, _, _, batch = bn_problem()
    problem.step([batch()], batch())
    torch.manual_seed(123)
    saved = copy.deepcopy(problem.state_dict())
    rng = hypergrad.get_rng_state()
    expected = torch.rand(3)
    torch.manual_seed(7)
    problem.load_state_dict(saved)
    assert not torch.equal(torch.rand(3), expected)  # load_state_dict leaves the global RNG alone
    hypergrad.set_rng_state(rng)  # the opt-in tool restores it
    assert torch.equal(torch.rand(3), expected)


def test_format_1_state_dict_loads_and_says_the_rng_is_not_restored() -> None:
    problem, _, _, batch = bn_problem()
    problem.step([batch()], batch())
    old = copy.deepcopy(problem.state_dict())
    old["format"], old["rng"] = "hypergrad.BilevelProblem/1", hypergrad.get_rng_state()
    del old["counters"]["failed_solves"]  # format 1 had four counters
    problem.step([batch()], batch())
    with pytest.warns(UserWarning, match=r"no longer restores; call hypergrad.set_rng_state\(state\['rng'\]\)"):
        problem.load_state_dict(old)
    assert problem.outer_steps == 1 and problem.failed_solves == 0
