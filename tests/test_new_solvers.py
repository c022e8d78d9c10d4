"""MINRES, PCG with its preconditioners and RecycledLanczos against dense references (float64).

The generic contract (fields, fixed budgets, warm starts, failure statuses) runs over the registry
in ``tests/test_solvers.py``; here: what is specific to each solver - indefinite systems, the
preconditioners' effect, the per-operator cache and the recycling of one basis over many
right-hand sides, with its residual check and fallback.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

import hypergrad
from hypergrad import CG, MINRES, PCG, HutchinsonDiagonal, Nystrom, RecycledLanczos, Status

F64 = torch.float64


def sym_system(n: int, eigs: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    a = (q * eigs) @ q.T
    return 0.5 * (a + a.T), torch.randn(n, generator=gen, dtype=F64)


def indefinite(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues in [-3, -0.3] u [0.3, 5]: symmetric, indefinite, well separated from 0."""
    gen = torch.Generator().manual_seed(100 + seed)
    neg = -torch.empty(n // 3, dtype=F64).uniform_(0.3, 3.0, generator=gen)
    pos = torch.empty(n - n // 3, dtype=F64).uniform_(0.3, 5.0, generator=gen)
    return sym_system(n, torch.cat([neg, pos]), seed)


def bissl_like(n: int, outliers: int, seed: int) -> torch.Tensor:
    """I + H/lam: a few large outlying eigenvalues over a bulk near 1 (a network's Hessian)."""
    gen = torch.Generator().manual_seed(200 + seed)
    eig = 1.0 + 0.05 * torch.rand(n, generator=gen, dtype=F64)
    eig[:outliers] = torch.logspace(1, 3, outliers, dtype=F64)
    return sym_system(n, eig, seed)[0]


def as_tree(v: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"w": v[:6].reshape(2, 3), "b": v[6:]}


def from_tree(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t["w"].reshape(-1), t["b"]])


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y))


# ---------------------------------------------------------------------------------------------
# MINRES
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["tensor", "tree"])
def test_minres_solves_indefinite_systems_where_cg_fails(seed: int, kind: str) -> None:
    a, b = indefinite(24, seed)
    exact = torch.linalg.solve(a, b)
    if kind == "tensor":
        sol = MINRES(max_steps=200, rtol=1e-12)(lambda v: a @ v, b)
        x = sol.x
    else:
        sol = MINRES(max_steps=200, rtol=1e-12)(lambda t: as_tree(a @ from_tree(t)), as_tree(b))
        assert set(sol.x) == {"w", "b"} and sol.x["w"].shape == (2, 3)
        x = from_tree(sol.x)
    assert sol.status is Status.SUCCESS and sol.stats["indefinite"]
    assert rel(x, exact) <= 1e-9
    assert sol.residual_norm == pytest.approx(float(torch.linalg.vector_norm(b - a @ x)), rel=1e-3, abs=1e-10)
    cg = CG(max_steps=200, rtol=1e-12)(lambda v: a @ v, b)
    assert cg.status is Status.NEGATIVE_CURVATURE


def test_minres_residual_is_monotone_and_optimal_over_the_krylov_space() -> None:
    """x_k minimises ||b - A x|| over K_k(A, b): compare with a dense least-squares on the basis."""
    a, b = indefinite(15, 3)
    prev = float("inf")
    for k in range(1, 7):
        sol = MINRES(max_steps=k)(lambda v: a @ v, b)
        assert sol.status is Status.FIXED_BUDGET
        basis = torch.stack([torch.linalg.matrix_power(a, j) @ b for j in range(k)], dim=1)
        coef = torch.linalg.lstsq(a @ basis, b.unsqueeze(1)).solution
        best = float(torch.linalg.vector_norm(b - a @ basis @ coef.squeeze(1)))
        assert sol.residual_norm == pytest.approx(best, rel=1e-6)
        assert sol.residual_norm <= prev + 1e-12
        prev = sol.residual_norm


def test_minres_fixed_budget_spends_exactly_max_steps() -> None:
    """With rtol = atol = 0 MINRES runs exactly max_steps matvecs (no early exit, no extra residual matvec)."""
    a, b = indefinite(10, 4)
    calls = []

    def matvec(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return a @ v

    sol = MINRES(max_steps=5)(matvec, b)
    assert len(calls) == 5 and sol.num_matvecs == 5 and sol.status is Status.FIXED_BUDGET


# ---------------------------------------------------------------------------------------------
# PCG and preconditioners
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pre",
    [Nystrom(rank=6), Nystrom(rank=10, sketch="random"), HutchinsonDiagonal(num_samples=16)],
    ids=["nystrom_lanczos", "nystrom_random", "hutchinson"],
)
def test_pcg_matches_dense_solve_and_saves_steps(pre) -> None:
    n = 60
    a = bissl_like(n, outliers=5, seed=0)  # a few outliers, for the low-rank preconditioners to deflate
    if isinstance(pre, HutchinsonDiagonal):  # a badly scaled, diagonally dominant matrix, for Jacobi
        d = torch.logspace(0, 2, n, dtype=F64)
        a = d.sqrt()[:, None] * bissl_like(n, outliers=0, seed=0) * d.sqrt()[None, :]
    b = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=F64)
    exact = torch.linalg.solve(a, b)
    cg = CG(max_steps=500, rtol=1e-10)(lambda v: a @ v, b)
    sol = PCG(preconditioner=pre, max_steps=500, rtol=1e-10)(lambda v: a @ v, b)
    assert sol.converged and cg.converged
    assert rel(sol.x, exact) <= 1e-8
    assert sol.num_steps < cg.num_steps, (sol.num_steps, cg.num_steps)


def test_nystrom_random_is_exact_at_full_rank_and_hutchinson_is_unbiased() -> None:
    a, _ = sym_system(8, torch.linspace(1, 20, 8, dtype=F64), 7)
    built = Nystrom(rank=8, sketch="random").build(lambda v: a @ v, torch.ones(8, dtype=F64))
    x = torch.randn(8, dtype=F64)
    torch.testing.assert_close(built.apply(a @ x), x, rtol=1e-8, atol=1e-8)
    est = HutchinsonDiagonal(num_samples=4000, seed=1).build(lambda v: a @ v, torch.ones(8, dtype=F64))
    diag_est = 1.0 / est.apply(torch.ones(8, dtype=F64))
    assert rel(diag_est, torch.diagonal(a)) < 0.1  # Monte Carlo: error ~ 1/sqrt(4000) x off-diagonal mass


def test_pcg_builds_the_preconditioner_once_per_operator_object() -> None:
    a = bissl_like(30, 3, 1)
    solver = PCG(preconditioner=Nystrom(rank=4), max_steps=100, rtol=1e-10)
    op = lambda v: a @ v
    rhs = [torch.randn(30, dtype=F64) for _ in range(3)]
    sols = [solver(op, b) for b in rhs]
    assert [s.stats["setup_matvecs"] for s in sols] == [4, 0, 0]
    for s, b in zip(sols, rhs):
        assert s.converged and rel(s.x, torch.linalg.solve(a, b)) <= 1e-8
    other = lambda v: 2.0 * (a @ v)
    s = solver(other, rhs[0])
    assert s.stats["setup_matvecs"] == 4 and rel(s.x, torch.linalg.solve(2 * a, rhs[0])) <= 1e-8
    solver.reset()
    assert solver(other, rhs[1]).stats["setup_matvecs"] == 4


# ---------------------------------------------------------------------------------------------
# RecycledLanczos
# ---------------------------------------------------------------------------------------------


def test_recycling_serves_many_right_hand_sides_with_few_matvecs() -> None:
    n, n_rhs = 80, 8
    a = bissl_like(n, outliers=6, seed=2)
    op = lambda v: a @ v
    gen = torch.Generator().manual_seed(3)
    rhs = [torch.randn(n, generator=gen, dtype=F64) for _ in range(n_rhs)]
    solver = RecycledLanczos(basis_size=10, max_steps=50, rtol=1e-8)
    cold = CG(max_steps=500, rtol=1e-8)
    rec_mv = cold_mv = 0
    for i, b in enumerate(rhs):
        s = solver(op, b)
        c = cold(op, b)
        assert s.converged and c.converged
        assert s.stats["recycled"] == (i > 0) and s.stats["fallback"] is None
        assert rel(s.x, torch.linalg.solve(a, b)) <= 1e-6
        rec_mv += s.num_matvecs
        cold_mv += c.num_matvecs
    assert 2 * rec_mv <= cold_mv, (rec_mv, cold_mv)  # basis included; measured: 46 vs 117


def test_recycling_residual_check_catches_a_matrix_changed_in_place() -> None:
    """Same operator object, different matrix: the recycled guess is refined, never trusted blindly."""
    a = bissl_like(40, 4, 4)
    m = a.clone()
    op = lambda v: m @ v
    solver = RecycledLanczos(basis_size=6, max_steps=200, rtol=1e-10)
    solver(op, torch.ones(40, dtype=F64))
    m.copy_(a + torch.diag(torch.linspace(0, 30, 40, dtype=F64)))  # in place, same object
    b = torch.randn(40, dtype=F64)
    s = solver(op, b)
    assert s.stats["recycled"] and s.converged
    assert rel(s.x, torch.linalg.solve(m, b)) <= 1e-8


def test_recycling_falls_back_to_minres_on_an_indefinite_system() -> None:
    a, b = indefinite(30, 5)
    solver = RecycledLanczos(basis_size=4, max_steps=200, rtol=1e-10)
    s = solver(lambda v: a @ v, b)
    assert s.converged and s.stats["fallback"] == "MINRES"
    assert rel(s.x, torch.linalg.solve(a, b)) <= 1e-8


def test_recycling_with_a_fixed_budget_reports_and_counts() -> None:
    a = bissl_like(40, 3, 6)
    op = lambda v: a @ v
    solver = RecycledLanczos(basis_size=5, max_steps=3)
    first, second = solver(op, torch.ones(40, dtype=F64)), solver(op, torch.arange(40.0, dtype=F64))
    assert first.status is second.status is Status.FIXED_BUDGET
    assert first.num_matvecs == 5 + 3 and second.num_matvecs == 1 + 3
    for s, b in ((first, torch.ones(40, dtype=F64)), (second, torch.arange(40.0, dtype=F64))):
        assert s.residual_norm == pytest.approx(float(torch.linalg.vector_norm(b - a @ s.x)), rel=1e-6)


def test_cache_is_tied_to_the_object_weakly_and_copies_start_empty() -> None:
    a = bissl_like(20, 2, 7)
    solver = RecycledLanczos(basis_size=3, max_steps=50, rtol=1e-8)
    op = lambda v: a @ v
    solver(op, torch.ones(20, dtype=F64))
    assert solver(op, torch.ones(20, dtype=F64)).stats["recycled"]
    # tree of another layout: not served from the tensor basis
    assert not solver(lambda t: {"x": a @ t["x"]}, {"x": torch.ones(20, dtype=F64)}).stats["recycled"]
    for clone in (copy.deepcopy(solver), pickle.loads(pickle.dumps(solver))):
        assert clone == solver and not clone(op, torch.ones(20, dtype=F64)).stats["recycled"]
    del op  # the cache holds no strong reference: the operator (and its graph) can be freed
    import gc

    gc.collect()
    assert repr(solver._cache) == "OperatorCache(empty)"


@pytest.mark.parametrize(
    ("make", "regex"),
    [
        (lambda: MINRES(max_steps=0), r"MINRES: `max_steps` must be an integer >= 1, got 0"),
        (lambda: PCG(preconditioner="nystrom"), r"PCG: `preconditioner` must be a hypergrad preconditioner"),
        (lambda: Nystrom(sketch="gauss"), r"Nystrom: `sketch` must be 'lanczos' or 'random', got 'gauss'"),
        (lambda: HutchinsonDiagonal(num_samples=0), r"HutchinsonDiagonal: `num_samples` must be an integer"),
        (lambda: RecycledLanczos(fallback=CG), r"RecycledLanczos: `fallback` must be None or a hypergrad solver"),
        (lambda: RecycledLanczos(rtol=-1.0), r"RecycledLanczos: `rtol` must be a finite number >= 0"),
    ],
)
def test_bad_settings_name_the_argument(make, regex) -> None:
    with pytest.raises((TypeError, ValueError), match=regex):
        make()


def test_new_solvers_in_proximal_grad_match_the_dense_solution() -> None:
    """End to end through the functional API: BiSSL's (I + H/lam)^{-1} g on a small non-convex loss."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(20, 4, generator=gen, dtype=F64)
    params = {"w": torch.randn(4, 3, generator=gen, dtype=F64)}

    def loss(p):
        return torch.tanh(x @ p["w"]).pow(2).sum()

    g = {"w": torch.randn(4, 3, generator=gen, dtype=F64)}
    ref = hypergrad.proximal_grad(loss, params, g, lam=0.5, solver=hypergrad.Dense())
    for solver in (MINRES(max_steps=100, rtol=1e-12), RecycledLanczos(basis_size=4, max_steps=100, rtol=1e-12)):
        out = hypergrad.proximal_grad(loss, params, g, lam=0.5, solver=solver)
        assert not out.solution.failed
        assert rel(out.grad["w"], ref.grad["w"]) <= 1e-8
    assert math.isfinite(ref.grad["w"].norm().item())


# ---------------------------------------------------------------------------------------------
# RecycledLanczos: converged Ritz pairs only (ritz_tol) and a basis carried to the next operator
# ---------------------------------------------------------------------------------------------


def nearly_singular(n: int, small: int, seed: int) -> torch.Tensor:
    """A damped system close to singular: a few eigenvalues near 0 below a spread bulk in [0.5, 1.6]."""
    gen = torch.Generator().manual_seed(300 + seed)
    eig = torch.empty(n, dtype=F64).uniform_(0.5, 1.6, generator=gen)
    eig[:small] = torch.logspace(-3, -1.5, small, dtype=F64)
    return sym_system(n, eig, seed)[0]


def test_converged_ritz_pairs_deflate_the_small_end_of_a_nearly_singular_system() -> None:
    n, n_rhs = 120, 6
    a = nearly_singular(n, small=3, seed=1)
    op = lambda v: a @ v
    gen = torch.Generator().manual_seed(4)
    rhs = [torch.randn(n, generator=gen, dtype=F64) for _ in range(n_rhs)]
    counts = {}
    for tol in (0.0, 1e-2):
        solver, total = RecycledLanczos(basis_size=30, max_steps=300, rtol=1e-8, ritz_tol=tol), 0
        for b in rhs:
            s = solver(op, b)
            assert s.converged and s.stats["fallback"] is None
            assert rel(s.x, torch.linalg.solve(a, b)) <= 1e-6
            total += s.num_matvecs
        counts[tol] = total
        if tol:  # only converged pairs were kept, among them the three near-zero eigenvalues
            kept = torch.tensor(s.stats["ritz_values"], dtype=F64)
            assert 3 <= kept.numel() < 30
            small = torch.linalg.eigvalsh(a)[:3]
            assert all(float((kept - e).abs().min()) <= 1e-3 * float(e) for e in small), (kept, small)
    cold = sum(CG(max_steps=500, rtol=1e-8)(op, b).num_matvecs for b in rhs)
    assert counts[1e-2] < counts[0.0] and counts[1e-2] <= 0.7 * cold, (counts, cold)  # measured 100, 156, 174


def test_carried_basis_is_refitted_to_a_changed_operator_and_checked() -> None:
    n = 100
    a1 = nearly_singular(n, small=3, seed=2)
    gen = torch.Generator().manual_seed(5)
    e = torch.randn(n, n, generator=gen, dtype=F64)
    a2 = a1 + 1e-4 * (e + e.T)  # the next alternation: the matrix moved a little
    solver = RecycledLanczos(basis_size=16, max_steps=300, rtol=1e-8, ritz_tol=1e-2, carry=True)
    first = solver(lambda v: a1 @ v, torch.randn(n, generator=gen, dtype=F64))
    assert first.converged and not first.stats["carried"]
    kept = len(first.stats["ritz_values"])
    b = torch.randn(n, generator=gen, dtype=F64)
    s = solver(lambda v: a2 @ v, b)  # a new operator object: no recycled basis, a carried one
    assert s.converged and s.stats["carried"] and not s.stats["recycled"]
    assert s.stats["setup_matvecs"] == kept + 1  # one matvec per carried vector + the residual check
    assert rel(s.x, torch.linalg.solve(a2, b)) <= 1e-6
    fresh = RecycledLanczos(basis_size=16, max_steps=300, rtol=1e-8, ritz_tol=1e-2)(lambda v: a2 @ v, b)
    assert s.num_matvecs < fresh.num_matvecs, (s.num_matvecs, fresh.num_matvecs)  # measured 29 vs 41
    # a carried space that no longer fits (a very different matrix) is still solved to tolerance
    a3 = sym_system(n, torch.linspace(0.2, 3.0, n, dtype=F64), 9)[0]
    s3 = solver(lambda v: a3 @ v, b)
    assert s3.converged and rel(s3.x, torch.linalg.solve(a3, b)) <= 1e-6
    for clone in (copy.deepcopy(solver), pickle.loads(pickle.dumps(solver))):
        assert not clone(lambda v: a2 @ v, b).stats["carried"]  # copies carry nothing


@pytest.mark.parametrize(
    "make, regex",
    [
        (lambda: RecycledLanczos(ritz_tol=-1.0), r"RecycledLanczos: `ritz_tol` must be a finite number >= 0"),
        (lambda: RecycledLanczos(carry=1), r"RecycledLanczos: `carry` must be True or False, got 1"),
    ],
)
def test_recycling_new_settings_name_the_argument(make, regex) -> None:
    with pytest.raises((TypeError, ValueError), match=regex):
        make()
