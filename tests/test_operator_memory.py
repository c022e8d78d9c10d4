"""Peak memory of the reverse-over-reverse HVPs against a hand-written double backward (CPU profiler).

What is pinned down (no timings): a recomputed product (``"rev_rev"``) peaks no higher than the
hand-written forward + ``create_graph`` backward + double backward that reference BiSSL code runs
per CG step, and a product on the cached graph (``"rev_rev_cached"``, what ``"auto"`` picks) peaks
higher by at most what the first backward saves for the double backward - the one-off double
backward frees those tensors as it goes, the cached graph must keep them for the next product
while the double backward's gradient buffers for the forward activations fill up (see
``docs/benchmarks.md``, 2026-11-28). Anything more (a duplicated copy of the parameters, a
graph or a product kept beyond the call) fails these bounds.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

import hypergrad
from benchmarks.measure import peak_memory_bytes

SCALARS = 256  # bytes: slack for a few scalar tensors, far below one parameter vector or activation


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the CPU allocator's running total while ``fn()`` runs (the profiler's memory events)."""
    return peak_memory_bytes(fn, "cpu")


class Net(nn.Module):
    """A small conv net with BatchNorm (batch statistics) and ReLU: activations dominate its graph."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def case() -> tuple[nn.Module, Callable[[dict], torch.Tensor], dict, dict]:
    torch.manual_seed(0)
    net = Net()
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 4, (32,))
    f = hypergrad.stateless(net)

    def loss(p: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(f(p, x), y)

    params = {k: v.detach() for k, v in net.named_parameters()}
    v = {k: torch.randn_like(t) for k, t in params.items()}
    return net, loss, params, v


def reference_hvp(loss: Callable[[dict], torch.Tensor], params: dict, v: dict) -> Callable[[], list]:
    """Forward re-run + ``create_graph`` backward + double backward: one HVP as reference code writes it."""
    leaves = [t.detach().requires_grad_(True) for t in params.values()]

    def run() -> list:
        g = torch.autograd.grad(loss(dict(zip(params, leaves))), leaves, create_graph=True)
        return list(torch.autograd.grad(g, leaves, grad_outputs=list(v.values())))

    return run


def first_backward_saved_bytes(loss: Callable[[dict], torch.Tensor], params: dict) -> int:
    """Bytes of the storages the ``create_graph`` backward saves that the forward did not already save."""
    leaves = [t.detach().requires_grad_(True) for t in params.values()]
    seen: set[int] = set()
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = loss(dict(zip(params, leaves)))
        total[0] = 0
        torch.autograd.grad(value, leaves, create_graph=True)
    return total[0]


def test_recomputed_product_peaks_no_higher_than_a_hand_written_double_backward(case) -> None:
    _, loss, params, v = case
    ref = reference_hvp(loss, params, v)
    ref()  # warm-up: one-off allocations (e.g. kernels' workspaces) outside the measured call

    def ours() -> dict:
        return hypergrad.HessianOperator(loss, params, mode="rev_rev")(v)

    ours()
    p_ref, p_ours = peak_bytes(ref), peak_bytes(ours)
    # SCALARS: a few scalar tensors (the first backward's seed); nothing parameter- or activation-sized
    assert p_ref > 0 and p_ours <= p_ref + SCALARS, (p_ours, p_ref)
    # and the same product (a correctness guard on what was measured)
    for a, b in zip(ours().values(), ref()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["rev_rev_cached", "auto"])
def test_cached_graph_costs_at_most_what_the_first_backward_saves(case, mode) -> None:
    _, loss, params, v = case
    ref = reference_hvp(loss, params, v)
    ref()

    def ours() -> dict:
        op = hypergrad.HessianOperator(loss, params, mode=mode)
        op(v)
        return op(v)  # a second product on the same graph: no growth from one product to the next

    ours()
    p_ref, p_ours = peak_bytes(ref), peak_bytes(ours)
    saved = first_backward_saved_bytes(loss, params)
    assert saved > 0
    assert p_ours <= p_ref + saved + SCALARS, (p_ours, p_ref, saved)
    # keeping the graph is not free: the one-off double backward frees what the cached one keeps
    assert p_ours > p_ref, (p_ours, p_ref)


@pytest.mark.parametrize("mode", ["rev_rev", "rev_rev_cached", "auto", "fwd_rev"])
def test_an_operator_and_its_graph_are_freed_without_the_cyclic_collector(case, mode, cyclic_garbage) -> None:
    """A product kept its gradient graph in a reference cycle (a closure holding itself), which only
    ``gc.collect()`` freed: until then every per-step graph of a BiSSL alternation stayed allocated.
    (torch's own pytree helpers leave small cycles of functions and tuples; no tensor may be in one.)"""
    _, loss, params, v = case
    op = hypergrad.HessianOperator(loss, params, mode=mode)
    op(v)
    op.matmat({k: torch.stack([t, 2 * t]) for k, t in v.items()})
    del op
    assert cyclic_garbage() == []


def test_hypergradients_without_operator_reuse_leave_no_tensor_to_the_cyclic_collector(cyclic_garbage) -> None:
    torch.manual_seed(0)
    inner, outer = Net(), Net()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    problem = hypergrad.BilevelProblem(
        hypergrad.Level(inner, torch.optim.SGD(inner.parameters(), lr=0.0)),
        hypergrad.Level(outer, torch.optim.SGD(outer.parameters(), lr=0.0)),
        lambda i, o, b: nn.functional.cross_entropy(i(b[0]), b[1]),
        lambda i, o, b: nn.functional.cross_entropy(i(b[0]) + o(b[0]), b[1]),
        method=hypergrad.Proximal(lam=10.0, coupling={"": ""}, solver=hypergrad.CG(max_steps=3)),
    )
    problem.new_hessian_batch((x, y))
    for _ in range(3):  # a new operator (and gradient graph) per call
        problem.hypergradient((x, y))
        problem.outer_step()
    assert cyclic_garbage() == []
