"""Linear solvers: the shared contract (over the registry), dense references and failure statuses."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import hypergrad
from hypergrad import CG, Dense, Neumann, Solution, SolverError, Status
from tests.registry import SOLVERS, ProblemInfo, SolverEntry, solvers_with

F64 = torch.float64
ACCURATE = solvers_with(exclude={"approximate"})
ITERATIVE = solvers_with(include={"iterative"})


def spd_system(n: int, lo: float, hi: float, seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A random SPD matrix with eigenvalues log-spaced in [lo, hi] and a random right-hand side."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    eig = torch.logspace(math.log10(lo), math.log10(hi), n, dtype=F64)
    a = (q * eig) @ q.T
    a = 0.5 * (a + a.T)
    return a.to(device), torch.randn(n, generator=gen, dtype=F64).to(device)


# Spectrum inside (0, 2) so that every solver, unit-step Richardson included, converges.
LO, HI = 0.2, 1.5


def info(n: int, **kw) -> ProblemInfo:
    return ProblemInfo(lambda_min=LO, lambda_max=HI, size=n, **kw)


def as_tree(v: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"a": v[:3].reshape(3, 1), "b": v[3:]}


def from_tree(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t["a"].reshape(-1), t["b"]])


def tree_matvec(a: torch.Tensor):
    return lambda t: as_tree(a @ from_tree(t))


# ---------------------------------------------------------------------------------------------
# Contract: every registered solver
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", SOLVERS, ids=repr)
@pytest.mark.parametrize("kind", ["tensor", "dict"])
def test_contract_solution_fields_and_shapes(entry: SolverEntry, kind: str) -> None:
    a, b = spd_system(8, LO, HI, seed=1)
    solver = entry.factory(info(8))
    assert isinstance(solver, hypergrad.AbstractLinearSolver)
    with pytest.raises(dataclasses.FrozenInstanceError):  # settings cannot change after validation
        solver.max_steps = 3  # type: ignore[misc]
    if kind == "tensor":
        sol = solver(lambda v: a @ v, b)
        assert isinstance(sol.x, torch.Tensor) and sol.x.shape == b.shape and sol.x.dtype == b.dtype
        x = sol.x
    else:
        bt = as_tree(b)
        sol = solver(tree_matvec(a), bt)
        assert isinstance(sol.x, dict) and set(sol.x) == {"a", "b"}
        assert all(sol.x[k].shape == bt[k].shape and sol.x[k].dtype == F64 for k in bt)
        x = from_tree(sol.x)
    assert isinstance(sol, Solution) and isinstance(sol.status, Status)
    assert isinstance(sol.num_steps, int) and isinstance(sol.num_matvecs, int) and isinstance(sol.stats, dict)
    assert sol.converged == (sol.status is Status.SUCCESS)
    assert sol.failed == sol.status.failed
    assert not sol.failed
    assert sol.raise_if_failed() is sol
    if "approximate" in entry.tags:
        assert sol.status is Status.FIXED_BUDGET and sol.residual_norm is None and sol.num_matvecs == 0
        assert torch.equal(x, b)
    else:
        assert sol.status is Status.SUCCESS
        true_res = float(torch.linalg.vector_norm(b - a @ x))
        assert sol.residual_norm == pytest.approx(true_res, rel=1e-3, abs=1e-12 * float(b.norm()))


@pytest.mark.parametrize("entry", ITERATIVE, ids=repr)
@pytest.mark.parametrize("kind", ["tensor", "dict"])
def test_contract_warm_start_reduces_steps(entry: SolverEntry, kind: str) -> None:
    a, b = spd_system(12, LO, HI, seed=2)
    exact = torch.linalg.solve(a, b)
    x0 = exact + 1e-6 * torch.randn(12, dtype=F64)
    solver = entry.factory(info(12, rtol=1e-10))
    if kind == "tensor":
        cold, warm = solver(lambda v: a @ v, b), solver(lambda v: a @ v, b, x0)
        x_warm = warm.x
    else:
        cold, warm = solver(tree_matvec(a), as_tree(b)), solver(tree_matvec(a), as_tree(b), as_tree(x0))
        x_warm = from_tree(warm.x)
    assert cold.converged and warm.converged
    assert warm.num_steps < cold.num_steps
    setup = warm.stats.get("setup_matvecs", 0)  # a preconditioner or recycled basis, built once per operator
    assert warm.num_matvecs == warm.num_steps + 1 + setup  # + the initial residual b - A x0
    assert torch.linalg.vector_norm(x_warm - exact) <= 1e-8 * torch.linalg.vector_norm(exact)


@pytest.mark.parametrize("entry", ITERATIVE, ids=repr)
@pytest.mark.parametrize("with_x0", [False, True])
def test_contract_fixed_budget_runs_exactly_max_steps(entry: SolverEntry, with_x0: bool) -> None:
    a, b = spd_system(10, LO, HI, seed=3)
    solver = entry.factory(info(10, rtol=0.0, max_steps=4))
    calls = []

    def matvec(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return a @ v

    sol = solver(matvec, b, torch.zeros(10, dtype=F64) if with_x0 else None)
    assert sol.status is Status.FIXED_BUDGET and not sol.converged and not sol.failed
    assert sol.num_steps == 4
    assert sol.num_matvecs == len(calls) == 4 + int(with_x0) + sol.stats.get("setup_matvecs", 0)
    assert sol.residual_norm == pytest.approx(float(torch.linalg.vector_norm(b - a @ sol.x)), rel=1e-6)


@pytest.mark.parametrize("entry", ACCURATE, ids=repr)
def test_contract_converged_start_takes_no_step(entry: SolverEntry) -> None:
    a, b = spd_system(6, LO, HI, seed=4)
    exact = torch.linalg.solve(a, b)
    sol = entry.factory(info(6, rtol=1e-8))(lambda v: a @ v, b, exact)
    assert sol.converged
    if "iterative" in entry.tags:
        assert sol.num_steps == 0 and sol.num_matvecs == 1


# ---------------------------------------------------------------------------------------------
# Reference: torch.linalg.solve on random SPD systems, float64
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ACCURATE, ids=repr)
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_matches_dense_solve(entry: SolverEntry, seed: int, device: str) -> None:
    n = 30
    a, b = spd_system(n, LO, HI, seed=seed, device=device)
    exact = torch.linalg.solve(a, b)
    sol = entry.factory(info(n))(lambda v: a @ v, b)
    assert sol.converged, sol.status
    assert sol.x.device == b.device
    rel = float(torch.linalg.vector_norm(sol.x - exact) / torch.linalg.vector_norm(exact))
    assert rel <= 1e-8


@pytest.mark.parametrize("entry", solvers_with(exclude={"approximate", "unit_step"}), ids=repr)
def test_reference_ill_conditioned(entry: SolverEntry) -> None:
    """A wider spectrum [1, 100]: CG, Neumann (alpha = 1/lambda_max) and Dense still reach 1e-8."""
    a, b = spd_system(25, 1.0, 100.0, seed=5)
    exact = torch.linalg.solve(a, b)
    sol = entry.factory(ProblemInfo(1.0, 100.0, 25, rtol=1e-13))(lambda v: a @ v, b)
    assert sol.converged
    assert float(torch.linalg.vector_norm(sol.x - exact) / torch.linalg.vector_norm(exact)) <= 1e-8


def test_cg_exact_in_n_steps_on_distinct_eigenvalues() -> None:
    """CG's defining property: at most n steps (here 5 distinct eigenvalues) in exact arithmetic."""
    a, b = spd_system(5, 1.0, 10.0, seed=6)
    sol = CG(max_steps=5)(lambda v: a @ v, b)
    assert sol.status is Status.FIXED_BUDGET
    assert float(torch.linalg.vector_norm(sol.x - torch.linalg.solve(a, b))) <= 1e-10


def test_neumann_partial_sum_formula() -> None:
    """K steps of Neumann from x0 = 0 equal alpha * sum_{k<K} (I - alpha A)^k b, computed densely."""
    a, b = spd_system(6, LO, HI, seed=7)
    alpha, k_steps = 0.7, 5
    m = torch.eye(6, dtype=F64) - alpha * a
    expected = alpha * sum(torch.linalg.matrix_power(m, k) @ b for k in range(k_steps))
    sol = Neumann(max_steps=k_steps, alpha=alpha)(lambda v: a @ v, b)
    torch.testing.assert_close(sol.x, expected, rtol=1e-12, atol=1e-12)


def test_dense_materialize_and_nonsymmetric() -> None:
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(7, 7, generator=gen, dtype=F64) + 5 * torch.eye(7, dtype=F64)
    b = torch.randn(7, generator=gen, dtype=F64)
    torch.testing.assert_close(hypergrad.materialize(lambda v: a @ v, b), a, rtol=0, atol=0)
    sol = Dense()(lambda v: a @ v, b)
    torch.testing.assert_close(sol.x, torch.linalg.solve(a, b), rtol=1e-12, atol=1e-12)
    assert sol.stats["condition_number"] == pytest.approx(float(torch.linalg.cond(a)), rel=1e-8)


# ---------------------------------------------------------------------------------------------
# Failure statuses, really triggered
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rtol", [1e-10, 0.0])
def test_cg_negative_curvature_keeps_x_finite(rtol: float) -> None:
    a = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=F64))
    b = torch.ones(3, dtype=F64)
    sol = CG(max_steps=10, rtol=rtol)(lambda v: a @ v, b)
    assert sol.status is Status.NEGATIVE_CURVATURE and sol.failed
    assert sol.stats["min_curvature"] < 0
    assert bool(torch.isfinite(sol.x).all())
    if rtol > 0:
        # stops at the first negative-curvature direction without stepping along it:
        # x is the first CG iterate, alpha_0 b with alpha_0 = b^T b / b^T A b = 3 / 4
        torch.testing.assert_close(sol.x, 0.75 * b, rtol=1e-14, atol=1e-14)
    with pytest.raises(SolverError, match=r"negative_curvature.*Add damping with `hypergrad\.Damped"):
        sol.raise_if_failed(CG())


def test_cg_damped_fixes_indefinite_operator() -> None:
    a = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=F64))
    b = torch.ones(3, dtype=F64)
    op = hypergrad.Damped(lambda v: a @ v, 1.5)
    sol = CG(max_steps=10, rtol=1e-12)(op, b)
    assert sol.converged
    torch.testing.assert_close(sol.x, torch.linalg.solve(a + 1.5 * torch.eye(3, dtype=F64), b))


@pytest.mark.parametrize("entry", ACCURATE, ids=repr)
@pytest.mark.parametrize("rtol", [1e-10, 0.0])
def test_nonfinite_matvec(entry: SolverEntry, rtol: float) -> None:
    a, b = spd_system(5, LO, HI, seed=9)
    poison = torch.tensor([1.0, 1.0, float("nan"), 1.0, 1.0], dtype=F64)
    sol = entry.factory(info(5, rtol=rtol, max_steps=20))(lambda v: poison * (a @ v), b)
    assert sol.status is Status.NONFINITE and sol.failed
    with pytest.raises(SolverError, match=r"nonfinite.*Check that the losses and the inner solution are finite"):
        sol.raise_if_failed()


@pytest.mark.parametrize("rtol", [1e-10, 0.0])
def test_neumann_diverges_with_too_large_alpha(rtol: float) -> None:
    a, b = spd_system(6, LO, HI, seed=10)
    sol = Neumann(max_steps=50, alpha=3.0 / HI, rtol=rtol)(lambda v: a @ v, b)  # needs alpha < 2 / lambda_max
    assert sol.status is Status.DIVERGED and sol.failed
    if rtol > 0:
        assert sol.num_steps < 50  # stopped as soon as the residual blew up
    with pytest.raises(SolverError, match=r"diverged.*alpha < 2 / lambda_max\(A\): lower `alpha`"):
        sol.raise_if_failed(Neumann())


@pytest.mark.parametrize("entry", ITERATIVE, ids=repr)
def test_max_steps_reached(entry: SolverEntry) -> None:
    a, b = spd_system(20, LO, HI, seed=11)
    sol = entry.factory(info(20, rtol=1e-12, max_steps=2))(lambda v: a @ v, b)
    assert sol.status is Status.MAX_STEPS_REACHED and sol.failed and not sol.converged
    assert sol.num_steps == 2
    with pytest.raises(SolverError, match=r"'max_steps_reached' after 2 steps.*Try increasing `max_steps`"):
        sol.raise_if_failed(entry.factory(info(20)))


def test_dense_singular() -> None:
    a = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=F64)
    sol = Dense()(lambda v: a @ v, torch.ones(2, dtype=F64))
    assert sol.status is Status.SINGULAR and sol.failed
    with pytest.raises(SolverError, match=r"Dense failed with status 'singular'.*Add damping"):
        sol.raise_if_failed(Dense())


def test_every_failure_status_has_a_remedy() -> None:
    failed = [s for s in Status if s.failed]
    assert set(failed) == {
        Status.MAX_STEPS_REACHED,
        Status.NONFINITE,
        Status.NEGATIVE_CURVATURE,
        Status.DIVERGED,
        Status.SINGULAR,
    }
    for status in Status:
        assert len(status.message) > 20
    for status in failed:
        assert any(w in status.message for w in ("Try", "Add", "lower", "Check", "increase"))
