"""Coding rate and coding-rate reduction against a direct numpy float64 computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from applications.umm.coding_rate import coding_rate, coding_rate_reduction, two_view_labels


def np_rate(Z: np.ndarray, eps2: float) -> float:
    Z = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    n, d = Z.shape
    return 0.5 * np.linalg.slogdet(np.eye(d) + d / (n * eps2) * Z.T @ Z)[1]  # always the d x d form


def np_reduction(Z: np.ndarray, labels: np.ndarray, eps2: float) -> float:
    Zn = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    n = Z.shape[0]
    return np_rate(Zn, eps2) - sum((labels == j).sum() / n * np_rate(Zn[labels == j], eps2) for j in np.unique(labels))


SHAPES = [(5, 12), (24, 6), (9, 9), (40, 3)]  # n < d, n > d, n = d


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("eps2", [0.05, 0.5])
def test_rate_matches_numpy_float64_and_float32(n: int, d: int, eps2: float) -> None:
    Z = np.random.default_rng(n * d).normal(size=(n, d)) * 3.0  # unnormalised rows: the function normalises
    ref = np_rate(Z, eps2)
    assert abs(float(coding_rate(torch.from_numpy(Z), eps2)) - ref) <= 1e-10
    assert abs(float(coding_rate(torch.from_numpy(Z).float(), eps2)) - ref) <= 1e-4 * abs(ref)


@pytest.mark.parametrize("n,d", SHAPES)
def test_reduction_matches_numpy_float64_and_float32(n: int, d: int) -> None:
    rng = np.random.default_rng(n + d)
    Z = rng.normal(size=(n, d))
    if n % 2 == 0:
        labels = np.repeat(np.arange(n // 2), 2)
    else:
        labels = np.r_[np.repeat(np.arange(n // 3), 3)[: n - n % 3], [0] * (n % 3)].astype(np.int64)
    rng.shuffle(labels)
    ref = np_reduction(Z, labels, 0.3)
    got64 = float(coding_rate_reduction(torch.from_numpy(Z), torch.from_numpy(labels), 0.3))
    got32 = float(coding_rate_reduction(torch.from_numpy(Z).float(), torch.from_numpy(labels), 0.3))
    assert abs(got64 - ref) <= 1e-10
    assert abs(got32 - ref) <= 1e-4 * abs(ref)


def test_unequal_group_sizes_match_numpy() -> None:
    rng = np.random.default_rng(3)
    Z = rng.normal(size=(30, 7))
    labels = np.array([0] * 2 + [1] * 11 + [2] * 5 + [7] * 12)  # padded batch: sizes 2..12, m > d for one group
    rng.shuffle(labels)
    got = float(coding_rate_reduction(torch.from_numpy(Z), torch.from_numpy(labels), 0.5))
    assert abs(got - np_reduction(Z, labels, 0.5)) <= 1e-10


def test_batched_rate_equals_each_slice() -> None:
    Z = torch.randn(4, 6, 10, dtype=torch.float64)
    batched = coding_rate(Z, 0.5)
    assert batched.shape == (4,)
    for g in range(4):
        assert abs(float(batched[g]) - np_rate(Z[g].numpy(), 0.5)) <= 1e-10


def test_invariant_to_row_order() -> None:
    Z, labels = torch.randn(20, 8, dtype=torch.float64), torch.arange(20) % 4
    perm = torch.randperm(20)
    assert torch.allclose(coding_rate(Z[perm]), coding_rate(Z), atol=1e-12, rtol=0)
    assert torch.allclose(
        coding_rate_reduction(Z[perm], labels[perm]), coding_rate_reduction(Z, labels), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("seed", range(12))
def test_reduction_nonnegative_for_any_partition(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(4, 40, (1,), generator=g))
    d = int(torch.randint(2, 30, (1,), generator=g))
    k = int(torch.randint(1, n // 2 + 1, (1,), generator=g))
    labels = torch.cat([torch.arange(k).repeat(2), torch.randint(0, k, (n - 2 * k,), generator=g)])  # every group >= 2
    labels = labels[torch.randperm(n, generator=g)]
    Z = torch.randn(n, d, generator=g, dtype=torch.float64)
    assert float(coding_rate_reduction(Z, labels, 0.1 + seed / 10)) >= -1e-12
    assert float(coding_rate_reduction(Z, torch.zeros(n, dtype=torch.long))) == pytest.approx(0.0, abs=1e-12)


def test_gradients_match_central_finite_differences() -> None:
    Z = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)  # n < d
    W = torch.randn(14, 4, dtype=torch.float64, requires_grad=True)  # n > d
    assert torch.autograd.gradcheck(lambda z: coding_rate(z, 0.4), (Z,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(
        lambda z: coding_rate_reduction(z, two_view_labels(3), 0.4), (Z,), eps=1e-6, atol=1e-7
    )
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 1, 2])
    assert torch.autograd.gradcheck(lambda w: coding_rate_reduction(w, labels, 0.2), (W,), eps=1e-6, atol=1e-7)


def test_two_view_labels() -> None:
    assert two_view_labels(3).tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="batch"):
        two_view_labels(0)


@pytest.mark.parametrize("eps2", [0.0, -1.0, float("nan"), True, "0.5"])
def test_bad_eps2(eps2) -> None:
    with pytest.raises(ValueError, match="eps2"):
        coding_rate(torch.randn(4, 3), eps2)
    with pytest.raises(ValueError, match="eps2"):
        coding_rate_reduction(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), eps2)


def test_bad_features_and_labels() -> None:
    with pytest.raises(ValueError, match="`Z`"):
        coding_rate(torch.randn(5), 0.5)
    with pytest.raises(ValueError, match="`Z`"):
        coding_rate_reduction(torch.randn(2, 4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="`Z`"):
        coding_rate(torch.ones(3, 2, dtype=torch.long), 0.5)
    bad = torch.randn(4, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        coding_rate(bad, 0.5)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        coding_rate_reduction(bad, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="all-zero"):
        coding_rate(torch.zeros(3, 4), 0.5)
    with pytest.raises(ValueError, match="`labels` must have shape"):
        coding_rate_reduction(torch.randn(4, 3), torch.tensor([0, 0, 1]))
    with pytest.raises(TypeError, match="`labels`"):
        coding_rate_reduction(torch.randn(4, 3), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="fewer than min_group_size=2"):
        coding_rate_reduction(torch.randn(5, 3), torch.tensor([0, 0, 1, 1, 2]))
    assert torch.isfinite(coding_rate_reduction(torch.randn(5, 3), torch.tensor([0, 0, 1, 1, 2]), min_group_size=1))
