"""Hypergradients against closed forms, dense formulas and central finite differences (float64)."""

from __future__ import annotations

import pytest
import torch

import hypergrad
from hypergrad import CG, Dense, Identity, SolverError, Status
from hypergrad.testing import LogisticProblem, QuadraticProblem, RidgeProblem, ToyProblem
from tests.registry import ProblemInfo, SolverEntry, solvers_with

F64 = torch.float64
PROBLEMS = {"quadratic": QuadraticProblem, "ridge": RidgeProblem, "logistic": LogisticProblem}


def rel_err(a: dict, b: dict) -> float:
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b) ** 0.5
    return diff / sum(float((b[k] ** 2).sum()) for k in b) ** 0.5


def setup(name: str, device: str) -> tuple[ToyProblem, dict, dict, tuple[float, float]]:
    prob = PROBLEMS[name](device=device)
    lam = prob.init_hparams()
    return prob, lam, prob.inner_solution(lam), prob.hessian_bounds(lam)


# ---------------------------------------------------------------------------------------------
# Every solver of the registry reaches 1e-8 against the closed form
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", solvers_with(exclude={"approximate", "unit_step"}), ids=repr)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_implicit_grad_matches_exact(entry: SolverEntry, problem: str, device: str) -> None:
    prob, lam, theta, (lo, hi) = setup(problem, device)
    solver = entry.factory(ProblemInfo(lo, hi, prob.num_params, rtol=1e-12))
    g, sol = hypergrad.implicit_grad(prob.inner_loss, prob.outer_loss, theta, lam, solver=solver)
    assert sol.converged, sol.status
    assert set(g) == set(lam) and all(g[k].shape == lam[k].shape and g[k].device == lam[k].device for k in lam)
    assert rel_err(g, prob.exact_hypergradient(lam)) <= 1e-8


@pytest.mark.parametrize("entry", solvers_with(exclude={"approximate"}), ids=repr)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_fixed_point_grad_matches_exact(entry: SolverEntry, problem: str, device: str) -> None:
    """Fixed-point form on the gradient-descent map phi = theta - lr grad G with lr = 1 / lambda_max.

    The adjoint operator I - d(phi)/d(theta)^T = lr H then has its spectrum in [lo/hi, 1].
    """
    prob, lam, theta, (lo, hi) = setup(problem, device)
    lr = 1.0 / hi
    solver = entry.factory(ProblemInfo(lo / hi, 1.0, prob.num_params, rtol=1e-12))
    g, sol = hypergrad.fixed_point_grad(
        lambda p, h: prob.inner_step(p, h, lr),
        prob.outer_loss,
        theta,
        lam,
        solver=solver,
        symmetric="symmetric_only" in entry.tags,
    )
    assert sol.converged, sol.status
    assert rel_err(g, prob.exact_hypergradient(lam)) <= 1e-8


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_rev", "rev_rev_cached", "auto", "finite_diff"])
def test_implicit_grad_every_hvp_mode(mode: str) -> None:
    prob, lam, theta, (lo, hi) = setup("ridge", "cpu")
    g, sol = hypergrad.implicit_grad(
        prob.inner_loss, prob.outer_loss, theta, lam, solver=CG(max_steps=50, rtol=1e-12), hvp_mode=mode
    )
    assert rel_err(g, prob.exact_hypergradient(lam)) <= (1e-6 if mode == "finite_diff" else 1e-8)


def test_identity_is_the_first_order_approximation() -> None:
    """Identity replaces H^-1 by I: grad = c lam + B^T (theta* - t) on the quadratic (closed form)."""
    prob, lam, theta, _ = setup("quadratic", "cpu")
    g, sol = hypergrad.implicit_grad(prob.inner_loss, prob.outer_loss, theta, lam, solver=Identity())
    expected = prob.reg * lam["lam"] + prob.B.T @ (theta["theta"] - prob.target)
    torch.testing.assert_close(g["lam"], expected, rtol=1e-12, atol=1e-12)
    assert sol.status is Status.FIXED_BUDGET and sol.num_matvecs == 0
    assert rel_err(g, prob.exact_hypergradient(lam)) > 0.1  # and it really is only an approximation


def test_damping_solves_the_shifted_system() -> None:
    prob, lam, theta, _ = setup("quadratic", "cpu")
    mu = 0.5
    g, _ = hypergrad.implicit_grad(prob.inner_loss, prob.outer_loss, theta, lam, solver=Dense(), damping=mu)
    shifted = prob.A + mu * torch.eye(prob.dim, dtype=F64)
    expected = prob.reg * lam["lam"] + prob.B.T @ torch.linalg.solve(shifted, theta["theta"] - prob.target)
    torch.testing.assert_close(g["lam"], expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Logistic regression: central finite differences of the re-solved problem
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logistic_fd() -> tuple[LogisticProblem, dict, dict]:
    prob = LogisticProblem()
    lam = {"log_lam": torch.linspace(-3.0, 0.5, prob.dim, dtype=F64)}  # distinct strengths per feature
    return prob, lam, prob.finite_difference_hypergradient(lam, eps=1e-5)


@pytest.mark.parametrize("solver", [CG(max_steps=50, rtol=1e-12), Dense()], ids=["CG", "Dense"])
def test_logistic_matches_central_finite_differences(logistic_fd, solver) -> None:
    prob, lam, fd = logistic_fd
    g, sol = hypergrad.implicit_grad(prob.inner_loss, prob.outer_loss, prob.inner_solution(lam), lam, solver=solver)
    assert sol.converged
    assert float(fd["log_lam"].abs().min()) > 1e-7  # every coordinate is a real, non-zero check
    assert rel_err(g, fd) <= 1e-6
    assert float((g["log_lam"] - fd["log_lam"]).abs().max()) <= 1e-9


def test_logistic_dense_formula_matches_finite_differences(logistic_fd) -> None:
    prob, lam, fd = logistic_fd
    assert rel_err(prob.exact_hypergradient(lam), fd) <= 1e-6


# ---------------------------------------------------------------------------------------------
# Proximal (BiSSL / iMAML) gradient
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", solvers_with(exclude={"approximate"}), ids=repr)
def test_proximal_grad_matches_dense(entry: SolverEntry, device: str) -> None:
    prob = LogisticProblem(device=device)
    lam0 = prob.init_hparams()

    def L(p: dict) -> torch.Tensor:
        return prob.inner_loss(p, lam0)

    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(prob.dim, generator=gen, dtype=F64).to(device)}
    outer = {"w": torch.randn(prob.dim, generator=gen, dtype=F64).to(device)}
    lam = 1.0
    h = torch.func.hessian(L)(params)["w"]["w"]
    eig = torch.linalg.eigvalsh(h)
    solver = entry.factory(ProblemInfo(1 + float(eig[0]) / lam, 1 + float(eig[-1]) / lam, prob.dim, rtol=1e-12))
    g, sol = hypergrad.proximal_grad(L, params, outer, lam=lam, solver=solver)
    expected = lam * torch.linalg.solve(h + lam * torch.eye(prob.dim, dtype=F64, device=device), outer["w"])
    assert sol.converged
    assert float(torch.linalg.vector_norm(g["w"] - expected) / torch.linalg.vector_norm(expected)) <= 1e-8


def test_proximal_grad_identity_is_outer_grad() -> None:
    prob = LogisticProblem()
    outer = {"w": torch.linspace(-1, 1, prob.dim, dtype=F64)}
    g, _ = hypergrad.proximal_grad(
        lambda p: prob.inner_loss(p, prob.init_hparams()), prob.init_params(), outer, lam=2.0, solver=Identity()
    )
    torch.testing.assert_close(g["w"], outer["w"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Unrolled differentiation
# ---------------------------------------------------------------------------------------------


def reference_unrolled(prob: ToyProblem, lam: dict, lr: float, num_steps: int, truncate: int | None) -> tuple:
    """Hand-written reverse mode with plain autograd: K - T steps without graph, then T with."""
    lam = {k: v.clone().requires_grad_(True) for k, v in lam.items()}
    theta = prob.init_params()
    start = num_steps - (truncate if truncate is not None else num_steps)
    with torch.no_grad():
        for _ in range(start):
            theta = {k: theta[k] - lr * g for k, g in prob.inner_grad(theta, lam).items()}
    for _ in range(num_steps - start):
        theta = {k: theta[k] - lr * g for k, g in prob.inner_grad(theta, lam).items()}
    grads = torch.autograd.grad(prob.outer_loss(theta, lam), list(lam.values()))
    return dict(zip(lam, grads)), {k: v.detach() for k, v in theta.items()}


@pytest.mark.parametrize("truncate", [None, 3])
def test_unrolled_matches_hand_written_reference(truncate: int | None) -> None:
    prob, lam, _, (lo, hi) = setup("quadratic", "cpu")
    lr = 1.0 / hi
    g, theta_k = hypergrad.unrolled_grad(
        lambda p, h: prob.inner_step(p, h, lr), prob.outer_loss, prob.init_params(), lam, num_steps=7, truncate=truncate
    )
    g_ref, theta_ref = reference_unrolled(prob, lam, lr, 7, truncate)
    torch.testing.assert_close(g["lam"], g_ref["lam"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(theta_k["theta"], theta_ref["theta"], rtol=1e-12, atol=1e-14)


def test_unrolled_converges_to_implicit(device: str) -> None:
    prob, lam, _, (lo, hi) = setup("ridge", device)
    lr = 1.0 / hi
    exact = prob.exact_hypergradient(lam)
    errors = []
    for k in (5, 20, 100):
        g, _ = hypergrad.unrolled_grad(
            lambda p, h: prob.inner_step(p, h, lr), prob.outer_loss, prob.init_params(), lam, num_steps=k
        )
        errors.append(rel_err(g, exact))
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] > 1e-3 and errors[2] <= 1e-8


def test_truncated_unrolling_differs_and_differentiates_only_t_steps() -> None:
    prob, lam, _, (lo, hi) = setup("quadratic", "cpu")
    lr = 1.0 / hi
    grad_enabled: list[bool] = []

    def step(p: dict, h: dict) -> dict:
        grad_enabled.append(torch.is_grad_enabled())
        return prob.inner_step(p, h, lr)

    full, theta_full = hypergrad.unrolled_grad(step, prob.outer_loss, prob.init_params(), lam, num_steps=8)
    grad_enabled.clear()
    trunc, theta_trunc = hypergrad.unrolled_grad(
        step, prob.outer_loss, prob.init_params(), lam, num_steps=8, truncate=3
    )
    assert grad_enabled == [False] * 5 + [True] * 3  # 5 steps without a graph, 3 differentiated
    torch.testing.assert_close(theta_trunc["theta"], theta_full["theta"], rtol=1e-13, atol=1e-13)  # same forward
    assert rel_err(trunc, full) > 1e-3


# ---------------------------------------------------------------------------------------------
# Warm start and throw
# ---------------------------------------------------------------------------------------------


def test_warm_start_from_previous_outer_step() -> None:
    prob, lam, theta, (lo, hi) = setup("ridge", "cpu")
    solver = hypergrad.Neumann(max_steps=500, alpha=1.0 / hi, rtol=1e-10)  # CG ends in n steps either way
    G, F = prob.inner_loss, prob.outer_loss
    g0, cold = hypergrad.implicit_grad(G, F, theta, lam, solver=solver)
    _, same = hypergrad.implicit_grad(G, F, theta, lam, solver=solver, x0=cold.x)
    assert same.num_steps == 0 and same.converged
    lam1 = {"log_lam": lam["log_lam"] + 0.01}  # the next outer step
    theta1 = prob.inner_solution(lam1)
    g_cold, cold1 = hypergrad.implicit_grad(G, F, theta1, lam1, solver=solver)
    g_warm, warm1 = hypergrad.implicit_grad(G, F, theta1, lam1, solver=solver, x0=cold.x)
    assert warm1.converged and warm1.num_steps < cold1.num_steps
    assert rel_err(g_warm, prob.exact_hypergradient(lam1)) <= 1e-8


def test_throw_raises_solver_error() -> None:
    prob, lam, theta, (lo, hi) = setup("quadratic", "cpu")
    too_short = CG(max_steps=1, rtol=1e-12)
    with pytest.warns(hypergrad.SolveFailedWarning, match=r"'max_steps_reached'.*on_failure='raise'"):
        g, sol = hypergrad.implicit_grad(prob.inner_loss, prob.outer_loss, theta, lam, solver=too_short)
    assert sol.status is Status.MAX_STEPS_REACHED  # by default the failure is data and a warning ...
    _, quiet = hypergrad.implicit_grad(
        prob.inner_loss, prob.outer_loss, theta, lam, solver=too_short, on_failure="apply"
    )
    assert quiet.status is Status.MAX_STEPS_REACHED
    with pytest.raises(SolverError, match=r"CG failed with status 'max_steps_reached'"):
        hypergrad.implicit_grad(prob.inner_loss, prob.outer_loss, theta, lam, solver=too_short, on_failure="raise")
    with pytest.raises(SolverError, match=r"CG failed with status 'max_steps_reached'.*Try increasing `max_steps`"):
        hypergrad.implicit_grad(prob.inner_loss, prob.outer_loss, theta, lam, solver=too_short, throw=True)
    with pytest.raises(SolverError, match=r"'diverged'.*lower `alpha`"):  # ... or raised on request
        hypergrad.fixed_point_grad(
            lambda p, h: prob.inner_step(p, h, 3.0 / hi),
            prob.outer_loss,
            theta,
            lam,
            solver=hypergrad.Neumann(max_steps=40, alpha=1.0, rtol=1e-10),
            throw=True,
        )
    with pytest.raises(SolverError, match=r"'max_steps_reached'"):
        hypergrad.proximal_grad(
            lambda p: prob.inner_loss(p, lam),
            theta,
            {"theta": torch.ones(prob.dim, dtype=F64)},
            lam=0.01,
            solver=CG(max_steps=1, rtol=1e-12),
            throw=True,
        )
