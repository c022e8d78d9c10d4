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


# ---------------------------------------------------------------------------------------------
# Entry validation (AbstractLinearSolver.__call__): every registered solver gets it
# ---------------------------------------------------------------------------------------------

# (id, matvec, b, x0, exception, regex); "{name}" is replaced by the solver's class name
_BAD_CALLS = [
    (
        "int_b",
        lambda v: 2 * v,
        torch.ones(3, dtype=torch.int64),
        None,
        TypeError,
        r"{name}: `b` has dtype torch\.int64; linear solves need a real floating-point right-hand side",
    ),
    (
        "bool_b_leaf",
        lambda v: v,
        {"m": torch.ones(2, dtype=torch.bool)},
        None,
        TypeError,
        r"`b\['m'\]` has dtype torch\.bool",
    ),
    (
        "complex_b",
        lambda v: v,
        torch.ones(2, dtype=torch.complex128),
        None,
        TypeError,
        r"`b` has dtype torch\.complex128",
    ),
    ("empty_dict_b", lambda v: v, {}, None, ValueError, r"{name}: `b` is an empty dict"),
    ("b_leaf_list", lambda v: v, {"w": [1.0, 2.0]}, None, TypeError, r"{name}: `b\['w'\]` must be a Tensor, got list"),
    (
        "b_tuple",
        lambda v: v,
        (torch.ones(2),),
        None,
        TypeError,
        r"{name}: `b` must be a Tensor or a dict of tensors, got tuple",
    ),
    (
        "meta_b",
        lambda v: v,
        torch.ones(3, dtype=F64, device="meta"),
        None,
        ValueError,
        r"{name}: `b` is on the meta device",
    ),
    (
        "matvec_other_shape",
        lambda v: torch.ones(4, dtype=F64),
        torch.ones(3, dtype=F64),
        None,
        ValueError,
        r"{name}: `matvec\(v\)` has shape \(4,\) but `b` has shape \(3,\).*A linear map v -> A v must return",
    ),
    (
        "matvec_broadcastable_shape",
        lambda v: 2.0 * v.sum().reshape(1),
        torch.ones(3, dtype=F64),
        None,
        ValueError,
        r"`matvec\(v\)` has shape \(1,\) but `b` has shape \(3,\)",
    ),
    (
        "matvec_other_keys",
        lambda v: {"u": 2 * v["w"]},
        {"w": torch.ones(3, dtype=F64)},
        None,
        ValueError,
        r"{name}: `matvec\(v\)` must have the same keys as `b`: missing \['w'\], unexpected \['u'\]",
    ),
    (
        "matvec_extra_key",
        lambda v: {**v, "extra": torch.ones(1, dtype=F64)},
        {"w": torch.ones(3, dtype=F64)},
        None,
        ValueError,
        r"`matvec\(v\)` must have the same keys as `b`: missing \[\], unexpected \['extra'\]",
    ),
    (
        "matvec_other_dtype",
        lambda v: v.float(),
        torch.ones(3, dtype=F64),
        None,
        ValueError,
        r"{name}: `matvec\(v\)` has dtype torch\.float32 but `b` has dtype torch\.float64",
    ),
    (
        "matvec_list",
        lambda v: v.tolist(),
        torch.ones(3, dtype=F64),
        None,
        TypeError,
        r"{name}: `matvec` must return a Tensor like `b`, got list",
    ),
    (
        "matvec_tensor_for_dict",
        lambda v: v["w"],
        {"w": torch.ones(3, dtype=F64)},
        None,
        TypeError,
        r"`matvec\(v\)` must be a dict of tensors keyed like `b`, got Tensor",
    ),
    (
        "matvec_meta",
        lambda v: v.to("meta"),
        torch.ones(3, dtype=F64),
        None,
        ValueError,
        r"`matvec\(v\)` is on meta but `b` is on cpu",
    ),
    (
        "x0_meta",
        lambda v: v,
        torch.ones(3, dtype=F64),
        torch.zeros(3, dtype=F64, device="meta"),
        ValueError,
        r"{name}: `x0` is on meta but `b` is on cpu",
    ),
    (
        "x0_keys",
        lambda v: v,
        {"w": torch.ones(3, dtype=F64)},
        {"v": torch.ones(3, dtype=F64)},
        ValueError,
        r"{name}: `x0` must have the same keys as `b`: missing \['w'\], unexpected \['v'\]",
    ),
    (
        "x0_shape",
        lambda v: v,
        torch.ones(3, dtype=F64),
        torch.ones(1, dtype=F64),
        ValueError,
        r"{name}: `x0` has shape \(1,\) but `b` has shape \(3,\)",
    ),
    (
        "x0_dtype",
        lambda v: v,
        torch.ones(3, dtype=F64),
        torch.ones(3, dtype=torch.float32),
        ValueError,
        r"`x0` has dtype torch\.float32 but `b` has dtype torch\.float64.*\.to\(torch\.float64\)",
    ),
    (
        "x0_dict_for_tensor",
        lambda v: v,
        torch.ones(3, dtype=F64),
        {"w": torch.ones(3)},
        TypeError,
        r"`x0` must be a Tensor like `b`, got dict",
    ),
]


@pytest.mark.parametrize("entry", SOLVERS, ids=repr)
@pytest.mark.parametrize(
    ("matvec", "b", "x0", "exc", "regex"), [c[1:] for c in _BAD_CALLS], ids=[c[0] for c in _BAD_CALLS]
)
def test_entry_validation(entry: SolverEntry, matvec, b, x0, exc: type[Exception], regex: str) -> None:
    solver = entry.factory(info(3, max_steps=3))
    if "matvec" in regex and "approximate" in entry.tags:
        sol = solver(matvec, b, x0)  # Identity never calls matvec: nothing to check, and nothing wrong returned
        assert sol.x is b and sol.num_matvecs == 0
        return
    with pytest.raises(exc, match=regex.replace("{name}", type(solver).__name__)):
        solver(matvec, b, x0)


def test_later_bad_output_is_still_refused_by_the_tree_arithmetic() -> None:
    """Only the first output is checked at the entry; a map that changes shape later hits tree_axpy's check."""
    calls = []

    def matvec(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return 2 * v if len(calls) == 1 else torch.ones(1, dtype=F64)

    with pytest.raises(ValueError, match=r"tree_(vdot|axpy): .* has shape \(1,\) but .* has shape \(3,\)"):
        CG(max_steps=3)(matvec, torch.tensor([1.0, 2.0, 3.0], dtype=F64))


def test_issue_int_rhs_is_no_longer_zeros_with_fixed_budget() -> None:
    with pytest.raises(TypeError, match=r"CG: `b` has dtype torch\.int64.*Cast it, e\.g\. b\.double\(\)"):
        CG(max_steps=3)(lambda v: 2 * v, torch.ones(3, dtype=torch.int64))


@pytest.mark.parametrize("entry", solvers_with(exclude={"approximate"}), ids=repr)
def test_matvec_checked_once_without_extra_calls(entry: SolverEntry) -> None:
    """The output check costs no matvec: every call the solver makes is one it counts."""
    a, b = spd_system(6, LO, HI, seed=12)
    calls = []

    def matvec(v: torch.Tensor) -> torch.Tensor:
        calls.append(v)
        return a @ v

    sol = entry.factory(info(6, rtol=1e-10))(matvec, b)
    assert sol.converged
    if entry.name != "Dense":  # Dense's n matvecs are one vmapped call
        assert sol.num_matvecs == len(calls)


class _TaggedOperator:
    symmetric = True

    def __init__(self, a: torch.Tensor):
        self.a = a

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.a @ v


def test_operator_attributes_are_visible_to_the_solver(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = spd_system(4, LO, HI, seed=13)
    seen = {}
    real = CG._solve

    def spy(self, matvec, b, x0):
        seen["symmetric"], seen["a"] = matvec.symmetric, matvec.a
        return real(self, matvec, b, x0)

    monkeypatch.setattr(CG, "_solve", spy)
    CG(max_steps=4)(_TaggedOperator(a), b)
    assert seen["symmetric"] is True and seen["a"] is a


def test_mixed_dtype_tree_keeps_leaf_dtypes() -> None:
    a, b = spd_system(5, LO, HI, seed=14)
    bt = {"a": b[:3].reshape(3, 1).float(), "b": b[3:]}

    def matvec(t):
        y = a @ torch.cat([t["a"].double().reshape(-1), t["b"]])
        return {"a": y[:3].reshape(3, 1).float(), "b": y[3:]}

    for solver in (CG(max_steps=10, rtol=1e-6), Dense()):
        sol = solver(matvec, bt)
        assert sol.x["a"].dtype == torch.float32 and sol.x["b"].dtype == F64
        exact = torch.linalg.solve(a, torch.cat([bt["a"].double().reshape(-1), bt["b"]]))
        got = torch.cat([sol.x["a"].double().reshape(-1), sol.x["b"]])
        assert float(torch.linalg.vector_norm(got - exact) / torch.linalg.vector_norm(exact)) < 1e-5


# ---------------------------------------------------------------------------------------------
# FIXED_BUDGET judged by its residual: budget_rtol, against a dense reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ITERATIVE, ids=repr)
@pytest.mark.parametrize("steps", [2, 6, 40])
def test_budget_rtol_against_dense_reference(entry: SolverEntry, steps: int) -> None:
    a, b = spd_system(12, LO, HI, seed=15)
    exact = torch.linalg.solve(a, b)
    budget_rtol = 1e-6
    plain = entry.factory(info(12, rtol=0.0, max_steps=steps))
    judged = dataclasses.replace(plain, budget_rtol=budget_rtol)
    ref, sol = plain(lambda v: a @ v, b), judged(lambda v: a @ v, b)
    assert ref.status is Status.FIXED_BUDGET and not ref.failed
    # same iterates, no extra matvec (setup matvecs of a preconditioner or recycled basis excluded)
    assert torch.equal(sol.x, ref.x) and sol.num_matvecs == ref.num_matvecs
    assert ref.num_matvecs - ref.stats.get("setup_matvecs", 0) == steps
    true_rel = float(torch.linalg.vector_norm(b - a @ sol.x) / torch.linalg.vector_norm(b))
    assert sol.relative_residual == pytest.approx(true_rel, rel=1e-4, abs=1e-14)
    assert ref.relative_residual == sol.relative_residual and sol.b_norm == pytest.approx(float(b.norm()), rel=1e-12)
    if true_rel <= budget_rtol * 0.5:
        assert sol.status is Status.SUCCESS and sol.converged and not sol.failed
        # a small relative residual means a small error: ||x - x*|| <= cond(A) * rel * ||x*||
        err = float(torch.linalg.vector_norm(sol.x - exact) / torch.linalg.vector_norm(exact))
        assert err <= (HI / LO) * budget_rtol
    elif true_rel >= budget_rtol * 2:
        assert sol.status is Status.MAX_STEPS_REACHED and sol.failed and sol.stats["budget_rtol"] == budget_rtol
        with pytest.raises(SolverError, match=r"'max_steps_reached'.*`budget_rtol` checked after the fixed budget"):
            sol.raise_if_failed(judged)
    if steps == 2:
        assert sol.failed  # two steps are nowhere near 1e-6 on this system: no longer a silent success
    if steps == 40 and entry.name == "CG":
        assert sol.converged  # CG on 12 unknowns is exact after 12 steps


def test_budget_rtol_on_identity_spends_one_matvec() -> None:
    a, b = spd_system(5, LO, HI, seed=16)
    true_rel = float(torch.linalg.vector_norm(b - a @ b) / torch.linalg.vector_norm(b))
    loose, tight = hypergrad.Identity(budget_rtol=2 * true_rel), hypergrad.Identity(budget_rtol=true_rel / 2)
    for solver, ok in ((loose, True), (tight, False)):
        sol = solver(lambda v: a @ v, b)
        assert sol.num_matvecs == 1 and sol.relative_residual == pytest.approx(true_rel, rel=1e-12)
        assert sol.failed is not ok
    assert hypergrad.Identity()(lambda v: a @ v, b).relative_residual is None  # no claim, no matvec


def test_budget_rtol_leaves_tolerance_statuses_alone() -> None:
    a, b = spd_system(8, LO, HI, seed=17)
    sol = CG(max_steps=2, rtol=1e-12, budget_rtol=0.9)(lambda v: a @ v, b)
    assert sol.status is Status.MAX_STEPS_REACHED and "budget_rtol" not in sol.stats
    neg = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=F64))
    assert (
        CG(max_steps=5, budget_rtol=0.99)(lambda v: neg @ v, torch.ones(3, dtype=F64)).status
        is Status.NEGATIVE_CURVATURE
    )


@pytest.mark.parametrize("entry", SOLVERS, ids=repr)
def test_budget_rtol_is_a_validated_keyword_on_every_solver(entry: SolverEntry) -> None:
    solver = entry.factory(info(4))
    name = type(solver).__name__
    for bad in (-1.0, float("nan"), float("inf"), "1e-3", True):
        with pytest.raises(ValueError, match=rf"{name}: `budget_rtol` must be a finite number >= 0"):
            dataclasses.replace(solver, budget_rtol=bad)
    judged = dataclasses.replace(solver, budget_rtol=1e-4)
    assert "budget_rtol=0.0001" in repr(judged) and "budget_rtol" not in repr(solver)
    assert judged != solver and judged == dataclasses.replace(solver, budget_rtol=1e-4)
