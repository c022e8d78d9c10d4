"""The toy problems' closed forms against autograd and finite differences, and the demo."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, hessian

from applications.toy import LogisticProblem, QuadraticProblem, RidgeProblem, ToyProblem
from applications.toy.__main__ import main
from applications.toy.demo import check_hypergradients, format_table, run_hpo

F64 = torch.float64
SMALL = {
    "quadratic": lambda **kw: QuadraticProblem(dim=6, hdim=3, cond=8.0, **kw),
    "ridge": lambda **kw: RidgeProblem(n_train=30, n_val=15, dim=5, **kw),
    "logistic": lambda **kw: LogisticProblem(n_train=40, n_val=20, dim=4, **kw),
}
HPARAM_SHAPES = {"quadratic": {"lam": (3,)}, "ridge": {"log_lam": ()}, "logistic": {"log_lam": (4,)}}


def flat_fn(prob: ToyProblem, lam: dict):
    key = next(iter(prob.param_shapes))
    return key, lambda x: prob.inner_loss({key: x}, lam)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("name", list(SMALL))
def test_closed_forms_match_autograd(name: str, device: str) -> None:
    prob = SMALL[name](device=device)
    lam = prob.init_hparams()
    assert {k: tuple(v.shape) for k, v in lam.items()} == HPARAM_SHAPES[name]
    key, f = flat_fn(prob, lam)
    x = torch.randn(prob.param_shapes[key], dtype=F64, device=device)
    torch.testing.assert_close(prob.inner_grad({key: x}, lam)[key], grad(f)(x), rtol=1e-12, atol=1e-12)
    h = hessian(f)(x)
    torch.testing.assert_close(prob.inner_hessian({key: x}, lam), h, rtol=1e-12, atol=1e-12)
    theta = prob.inner_solution(lam)
    assert theta[key].device.type == torch.device(device).type and theta[key].dtype == F64
    assert float(grad(f)(theta[key]).norm()) <= 1e-12 * (1 + float(theta[key].norm()))  # stationary
    eig = torch.linalg.eigvalsh(hessian(f)(theta[key]))
    lo, hi = prob.hessian_bounds(lam)
    assert lo == pytest.approx(float(eig[0]), rel=1e-10) and hi == pytest.approx(float(eig[-1]), rel=1e-10)
    assert lo > 0


@pytest.mark.parametrize("name", list(SMALL))
def test_exact_hypergradient_matches_finite_differences(name: str) -> None:
    prob = SMALL[name]()
    lam = prob.init_hparams()
    exact = prob.exact_hypergradient(lam)
    fd = prob.finite_difference_hypergradient(lam, eps=1e-5)
    for k in lam:
        assert rel(exact[k], fd[k]) <= 1e-7, k


def test_quadratic_spectrum_and_theta_star() -> None:
    prob = QuadraticProblem(dim=12, hdim=4, cond=50.0)
    eig = torch.linalg.eigvalsh(prob.A)
    torch.testing.assert_close(eig, torch.logspace(0, torch.log10(torch.tensor(50.0)).item(), 12, dtype=F64))
    lam = prob.init_hparams()
    torch.testing.assert_close(prob.A @ prob.inner_solution(lam)["theta"], prob.B @ lam["lam"])


def test_ridge_dw_dlam_closed_form() -> None:
    """dw*/dlam = -(X^T X + lam I)^-1 w*, against central differences of w*(lam)."""
    prob = SMALL["ridge"]()
    log_lam, eps = torch.tensor(0.3, dtype=F64), 1e-6
    lam = float(torch.exp(log_lam))
    w = prob.inner_solution({"log_lam": log_lam})["w"]
    closed = -torch.linalg.solve(prob.X.T @ prob.X + lam * torch.eye(prob.dim, dtype=F64), w)
    w_plus = prob.inner_solution({"log_lam": torch.log(torch.tensor(lam + eps, dtype=F64))})["w"]
    w_minus = prob.inner_solution({"log_lam": torch.log(torch.tensor(lam - eps, dtype=F64))})["w"]
    assert rel(closed, (w_plus - w_minus) / (2 * eps)) <= 1e-7


def test_logistic_newton_reaches_tolerance_for_extreme_strengths() -> None:
    prob = SMALL["logistic"]()
    for log_lam in (torch.full((4,), -8.0, dtype=F64), torch.tensor([-6.0, 0.0, 4.0, 9.0], dtype=F64)):
        lam = {"log_lam": log_lam}
        w = prob.inner_solution(lam)["w"]
        scale = 1 + float((torch.exp(log_lam) * w).norm())
        assert float(prob.inner_grad({"w": w}, lam)["w"].norm()) <= 1e-12 * scale


@pytest.mark.parametrize("name", list(SMALL))
def test_inner_step_is_a_contraction_to_theta_star(name: str) -> None:
    prob = SMALL[name]()
    lam = prob.init_hparams()
    lo, hi = prob.hessian_bounds(lam)
    theta_star = prob.inner_solution(lam)
    key = next(iter(theta_star))
    theta = prob.init_params()
    step = prob.inner_step(theta, lam, 1.0 / hi)
    torch.testing.assert_close(step[key], theta[key] - prob.inner_grad(theta, lam)[key] / hi)
    torch.testing.assert_close(prob.inner_step(theta_star, lam, 1.0 / hi)[key], theta_star[key], rtol=1e-10, atol=1e-12)
    for _ in range(20):
        new = prob.inner_step(theta, lam, 1.0 / hi)
        assert float((new[key] - theta_star[key]).norm()) < float((theta[key] - theta_star[key]).norm())
        theta = new


@pytest.mark.parametrize("name", list(SMALL))
def test_seeded_and_dtype(name: str) -> None:
    a, b, c = SMALL[name](seed=3), SMALL[name](seed=3), SMALL[name](seed=4)
    lam = a.init_hparams()
    ea, eb, ec = a.exact_hypergradient(lam), b.exact_hypergradient(lam), c.exact_hypergradient(lam)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert not all(torch.allclose(ea[k], ec[k]) for k in ea)
    state = torch.random.get_rng_state()
    SMALL[name](seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # private generator: global RNG untouched
    f32 = SMALL[name](dtype=torch.float32)
    lam32 = f32.init_hparams()
    assert all(v.dtype == torch.float32 for v in lam32.values())
    assert all(v.dtype == torch.float32 for v in f32.inner_solution(lam32).values())


@pytest.mark.parametrize(
    ("make", "regex"),
    [
        (lambda: QuadraticProblem(cond=0.5), r"`cond` must be a finite number >= 1, got 0\.5"),
        (lambda: QuadraticProblem(dim=0), r"`dim` must be an integer >= 1, got 0"),
        (lambda: RidgeProblem(n_train=2.5), r"`n_train` must be an integer >= 1, got 2\.5"),
        (lambda: LogisticProblem(flip=0.7), r"`flip` must be in \[0, 0\.5\), got 0\.7"),
    ],
)
def test_constructor_errors(make, regex: str) -> None:
    with pytest.raises(ValueError, match=regex):
        make()


# ---------------------------------------------------------------------------------------------
# The demo (python -m applications.toy)
# ---------------------------------------------------------------------------------------------


def test_check_table_exact_methods_are_exact() -> None:
    rows = check_hypergradients([SMALL["ridge"](), SMALL["logistic"]()], unroll_steps=60)
    methods = {"CG", "Neumann", "FixedPoint", "Dense", "Identity", "unrolled"}
    assert {r.method for r in rows} == methods and len(rows) == 2 * len(methods)
    for r in rows:
        if r.method in {"CG", "Neumann", "FixedPoint", "Dense"}:
            assert r.rel_error <= 1e-8 and r.status == "success", r
        if r.method == "Identity":
            assert r.rel_error > 1e-3 and r.num_matvecs == 0
    text = format_table(rows)
    assert text.count("\n") == len(rows) + 1 and "RidgeProblem" in text and "fixed_budget" in text


@pytest.mark.parametrize("name,lr", [("ridge", 2.0), ("logistic", 50.0)])
def test_hpo_lowers_validation_loss(name: str, lr: float) -> None:
    """A seeded smoke test: gradient steps along the implicit hypergradient lower F."""
    lines: list[str] = []
    records = run_hpo(SMALL[name](), outer_steps=5, lr=lr, progress=False, log=lines.append)
    assert len(records) == 6 and len(lines) == 5
    losses = [r.outer_loss for r in records]
    assert losses[-1] < losses[0]
    assert all(r.num_matvecs >= 1 for r in records[:-1])


def test_main_runs_and_prints_both_parts(capsys) -> None:
    assert main(["--outer-steps", "2", "--unroll-steps", "20", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(a) Hypergradient check" in out and "(b) Hyper-parameter optimisation" in out
    for name in ("QuadraticProblem", "RidgeProblem", "LogisticProblem"):
        assert name in out
    assert out.count("validation loss") >= 2 * 2 + 2


def test_main_help_and_bad_arguments(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "--outer-steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["--outer-steps", "0"])
    assert info.value.code == 2 and "--outer-steps must be >= 1" in capsys.readouterr().err
