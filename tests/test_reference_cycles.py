"""No tensor of the library's objects waits for Python's cyclic garbage collector.

A tensor that only ``gc.collect()`` frees sat in a reference cycle: its memory stays allocated
until the collector happens to run (see the ``cyclic_garbage`` fixture in ``conftest.py``, and
``tests/test_operator_memory.py`` for the operators' gradient graphs).
"""

from __future__ import annotations

import weakref
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad


def _case() -> tuple[nn.Module, torch.Tensor, hypergrad.LinearOperator, dict]:
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    f, params = hypergrad.stateless(net), hypergrad.module_params(net)
    op = hypergrad.Damped(hypergrad.HessianOperator(lambda p: F.cross_entropy(f(p, x), y), params), 1.0)
    return net, x, op, {k: torch.randn_like(t) for k, t in params.items()}


SOLVERS: dict[str, Callable[[nn.Module, torch.Tensor], hypergrad.AbstractLinearSolver]] = {
    "RecycledLanczos": lambda net, x: hypergrad.RecycledLanczos(basis_size=3, max_steps=30, rtol=1e-10),
    "PCG-Nystrom": lambda net, x: hypergrad.PCG(hypergrad.Nystrom(rank=3), max_steps=30, rtol=1e-10),
    "PCG-HutchinsonDiagonal": lambda net, x: hypergrad.PCG(
        hypergrad.HutchinsonDiagonal(num_samples=4), max_steps=30, rtol=1e-10
    ),
    "PCG-KFAC": lambda net, x: hypergrad.PCG(hypergrad.KFAC(net, x, shift=1.0), max_steps=30, rtol=1e-10),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_a_solver_dropped_before_its_operator_frees_its_setup_without_the_cyclic_collector(name, cyclic_garbage):
    """The per-operator cache (a recycled basis, a built preconditioner) was in a cycle with the weak
    reference to its operator (whose callback was the cache's bound method), so a solver dropped
    while its operator lived on left that setup to the cyclic collector."""
    net, x, op, b = _case()
    solver = SOLVERS[name](net, x)
    sol = solver(op, b)
    assert sol.converged and repr(solver._cache) == "OperatorCache(filled)"  # the setup was built and kept
    del solver, sol
    assert cyclic_garbage() == []
    del op  # the cache's weak-reference callback finds its cache gone: nothing to clear, no error
    assert cyclic_garbage() == []


def test_the_cache_still_forgets_its_setup_when_the_operator_dies() -> None:
    net, x, op, b = _case()
    solver = hypergrad.RecycledLanczos(basis_size=3, max_steps=30, rtol=1e-10)
    solver(op, b)
    assert repr(solver._cache) == "OperatorCache(filled)"
    del op
    assert repr(solver._cache) == "OperatorCache(empty)"


def _linearisation_constants(op: hypergrad.HessianOperator, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors held by the modules that ``torch.func.linearize``'s function calls, less the inputs' storages."""
    skip = {t.untyped_storage().data_ptr() for t in inputs}
    held = []
    for cell in op._apply.__closure__ or ():  # type: ignore[union-attr]
        value = cell.cell_contents
        if isinstance(value, nn.Module):
            for m in value.modules():
                held += [*m._parameters.values(), *m._buffers.values()]
                held += [t for t in vars(m).values() if isinstance(t, torch.Tensor)]
    return [t for t in held if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in skip]


def _linearized(make: str) -> tuple[hypergrad.HessianOperator, list[torch.Tensor]]:
    """A linearised operator after a product and a block product (checked), and the tensors its loss closes over."""
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    f, params = hypergrad.stateless(net), hypergrad.module_params(net)

    def loss(p: dict) -> torch.Tensor:
        return F.cross_entropy(f(p, x), y)

    v = {k: torch.randn_like(t) for k, t in params.items()}
    if make == "LinearizedHessian":
        op: hypergrad.HessianOperator = hypergrad.LinearizedHessian(loss, params, fallback=False)
    else:
        op = hypergrad.HessianOperator(loss, params, mode="fwd_rev_linearized")
    hv = op(v)
    op.matmat({k: torch.stack([t, 2 * t]) for k, t in v.items()})
    torch.testing.assert_close(hv, hypergrad.HessianOperator(loss, params, mode="rev_rev")(v))
    return op, [*params.values(), x, y]


@pytest.mark.parametrize("make", ["LinearizedHessian", "HessianOperator"])
def test_a_linearized_operator_frees_its_traced_constants_without_the_cyclic_collector(make, cyclic_garbage):
    """``torch.func.linearize`` keeps its constants (tensors shaped like the forward activations) in
    ``torch.fx`` graph modules, each in a reference cycle with its graph; they must go with the
    operator. (torch's tracing also leaves fake tensors, views of the parameters and some of its
    tracer's state in cycles: not ours, and not checked here; and the first trace in a process
    keeps its constants for good: hence the warm-up.)"""
    _linearized(make)
    op, inputs = _linearized(make)
    constants = [weakref.ref(t) for t in _linearisation_constants(op, inputs)]
    assert any(r().shape == (16, 8) for r in constants)  # type: ignore[union-attr]  # activation-shaped
    del op
    alive = [tuple(r().shape) for r in constants if r() is not None]  # type: ignore[union-attr]
    assert alive == [], f"{len(alive)} of {len(constants)} constants alive after the operator: {alive[:5]}"
