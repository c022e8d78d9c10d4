r"""Overhead of the solver machinery: a K-step CG solve against K bare HVPs plus one gradient.

For each model and HVP mode, two benchmarks in the group ``overhead:<model>:<mode>:K<k>``:

* ``cg``: :math:`b = \nabla f(\theta)` (one ``torch.func.grad``), then
  ``hypergrad.CG(max_steps=K)`` on ``hypergrad.HessianOperator(f, theta, mode=mode)``: operator
  construction, K HVPs, CG's vector updates, input checks and the ``Solution``.
* ``bare``: the same arithmetic written directly with ``torch.func``: one gradient, then K calls of
  ``jvp(grad(f))`` (``fwd_rev``) or of the VJP function of ``vjp(grad(f))`` built once
  (``rev_rev_cached``; its construction *is* the gradient).

``report.py`` prints time(cg) / time(bare) (target: close to 1). The "quadratic" case is the
quadratic toy problem's inner loss, where an HVP is cheap and fixed costs show most.

Run: ``python -m pytest benchmarks/bench_overhead.py --preset full --benchmark-json=overhead.json``.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jvp, vjp

import hypergrad
from applications.toy import QuadraticProblem

from .conftest import OVERHEAD_STEPS
from .measure import record, synced
from .models import MODELS, ModelCase

CASES = tuple(MODELS) + ("quadratic",)
MODES = ("fwd_rev", "rev_rev_cached")


def _quadratic_case(preset: str, device: str) -> ModelCase:
    dim = 30 if preset == "small" else 1000
    prob = QuadraticProblem(dim=dim, hdim=10, cond=100.0, device=device, dtype=torch.float32)
    lam = prob.init_hparams()
    return ModelCase(
        "quadratic",
        lambda p: prob.inner_loss(p, lam),
        prob.inner_solution(lam),
        torch.device(device),
        f"quadratic inner loss, dim {dim} (float32)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "overhead_spec" in metafunc.fixturenames:
        ks = OVERHEAD_STEPS[metafunc.config.getoption("--preset")]
        metafunc.parametrize(
            "overhead_spec",
            [
                pytest.param((c, mode, k, variant), id=f"{c}-{mode}-K{k}-{variant}")
                for c in CASES
                for mode in MODES
                for k in ks
                for variant in ("cg", "bare")
            ],
        )


def _bare(case: ModelCase, mode: str, k: int):
    f, params = case.fn, case.params
    if mode == "fwd_rev":

        def run():
            g = grad(f)(params)
            hv = g
            for _ in range(k):
                hv = jvp(grad(f), (params,), (g,))[1]
            return g, hv
    else:

        def run():
            g, vjp_fn = vjp(grad(f), params)
            hv = g
            for _ in range(k):
                hv = vjp_fn(g)[0]
            return g, hv

    return run


def _cg(case: ModelCase, mode: str, k: int):
    f, params, solver = case.fn, case.params, hypergrad.CG(max_steps=k)

    def run():
        g = grad(f)(params)
        return g, solver(hypergrad.HessianOperator(f, params, mode=mode), g)

    return run


def test_overhead(benchmark, models, preset: str, device: str, overhead_spec: tuple) -> None:
    name, mode, k, variant = overhead_spec
    case = _quadratic_case(preset, device) if name == "quadratic" else models(name)
    fn = (_cg if variant == "cg" else _bare)(case, mode, k)
    benchmark.group = f"overhead:{name}:{mode}:K{k}"
    g, out = benchmark(synced(fn, device))

    if variant == "cg":
        assert out.num_matvecs == k, f"CG made {out.num_matvecs} HVPs, expected {k}"
        out = out.x
    assert all(bool(torch.isfinite(t).all()) for t in out.values())
    assert all(bool(torch.isfinite(t).all()) for t in g.values())
    record(
        benchmark,
        fn,
        device,
        kind="overhead",
        model=name,
        mode=mode,
        budget=k,
        variant=variant,
        num_params=case.num_params,
        description=case.description,
    )
