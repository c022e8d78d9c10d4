"""Solvers x problems: wall time, HVP count, relative error against the exact hypergradient, memory.

One benchmark per (problem, method, budget ``K``), grouped by problem. The timed callable computes
the hypergradient at the precomputed inner solution; ``extra_info`` records ``rel_err`` (against
the problem's exact answer), ``num_hvps`` (the solver's matvecs), ``num_steps``,
``residual_norm``, ``status`` and ``peak_mem_bytes``. ``report.py`` draws error vs time and error
vs HVPs from them.

Run: ``python -m pytest benchmarks/bench_solvers.py --preset full --benchmark-json=solvers.json``.
"""

from __future__ import annotations

import math

import pytest
import torch

from .conftest import BUDGETS
from .measure import record, rel_error, synced
from .problems import problem_kind, problem_names
from .solvers_registry import METHODS, methods_for

# Methods whose error at the largest budget must be <= 1e-6 on problems with condition number
# <= 100 (CG converges in O(sqrt(kappa) log(1/eps)) steps; the largest small-preset budget is 32).
_CG_FAMILY = ("cg", "cg_cached")


def _specs(preset: str) -> list:
    specs = []
    for problem in problem_names():
        for name in methods_for(problem_kind(problem)):
            method = METHODS[name]
            budgets = BUDGETS[preset] if method.uses_budget else (0,)
            for k in budgets:
                specs.append(pytest.param((problem, name, k), id=f"{problem}-{name}-K{k}"))
    return specs


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "solver_spec" in metafunc.fixturenames:
        metafunc.parametrize("solver_spec", _specs(metafunc.config.getoption("--preset")))


def test_solver(benchmark, problems, device: str, preset: str, solver_spec: tuple) -> None:
    problem, name, budget = solver_spec
    case = problems(problem)
    method = METHODS[name]
    fn = method.build(case, budget)
    benchmark.group = f"solvers:{problem}"
    result = benchmark(synced(fn, device))

    # Check the result after timing.
    err = rel_error(result.grad, case.exact)
    info = record(
        benchmark,
        fn,
        device,
        kind="solver",
        problem=problem,
        method=name,
        budget=budget,
        num_params=case.num_params,
        num_hvps=result.num_hvps,
        setup_hvps=result.setup_matvecs,
        num_steps=result.num_steps,
        residual_norm=result.residual_norm,
        status=result.status,
        rel_err=err,
        description=case.description,
        condition_number=case.lambda_max / case.lambda_min,
    )
    assert all(bool(torch.isfinite(g).all()) for g in result.grad.values()), f"non-finite hypergradient: {info}"
    assert sorted(result.grad) == sorted(case.exact)
    if name == "dense":
        assert err <= 1e-9, f"Dense must be exact to rounding, got rel_err={err:.2e}"
    if method.uses_budget and method.kind != "unrolled":  # setup: a preconditioner or recycled basis
        assert result.num_hvps - result.setup_matvecs == budget, f"{name}: {result.num_hvps} matvecs for {budget}"
    if name in _CG_FAMILY and budget == max(BUDGETS[preset]) and case.lambda_max / case.lambda_min <= 100:
        assert err <= 1e-6, f"{name} with {budget} steps on {problem} (kappa <= 100): rel_err={err:.2e}"
    assert math.isfinite(err)
