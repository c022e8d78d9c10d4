"""hypergrad against TorchOpt, Betty, higher and JAXopt on the same problems.

Same data, same float64 dtype, same inner solution :math:`\\theta^*` (implicit methods) or the
same start :math:`\\theta_0 = 0` and step (unrolled); every timed callable waits for its device and
computes the whole hypergradient. Peers that are not installed are skipped.

* ``test_matched_iterations[problem-method-K]``: every method at the same budget ``K``.
* ``test_matched_accuracy[problem-method]``: each method at the smallest budget that reaches a
  relative error <= 1e-6 (found before timing by doubling, then bisection); methods that never get
  there within ``MAX_K`` are timed at their most accurate budget and marked ``reached=False``.

``report.py`` turns the second into the time ratio of hypergrad's best method to each peer's best.

Run: ``python -m pytest benchmarks/bench_peers.py --preset full --benchmark-json=peers.json``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from .measure import record, rel_error
from .peers import PeerRun, load_adapter, peer_methods
from .problems import PEER_PROBLEMS, ProblemCase
from .solvers_registry import METHODS

TARGET = 1e-6
HYPERGRAD_METHODS = ("cg", "cg_cached", "neumann", "fixed_point", "unrolled", "dense")
PEER_BUDGETS = {"small": (4, 32), "full": (8, 64)}
MAX_K = {"small": 32, "full": 1024}


def _library(method: str) -> str:
    return "hypergrad" if method in METHODS else peer_methods()[method][1]


def make_run(case: ProblemCase, method: str, budget: int) -> PeerRun:
    """A :class:`PeerRun` for a hypergrad method or a peer method (skips when the peer is absent)."""
    if method in METHODS:
        fn = METHODS[method].build(case, budget)
        n = budget if METHODS[method].uses_budget else case.num_params
        return PeerRun(fn, lambda r: r.grad, n)
    module, lib = peer_methods()[method]
    try:
        adapter = load_adapter(module)
    except ImportError as err:
        pytest.skip(f"{lib} is not installed ({err}); install the peers extra to compare")
    try:
        return adapter.METHODS[method](case, budget)
    except NotImplementedError as err:
        pytest.skip(str(err))


def _all_methods() -> list[str]:
    return list(HYPERGRAD_METHODS) + list(peer_methods())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    preset = metafunc.config.getoption("--preset")
    if "iter_spec" in metafunc.fixturenames:
        metafunc.parametrize(
            "iter_spec",
            [
                pytest.param((p, m, k), id=f"{p}-{m}-K{k}")
                for p in PEER_PROBLEMS
                for m in _all_methods()
                if m != "dense"
                for k in PEER_BUDGETS[preset]
            ],
        )
    if "acc_spec" in metafunc.fixturenames:
        metafunc.parametrize(
            "acc_spec", [pytest.param((p, m), id=f"{p}-{m}") for p in PEER_PROBLEMS for m in _all_methods()]
        )


def _error(case: ProblemCase, run: PeerRun, out: Any) -> float:
    return rel_error(run.to_grad(out), case.exact)


def test_matched_iterations(benchmark, problems, device: str, iter_spec: tuple) -> None:
    problem, method, k = iter_spec
    case = problems(problem)
    run = make_run(case, method, k)
    benchmark.group = f"peers-iters:{problem}:K{k}"
    out = benchmark(run.run)
    err = _error(case, run, out)
    assert err == err, "NaN hypergradient"
    record(
        benchmark,
        run.run,
        device,
        kind="peer_iters",
        problem=problem,
        method=method,
        library=_library(method),
        budget=k,
        num_hvps=run.num_hvps,
        rel_err=err,
        description=case.description,
    )
    _no_jax_memory(benchmark, method)


def _no_jax_memory(benchmark, method: str) -> None:
    if _library(method) == "jaxopt":  # the profiler sees PyTorch's allocator only, not XLA's
        benchmark.extra_info["peak_mem_bytes"] = None


def _calibrate(case: ProblemCase, method: str, max_k: int) -> tuple[int, float, bool]:
    """Smallest budget with error <= TARGET (doubling, then bisection), or the best budget tried."""
    if method == "dense":
        run = make_run(case, method, 0)
        return 0, _error(case, run, run.run()), True
    tried: dict[int, float] = {}

    def err_at(k: int) -> float:
        if k not in tried:
            run = make_run(case, method, k)
            tried[k] = _error(case, run, run.run())
        return tried[k]

    k = 1
    while k <= max_k and not err_at(k) <= TARGET:
        k *= 2
    if k > max_k:
        best = min(tried, key=lambda j: tried[j] if tried[j] == tried[j] else float("inf"))
        return best, tried[best], False
    lo, hi = k // 2, k  # err(lo) > TARGET (or lo == 0), err(hi) <= TARGET
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if err_at(mid) <= TARGET:
            hi = mid
        else:
            lo = mid
    return hi, tried[hi], True


def test_matched_accuracy(benchmark, problems, preset: str, device: str, acc_spec: tuple) -> None:
    problem, method = acc_spec
    case = problems(problem)
    make_run(case, method, 1)  # skips now if the peer is missing
    k, cal_err, reached = _calibrate(case, method, MAX_K[preset])
    run = make_run(case, method, k)
    benchmark.group = f"peers-acc:{problem}"
    out = benchmark(run.run)

    err = _error(case, run, out)
    if reached:
        assert err <= TARGET, f"{method}: calibrated at K={k} (err {cal_err:.2e}) but timed run gave {err:.2e}"
    assert torch.isfinite(torch.tensor(err)) or not reached
    record(
        benchmark,
        run.run,
        device,
        kind="peer_acc",
        problem=problem,
        method=method,
        library=_library(method),
        budget=k,
        num_hvps=run.num_hvps,
        rel_err=err,
        reached=reached,
        target=TARGET,
        description=case.description,
    )
    _no_jax_memory(benchmark, method)
