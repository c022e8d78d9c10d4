"""applications.toy.influence: influence functions by one block solve, against independent float64 references."""

from __future__ import annotations

import pytest
import torch

import hypergrad
from applications.toy import influence as inf

MU = 1e-2


@pytest.fixture(scope="module")
def fitted() -> tuple[inf.Data, dict[str, torch.Tensor]]:
    torch.set_num_threads(1)
    data = inf.load_digits_split(120, 5, seed=3, device=torch.device("cpu"))
    theta0 = {"W": torch.zeros(10, 64, dtype=inf.F64), "b": torch.zeros(10, dtype=inf.F64)}
    return data, inf.newton(inf.training_loss(data, MU), theta0)


@pytest.mark.parametrize(
    "solver",
    [hypergrad.BlockCG(max_steps=500, rtol=1e-12), hypergrad.CG(max_steps=2000, rtol=1e-12)],
    ids=["BlockCG", "CG"],
)
def test_influence_matrix_matches_the_dense_solve(fitted, solver) -> None:
    data, theta = fitted
    res = inf.influence_matrix(data, theta, MU, solver)
    ref = inf.dense_influence(data, theta, MU)
    assert res.influence.shape == (5, 120)
    assert float((res.influence - ref).norm() / ref.norm()) < 1e-8
    assert res.solution.converged


def test_dense_influence_is_the_derivative_of_the_test_loss_in_the_example_weight(fitted) -> None:
    """Central finite difference in the weight of training example i (retrained by Newton): the formula's own reference."""
    data, theta = fitted
    ref = inf.dense_influence(data, theta, MU)
    t, h = 2, 1e-4
    for i in (0, int(ref[t].abs().argmax())):
        losses = []
        for eps in (-h, h):
            w = torch.ones(120, dtype=inf.F64)
            w[i] += eps
            th = inf.newton(inf.training_loss(data, MU, w), theta)
            losses.append(inf.example_loss(th, data.x_test[t], data.y_test[t]))
        # removal is eps = -1, so the predicted change is minus the derivative in eps
        fd = -(losses[1] - losses[0]) / (2 * h)
        assert abs(float(fd - ref[t, i])) <= 1e-6 * max(1e-3, float(ref[t].abs().max()))


def test_run_predicts_leave_one_out_retraining(capsys) -> None:
    args = inf.parse_args(["--n-train", "150", "--n-test", "4", "--loo", "6", "--mu", "1e-2", "--no-progress"])
    out = inf.run(args)
    assert out["loo"]["pearson"] > 0.95  # a sign or scale error in the influence would fail this
    assert out["BlockCG"]["rel_err"] < 1e-7 and out["CG"]["rel_err"] < 1e-7
    assert out["loo"]["actual"].shape == (4, 6)


def test_chunked_products_give_the_same_matrix(fitted) -> None:
    data, theta = fitted
    solver = hypergrad.BlockCG(max_steps=500, rtol=1e-12)
    a = inf.influence_matrix(data, theta, MU, solver).influence
    b = inf.influence_matrix(data, theta, MU, solver, chunk_size=2).influence
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mu", "0"], "--mu must be a finite number > 0"),
        (["--n-train", "10", "--loo", "11"], "--loo must be at most --n-train (10), got 11"),
        (["--n-train", "1790", "--n-test", "16"], "at most the 1797 digits images"),
        (["--rtol", "1"], "--rtol must be in (0, 1)"),
        (["--chunk-size", "0"], "--chunk-size must be >= 1"),
    ],
)
def test_cli_refuses_bad_arguments(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        inf.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
