"""`BilevelProblem` refuses outer parameters that no loss reaches, instead of stepping them on zeros.

Their hypergradient is zero by construction; a zero ``.grad`` is not what plain autograd gives
(``None``: the optimiser skips the parameter), and weight decay or momentum would move them. The
check runs once, on the first hypergradient, and leaves the random state as it was.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import hypergrad

F64 = torch.float64


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 3, generator=g, dtype=F64), torch.randn(16, 1, generator=g, dtype=F64)


def _problem(method: Any, *, outer_used: bool, optimise_unused: bool = True, dropout: float = 0.0) -> Any:
    torch.manual_seed(0)
    inner = nn.Linear(3, 1).double()
    outer = nn.ModuleDict({"scale": nn.Linear(3, 3, bias=False), "extra": nn.Linear(2, 2)}).double()
    drop = nn.Dropout(dropout)

    def inner_loss(i: nn.Module, o: nn.Module, b: Any) -> torch.Tensor:
        return ((i(o["scale"](b[0])) - b[1]) ** 2).mean() + 1e-1 * sum((p**2).sum() for p in i.parameters())

    def outer_loss(i: nn.Module, o: nn.Module, b: Any) -> torch.Tensor:
        out = i(drop(b[0]))
        if outer_used:  # "extra" reaches the outer loss
            out = out + o["extra"](b[0][:, :2]).sum(dim=1, keepdim=True)
        return ((out - b[1]) ** 2).mean()

    trained = outer.parameters() if optimise_unused else outer["scale"].parameters()
    return (
        hypergrad.BilevelProblem(
            hypergrad.Level(inner, torch.optim.SGD(inner.parameters(), lr=0.1)),
            hypergrad.Level(outer, torch.optim.SGD(trained, lr=0.1, weight_decay=0.1)),
            inner_loss,
            outer_loss,
            method=method,
        ),
        outer,
    )


def _implicit() -> Any:
    return hypergrad.Implicit(solver=hypergrad.Dense())


@pytest.mark.parametrize(
    "method",
    [_implicit(), hypergrad.Unrolled(steps=2, lr=0.1)],
    ids=["implicit", "unrolled"],
)
def test_an_outer_parameter_no_loss_reaches_is_refused_and_nothing_moves(method: Any) -> None:
    problem, outer = _problem(method, outer_used=False)
    before = {k: p.detach().clone() for k, p in outer.named_parameters()}
    batch = _data()
    with pytest.raises(ValueError, match=r"\['extra.weight', 'extra.bias'\] reach neither `outer_loss` nor") as err:
        problem.outer_step(batch, batch)
    assert "Leave them out of the outer optimiser" in str(err.value)
    for k, p in outer.named_parameters():
        assert torch.equal(p, before[k]), k
        assert p.grad is None, k
    assert problem.outer_steps == 0


def test_leaving_the_unreached_parameters_out_of_the_optimiser_is_accepted() -> None:
    problem, outer = _problem(_implicit(), outer_used=False, optimise_unused=False)
    before = outer["extra"].weight.detach().clone()
    record = problem.step([_data()], _data())
    assert not record.skipped and problem.outer_steps == 1
    assert torch.equal(outer["extra"].weight, before)
    assert outer["scale"].weight.grad is None  # applied and cleared, as every outer step


def test_a_parameter_that_reaches_only_the_outer_loss_or_only_the_inner_loss_is_accepted() -> None:
    problem, outer = _problem(_implicit(), outer_used=True)
    batch = _data()
    record = problem.hypergradient(batch, batch)
    assert record.hypergrad_norm is not None
    # "extra" only in F, "scale" only in G: both have a (non-zero) hypergradient
    assert float(outer["extra"].weight.grad.abs().sum()) > 0
    assert float(outer["scale"].weight.grad.abs().sum()) > 0


def test_proximal_counts_coupled_outer_parameters_as_reached() -> None:
    """BiSSL's upper backbone reaches the hypergradient only through the coupling."""
    torch.manual_seed(0)
    lower, upper = nn.Linear(3, 1).double(), nn.ModuleDict({"backbone": nn.Linear(3, 1), "extra": nn.Linear(2, 2)})
    upper = upper.double()
    x, y = _data()

    def lower_loss(i: nn.Module, o: nn.Module, b: Any) -> torch.Tensor:
        return ((i(b[0]) - b[1]) ** 2).mean()

    def upper_loss(i: nn.Module, o: nn.Module, b: Any) -> torch.Tensor:
        return ((i(b[0]) - 2 * b[1]) ** 2).mean()

    def build(trained: Any) -> Any:
        return hypergrad.BilevelProblem(
            hypergrad.Level(lower, torch.optim.SGD(lower.parameters(), lr=0.1)),
            hypergrad.Level(upper, torch.optim.SGD(trained, lr=0.1)),
            lower_loss,
            upper_loss,
            method=hypergrad.Proximal(lam=1.0, coupling={"": "backbone"}, solver=hypergrad.Dense()),
        )

    with pytest.raises(ValueError, match=r"\['extra.weight', 'extra.bias'\] reach neither .* \(through Proximal\)"):
        build(upper.parameters()).hypergradient((x, y), (x, y))
    record = build(upper["backbone"].parameters()).hypergradient((x, y), (x, y))
    assert not record.skipped and float(upper["backbone"].weight.grad.abs().sum()) > 0


def test_the_check_leaves_the_random_state_alone() -> None:
    """Dropout in the outer loss: the first call (with the check) draws the same mask as a later one."""
    problem, outer = _problem(_implicit(), outer_used=True, dropout=0.5)
    batch = _data()
    grads = []
    for _ in range(2):
        torch.manual_seed(123)
        problem.hypergradient(batch, batch)
        grads.append({k: p.grad.clone() for k, p in outer.named_parameters()})
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k
