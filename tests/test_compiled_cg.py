"""CompiledCG: the fixed-budget CG loop as one torch.compile graph, its status and its eager fallback.

Compilation here uses the ``"eager"`` backend (dynamo traces the whole loop with ``fullgraph=True``,
so a graph break fails the compile; no C++ kernels are generated, which would take minutes on the
CI's CPUs); the inductor timings live in ``benchmarks/bench_compile.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergrad
from hypergrad import CG, CompiledCG, CompileFallbackWarning, HessianOperator, Status
from hypergrad.solvers import compiled_cg

D = torch.float64


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees no remembered compile failure."""
    monkeypatch.setattr(compiled_cg, "_FAILED", {})


@pytest.fixture(scope="module", autouse=True)
def _dynamo_cache() -> None:
    torch._dynamo.reset()  # this file's graphs count against dynamo's recompile limit alone
    yield
    torch._dynamo.reset()


def _spd(n: int, seed: int, shift: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=D)
    return m @ m.T / n + shift * torch.eye(n, dtype=D)


def _tree_matvec(a: torch.Tensor):  # A acting on the tree {"u": (2,), "w": (2, 2)} flattened in order
    def matvec(v: dict) -> dict:
        flat = a @ torch.cat([v["u"], v["w"].reshape(-1)])
        return {"u": flat[:2], "w": flat[2:].reshape(2, 2)}

    return matvec


def test_matches_a_dense_solve_on_a_tree_in_float64() -> None:
    a = _spd(6, 0)
    g = torch.Generator().manual_seed(1)
    b = {"u": torch.randn(2, generator=g, dtype=D), "w": torch.randn(2, 2, generator=g, dtype=D)}
    sol = CompiledCG(max_steps=6, backend="eager")(_tree_matvec(a), b)  # CG is exact in n steps
    exact = torch.linalg.solve(a, torch.cat([b["u"], b["w"].reshape(-1)]))
    got = torch.cat([sol.x["u"], sol.x["w"].reshape(-1)])
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12)
    assert sol.stats["compiled"] is True and sol.status is Status.FIXED_BUDGET
    assert (sol.num_steps, sol.num_matvecs) == (6, 6)
    assert sol.residual_norm is not None and sol.residual_norm < 1e-10


def test_same_iterates_as_eager_cg_with_a_warm_start() -> None:
    a = _spd(8, 2)
    b = torch.randn(8, generator=torch.Generator().manual_seed(3), dtype=D)
    x0 = torch.full((8,), 0.3, dtype=D)
    got = CompiledCG(max_steps=3, backend="eager")(lambda v: a @ v, b, x0)
    ref = CG(max_steps=3)(lambda v: a @ v, b, x0)
    torch.testing.assert_close(got.x, ref.x, rtol=1e-12, atol=1e-14)
    assert got.num_matvecs == ref.num_matvecs == 4
    assert got.residual_norm == pytest.approx(ref.residual_norm, rel=1e-10)
    assert got.stats["min_curvature"] == pytest.approx(ref.stats["min_curvature"], rel=1e-12)


def test_the_loop_is_one_graph_without_breaks() -> None:
    a = _spd(5, 4)
    explain = torch._dynamo.explain(compiled_cg._cg_steps)(lambda v: a @ v, torch.ones(5, dtype=D), None, 4)
    assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons


def test_compiles_a_torch_func_hessian_operator() -> None:
    """HessianOperator(mode='fwd_rev') traces into the loop; the result is the Hessian's solve."""
    g = torch.Generator().manual_seed(5)
    a = _spd(4, 6)
    theta = {"w": torch.randn(4, generator=g, dtype=D)}

    def f(p: dict) -> torch.Tensor:
        return 0.5 * p["w"] @ (a @ p["w"]) + 0.1 * torch.sum(p["w"] ** 4)

    b = {"w": torch.randn(4, generator=g, dtype=D)}
    sol = CompiledCG(max_steps=4, backend="eager")(HessianOperator(f, theta, mode="fwd_rev"), b)
    hess = torch.func.hessian(lambda w: f({"w": w}))(theta["w"])  # dense reference
    assert sol.stats["compiled"] is True
    torch.testing.assert_close(sol.x["w"], torch.linalg.solve(hess, b["w"]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "a, status",
    [
        (torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=D)), Status.NEGATIVE_CURVATURE),
        (torch.diag(torch.tensor([1.0, float("nan"), 3.0], dtype=D)), Status.NONFINITE),
    ],
    ids=["indefinite", "nan"],
)
def test_a_failed_solve_is_reported(a: torch.Tensor, status: Status) -> None:
    sol = CompiledCG(max_steps=3, backend="eager")(lambda v: a @ v, torch.ones(3, dtype=D))
    assert sol.stats["compiled"] is True
    assert sol.status is status and sol.failed
    with pytest.raises(hypergrad.SolverError, match=status.value):
        sol.raise_if_failed(CompiledCG())


def test_budget_rtol_judges_the_budget_once_after_the_loop() -> None:
    a = torch.diag(torch.tensor([1.0, 10.0, 100.0], dtype=D))
    b = torch.ones(3, dtype=D)
    short = CompiledCG(max_steps=2, backend="eager", budget_rtol=1e-8)(lambda v: a @ v, b)
    full = CompiledCG(max_steps=3, backend="eager", budget_rtol=1e-8)(lambda v: a @ v, b)
    assert short.status is Status.MAX_STEPS_REACHED and short.relative_residual > 1e-8
    assert full.status is Status.SUCCESS and full.relative_residual <= 1e-8
    torch.testing.assert_close(full.x, torch.linalg.solve(a, b), rtol=1e-10, atol=0)


def test_a_failing_compiler_warns_once_and_runs_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn, **kwargs):
        def raise_on_call(*args, **kw):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return raise_on_call

    monkeypatch.setattr(compiled_cg, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken)
    a = _spd(5, 7)
    b = torch.ones(5, dtype=D)
    solver = CompiledCG(max_steps=5)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return a @ v

    with pytest.warns(CompileFallbackWarning, match="No working C\\+\\+ compiler"):
        first = solver(matvec, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)  # once: the second solve does not warn
        second = solver(matvec, b)
    for sol in (first, second):
        assert sol.stats["compiled"] is False and "C++ compiler" in sol.stats["compile_error"]
        torch.testing.assert_close(sol.x, torch.linalg.solve(a, b), rtol=1e-10, atol=1e-12)


def test_a_graph_break_falls_back_with_the_reason() -> None:
    """The cached reverse graph calls torch.autograd.grad, which dynamo does not trace here."""
    a = _spd(4, 8)
    theta = {"w": torch.zeros(4, dtype=D)}
    op = HessianOperator(lambda p: 0.5 * p["w"] @ (a @ p["w"]), theta, mode="rev_rev_cached")
    with pytest.warns(CompileFallbackWarning, match="ran eagerly") as record:
        sol = CompiledCG(max_steps=4, backend="eager")(op, {"w": torch.ones(4, dtype=D)})
    assert sol.stats["compile_error"] in str(record[0].message)
    torch.testing.assert_close(sol.x["w"], torch.linalg.solve(a, torch.ones(4, dtype=D)), rtol=1e-10, atol=1e-12)


def test_a_wrong_matvec_raises_its_own_error_without_a_compile_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        with pytest.raises(ValueError, match="matvec"):
            CompiledCG(max_steps=2, backend="eager")(lambda v: torch.ones(4, dtype=D), torch.ones(3, dtype=D))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(max_steps=0), ValueError, "max_steps"),
        (dict(backend="tvm"), ValueError, "`backend` must be one of"),
        (dict(mode=3), TypeError, "`mode` must be None or"),
        (dict(budget_rtol=-1.0), ValueError, "budget_rtol"),
    ],
)
def test_bad_settings_name_the_argument(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        CompiledCG(**kwargs)


def test_refuses_an_operator_tagged_non_symmetric() -> None:
    class NonSymmetric:
        symmetric = False

        def __call__(self, v: torch.Tensor) -> torch.Tensor:
            return v

    with pytest.raises(ValueError, match="symmetric=False"):
        CompiledCG(max_steps=2, backend="eager")(NonSymmetric(), torch.ones(2, dtype=D))
