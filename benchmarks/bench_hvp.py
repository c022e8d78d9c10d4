"""HVP modes per model: the cost of one HVP against one gradient, and of K HVPs in a solve.

Two benchmarks per model (group ``hvp:<model>``), all in one process so that ratios are taken
side by side:

* ``test_hvp_cost[model-op]``: ``op`` is ``grad`` (one ``torch.func.grad``, the unit) or an HVP
  mode; the timed call builds :class:`hypergrad.HessianOperator` and applies it once (so
  ``rev_rev_cached`` pays for its graph here). The result is compared after timing with an HVP
  from another mode (float32; finite differences get a loose check and report their error).
* ``test_hvp_solve[model-mode-K]``: a BiSSL-shaped proximal solve
  :func:`hypergrad.proximal_grad` with ``CG(max_steps=K)``, i.e. one operator and ``K`` HVPs;
  here ``rev_rev_cached`` amortises its graph.

Run: ``python -m pytest benchmarks/bench_hvp.py --preset full --benchmark-json=hvp.json``.
"""

from __future__ import annotations

import math

import pytest
import torch

import hypergrad

from .conftest import SOLVE_STEPS
from .measure import record, rel_error, synced
from .models import MODELS

MODES = ("fwd_rev", "rev_rev", "rev_rev_cached", "finite_diff")
_REFERENCE = {"fwd_rev": "rev_rev", "rev_rev": "fwd_rev", "rev_rev_cached": "fwd_rev", "finite_diff": "fwd_rev"}


def _direction(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {k: torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for k, p in params.items()}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    preset = metafunc.config.getoption("--preset")
    if "hvp_op" in metafunc.fixturenames:
        metafunc.parametrize(
            "hvp_op", [pytest.param((m, op), id=f"{m}-{op}") for m in MODELS for op in ("grad",) + MODES]
        )
    if "solve_spec" in metafunc.fixturenames:
        metafunc.parametrize(
            "solve_spec",
            [
                pytest.param((m, mode, k), id=f"{m}-{mode}-K{k}")
                for m in MODELS
                for mode in MODES
                for k in SOLVE_STEPS[preset]
            ],
        )


def test_hvp_cost(benchmark, models, device: str, hvp_op: tuple) -> None:
    model, op = hvp_op
    case = models(model)
    v = _direction(case.params)
    if op == "grad":

        def fn():
            return torch.func.grad(case.fn)(case.params)
    else:

        def fn():
            return hypergrad.HessianOperator(case.fn, case.params, mode=op)(v)

    benchmark.group = f"hvp:{model}"
    out = benchmark(synced(fn, device))

    info = dict(kind="hvp", model=model, op=op, num_params=case.num_params, description=case.description)
    assert all(bool(torch.isfinite(t).all()) for t in out.values())
    if op != "grad":
        ref = hypergrad.hvp(case.fn, case.params, v, mode=_REFERENCE[op])
        err = rel_error(out, ref)
        info["rel_err_vs_" + _REFERENCE[op]] = err
        if op == "finite_diff":
            # Central differences of float32 gradients: about eps^(2/3) relative at best, and worse
            # where ReLU kinks lie within the step (reported, checked only for sanity).
            assert math.isfinite(err)
        else:
            assert err <= 1e-3, f"{op} HVP disagrees with {_REFERENCE[op]}: rel_err={err:.2e}"
    record(benchmark, fn, device, **info)


def test_hvp_solve(benchmark, models, device: str, solve_spec: tuple) -> None:
    model, mode, k = solve_spec
    case = models(model)
    b = _direction(case.params)
    lam = 10.0  # proximal strength: I + H / lam is positive definite for these losses near init

    def fn():
        return hypergrad.proximal_grad(
            case.fn, case.params, b, lam=lam, solver=hypergrad.CG(max_steps=k), hvp_mode=mode
        )

    benchmark.group = f"hvp:{model}"
    result = benchmark(synced(fn, device))

    assert result.solution.num_matvecs == k
    assert all(bool(torch.isfinite(t).all()) for t in result.grad.values())
    info = dict(
        kind="hvp_solve",
        model=model,
        op=f"cg{k}[{mode}]",
        mode=mode,
        budget=k,
        num_params=case.num_params,
        num_hvps=result.solution.num_matvecs,
        residual_norm=result.solution.residual_norm,
        status=result.solution.status.value,
    )
    if mode != "fwd_rev":
        ref = hypergrad.proximal_grad(
            case.fn, case.params, b, lam=lam, solver=hypergrad.CG(max_steps=k), hvp_mode="fwd_rev"
        )
        err = rel_error(result.grad, ref.grad)
        info["rel_err_vs_fwd_rev"] = err
        if mode != "finite_diff":
            assert err <= 1e-3, f"CG with {mode} HVPs disagrees with fwd_rev: rel_err={err:.2e}"
    record(benchmark, fn, device, **info)
