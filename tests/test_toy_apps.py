"""The toy applications built on BilevelProblem: CLIs, logs, and seeded smoke runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hypergrad
from applications.toy import hyper_cleaning, imaml

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("module", ["applications.toy.hyper_cleaning", "applications.toy.imaml"])
def test_cli_help(module: str) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "usage: python -m " + module in out.stdout and "--log-dir" in out.stdout


def test_hyper_cleaning_beats_training_on_noisy_labels(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    args = hyper_cleaning.parse_args(
        [
            "--n-train",
            "300",
            "--n-val",
            "100",
            "--n-test",
            "300",
            "--outer-steps",
            "25",
            "--inner-steps",
            "5",
            "--no-progress",
            "--log-dir",
            str(tmp_path),
        ]
    )
    r = hyper_cleaning.run(args)
    # seeded smoke run: the learned weights find the corrupted labels and the classifier benefits
    assert r["weight_auc"] > 0.75 and r["mean_weight_corrupted"] < r["mean_weight_clean"]
    assert r["test_acc_hypercleaning"] > r["test_acc_noisy"] + 0.1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["test_acc_hypercleaning"] == r["test_acc_hypercleaning"]
    assert any("step/outer_loss" in x for x in lines) and any("test_acc" in x for x in lines)


def test_hyper_cleaning_data_corruption() -> None:
    data = hyper_cleaning.make_data("digits", 400, 50, 50, noise=0.5, seed=1)
    changed = data.train.y != data.clean_train_labels
    assert torch.equal(changed, data.corrupted)  # every corrupted label really changed class
    assert 0.4 < data.corrupted.float().mean().item() < 0.6
    assert data.train.x.shape == (400, 1, 8, 8) and data.num_classes == 10


@pytest.mark.skipif(
    not (hyper_cleaning.FASHION_DIR / "train-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST not installed"
)
def test_fashion_mnist_idx_reader() -> None:
    x, y = hyper_cleaning.load_images("fashion-mnist")
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and set(y.unique().tolist()) == set(range(10))


def test_roc_auc_reference() -> None:
    scores, labels = torch.tensor([0.9, 0.8, 0.3, 0.3, 0.1]), torch.tensor([True, False, True, False, False])
    # pairs (pos, neg): (0.9: 3 wins), (0.3: beats 0.1, ties 0.3, loses 0.8) -> (3 + 1.5) / 6
    assert hyper_cleaning.roc_auc(scores, labels) == pytest.approx(4.5 / 6)


def test_imaml_meta_training_lowers_test_error(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    args = imaml.parse_args(["--meta-steps", "30", "--test-tasks", "20", "--no-progress", "--log-dir", str(tmp_path)])
    r = imaml.run(args)
    assert r["test_mse_after"] < 0.9 * r["test_mse_before"]  # seeded smoke run
    assert r["solves"] == 30 * 4 and r["failed_solves"] == 0  # the default damping keeps CG positive definite
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0].startswith("step,train_query_mse")


def test_imaml_undamped_solves_fail_and_are_counted_not_applied_silently() -> None:
    """Without damping CG meets negative curvature; each failure warns and is counted, never silent."""
    torch.set_num_threads(1)
    args = imaml.parse_args(["--meta-steps", "2", "--test-tasks", "2", "--damping", "0", "--no-progress"])
    with pytest.warns(hypergrad.SolveFailedWarning, match="negative_curvature"):
        r = imaml.run(args)
    assert r["failed_solves"] > 0 and r["failed_fraction"] == r["failed_solves"] / r["solves"]


def test_imaml_summary_prints_the_failed_fraction(capsys: pytest.CaptureFixture) -> None:
    imaml.main(["--meta-steps", "1", "--meta-batch", "2", "--test-tasks", "2", "--no-progress"])
    assert "failed linear solves (CG)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--meta-steps", "0"], "--meta-steps must be >= 1"),
        (["--lam", "0"], "--lam must be > 0"),
        (["--damping", "nan"], "--damping must be >= 0 and finite"),
    ],
)
def test_imaml_cli_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        imaml.parse_args(argv)
    assert message in capsys.readouterr().err
