r"""Warm start on/off across consecutive outer steps.

A fixed path of ``T`` outer steps :math:`\lambda_{t+1} = \lambda_t - s\, g_t / \|g_t\|` (exact
hypergradients :math:`g_t`, step :math:`s` = 5% of :math:`1 + \|\lambda_0\|`) is computed once,
with the inner solutions :math:`\theta^*_t`, outside the timer. The timed call runs
:func:`hypergrad.implicit_grad` at every step of the path, with ``x0`` = the previous step's
``solution.x`` (warm) or ``None`` (cold), in two regimes:

* ``tol``: ``CG(max_steps=500, rtol=1e-8)`` - warm starts save HVPs at equal accuracy;
* ``budget``: ``CG(max_steps=4)`` - warm starts buy accuracy at equal cost.

``extra_info``: total HVPs, mean and max relative error over the path.

Run: ``python -m pytest benchmarks/bench_warm_start.py --preset full --benchmark-json=warm.json``.
"""

from __future__ import annotations

import pytest

import hypergrad

from .measure import record, rel_error, synced
from .problems import ProblemCase

PROBLEMS = {"small": ("quadratic_k10", "logistic"), "full": ("quadratic_k1000", "logistic", "hyper_cleaning")}
STEPS = {"small": 3, "full": 5}
SOLVERS = {"tol": hypergrad.CG(max_steps=500, rtol=1e-8), "budget": hypergrad.CG(max_steps=4)}


def _path(case: ProblemCase, steps: int) -> list[tuple[dict, dict, dict]]:
    prob, lam = case.problem, {k: v.clone() for k, v in case.hparams.items()}
    size = 0.05 * (1.0 + float(hypergrad.tree_norm(lam)))
    path = []
    for _ in range(steps):
        exact = prob.exact_hypergradient(lam)
        path.append((lam, prob.inner_solution(lam), exact))
        norm = float(hypergrad.tree_norm(exact))
        lam = {k: lam[k] - size * exact[k] / max(norm, 1e-30) for k in lam}
    return path


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "warm_spec" in metafunc.fixturenames:
        metafunc.parametrize(
            "warm_spec",
            [
                pytest.param((p, regime, warm), id=f"{p}-{regime}-{'warm' if warm else 'cold'}")
                for p in PROBLEMS[metafunc.config.getoption("--preset")]
                for regime in SOLVERS
                for warm in (False, True)
            ],
        )


_PATHS: dict[tuple[str, int], list] = {}


def test_warm_start(benchmark, problems, preset: str, device: str, warm_spec: tuple) -> None:
    name, regime, warm = warm_spec
    case = problems(name)
    key = (name, STEPS[preset])
    if key not in _PATHS:
        _PATHS[key] = _path(case, STEPS[preset])
    path, prob, solver = _PATHS[key], case.problem, SOLVERS[regime]

    def fn():
        x, out = None, []
        for lam, theta, _ in path:
            res = hypergrad.implicit_grad(
                prob.inner_loss, prob.outer_loss, theta, lam, solver=solver, x0=x if warm else None, validate=False
            )
            x = res.solution.x
            out.append(res)
        return out

    benchmark.group = f"warm:{name}:{regime}"
    results = benchmark(synced(fn, device))

    errs = [rel_error(r.grad, exact) for r, (_, _, exact) in zip(results, path)]
    hvps = sum(r.solution.num_matvecs for r in results)
    if regime == "tol":
        assert all(r.solution.converged for r in results), [r.solution.status for r in results]
        assert max(errs) <= 1e-5, f"converged solves must give accurate hypergradients, max rel_err={max(errs):.2e}"
    assert all(e == e for e in errs)
    record(
        benchmark,
        fn,
        device,
        kind="warm_start",
        problem=name,
        regime=regime,
        warm=warm,
        outer_steps=len(path),
        total_hvps=hvps,
        mean_rel_err=sum(errs) / len(errs),
        max_rel_err=max(errs),
        description=case.description,
    )
