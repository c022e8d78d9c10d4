"""Explicit operator reuse: the caller declares the linearisation; no identity or version keys."""

from __future__ import annotations

import pytest
import torch

import hypergrad
from tests.helpers_problem import bissl_batches, bissl_problem, flat


def _method(reuse: bool, cls=hypergrad.Proximal):
    solver = hypergrad.CG(max_steps=60, rtol=1e-13)
    if cls is hypergrad.Implicit:
        return hypergrad.Implicit(solver=solver, damping=5.0, reuse_operator=reuse)
    return hypergrad.Proximal(
        lam=0.5, damping=1.0, coupling={"backbone": "backbone"}, solver=solver, reuse_operator=reuse
    )


def _grad(upper) -> torch.Tensor:
    return flat({k: p.grad.detach().clone() for k, p in upper.named_parameters()})


def _fresh(pre: torch.Tensor, down, inner_batches) -> torch.Tensor:
    """The hypergradient of a problem that never reuses anything, at the same point."""
    problem, _, upper = bissl_problem(_method(False))
    for b in inner_batches:
        problem.inner_step(b)
    problem.hypergradient(down, hessian_batch=pre)
    return _grad(upper)


def test_in_place_mutated_hessian_batch_is_never_served_from_a_stale_operator() -> None:
    pre, down = bissl_batches()
    problem, _, upper = bissl_problem(_method(True))
    problem.inner_step(pre)
    batch = pre.clone()
    problem.new_hessian_batch(batch)
    first = problem.hypergradient(down)
    g_old = _grad(upper)
    assert not first.operator_reused and problem.hypergradient(down).operator_reused  # shared while declared
    batch.mul_(3.0)  # the caller changes the batch's tensors in place ...
    problem.new_hessian_batch(batch)  # ... and says so (the same object: no identity key could see it)
    record = problem.hypergradient(down)
    ref = _fresh(batch.clone(), down, [pre])
    assert not record.operator_reused
    assert torch.allclose(_grad(upper), ref, rtol=1e-10, atol=1e-13)
    assert not torch.allclose(g_old, ref, rtol=1e-3)  # the stale operator would have given another result
    # a batch passed to the call itself is never served from (nor stored as) a cached operator
    batch.mul_(0.5)
    record = problem.hypergradient(down, hessian_batch=batch)
    assert not record.operator_reused
    assert torch.allclose(_grad(upper), _fresh(batch.clone(), down, [pre]), rtol=1e-10, atol=1e-13)
    assert not problem.hypergradient(down, hessian_batch=batch).operator_reused


@pytest.mark.parametrize("cls", [hypergrad.Proximal, hypergrad.Implicit])
def test_reuse_only_when_asked_and_until_the_linearisation_changes(cls) -> None:
    pre, down = bissl_batches()
    if cls is hypergrad.Implicit:  # Implicit declares its Hessian outer-dependent; couple the levels by a penalty
        inner_loss = lambda lo, up, b: (
            ((lo.projector(torch.tanh(lo.backbone(b))) - b[:, :2].sin()) ** 2).mean()
            + (sum(((p - q) ** 2).sum() for p, q in zip(lo.backbone.parameters(), up.backbone.parameters())))
        )
        problem, _, _ = bissl_problem(_method(True, cls), inner_loss=inner_loss)
        off, _, _ = bissl_problem(_method(False, cls), inner_loss=inner_loss)
    else:
        problem, _, _ = bissl_problem(_method(True, cls))
        off, _, _ = bissl_problem(_method(False, cls))
    for p in (problem, off):
        p.inner_step(pre)
        p.new_hessian_batch(pre)
    assert [off.outer_step(down).operator_reused for _ in range(2)] == [False, False]  # not asked: never
    assert [problem.hypergradient(down).operator_reused for _ in range(2)] == [False, True]
    problem.outer_step()
    # an applied outer step changes the linearisation only when the Hessian depends on the outer level
    assert problem.hypergradient(down).operator_reused is (cls is hypergrad.Proximal)
    problem.outer_step()
    problem.inner_step(pre)  # an applied inner step always does
    assert [problem.hypergradient(down).operator_reused for _ in range(2)] == [False, True]
    problem.outer_step()


def test_no_identity_or_version_keys_in_the_problem_package() -> None:
    import pathlib

    import hypergrad.problem as pkg

    text = "\n".join(p.read_text() for p in pathlib.Path(pkg.__file__).parent.glob("*.py"))
    assert "_version" not in text and "id(batch" not in text and "id(hessian" not in text


@pytest.mark.parametrize("change", ["inner_step", "new_hessian_batch", "outer_step"])
def test_a_stale_cached_operator_is_freed_when_the_linearisation_changes(change) -> None:
    """The cached operator (its graph) and the solver's matvec around it are released at once, not at the
    next hypergradient: tokens only grow, so nothing could serve from them again, and a BiSSL alternation
    runs its lower steps in between."""
    import gc
    import weakref

    pre, down = bissl_batches()
    cls = hypergrad.Implicit if change == "outer_step" else hypergrad.Proximal  # Implicit: outer-dependent H
    if cls is hypergrad.Implicit:
        inner_loss = lambda lo, up, b: (
            ((lo.projector(torch.tanh(lo.backbone(b))) - b[:, :2].sin()) ** 2).mean()
            + (sum(((p - q) ** 2).sum() for p, q in zip(lo.backbone.parameters(), up.backbone.parameters())))
        )
        problem, _, _ = bissl_problem(_method(True, cls), inner_loss=inner_loss)
    else:
        problem, _, _ = bissl_problem(_method(True, cls))
    problem.inner_step(pre)
    problem.new_hessian_batch(pre)
    assert [problem.hypergradient(down).operator_reused for _ in range(2)] == [False, True]
    state = problem.method_state
    op = weakref.ref(state.operator)
    assert state.operator.mode == "rev_rev_cached"  # what "auto" picks: the operator holds a gradient graph
    graph = weakref.ref(next(iter(state.operator._grad_value.values())))  # a tensor only the operator holds
    assert state.solver_memo.get("operator") is state.operator
    if change == "inner_step":
        problem.inner_step(pre)
    elif change == "new_hessian_batch":
        problem.new_hessian_batch(pre)
    else:
        problem.outer_step()
    gc.collect()
    assert state.operator is None and state.operator_token is None and not state.solver_memo
    assert op() is None and graph() is None
    assert not problem.hypergradient(down).operator_reused  # and the next hypergradient builds a new one
