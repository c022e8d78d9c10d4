"""SimCLR NT-Xent and BYOL losses against plainly looped float64 references; EMA target; DDP gather."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from applications.bissl.losses import EMA, BYOLLoss, NTXentLoss, create_target
from tests.bissl.conftest import run_gloo


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(a * a for a in v))


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (_norm(a) * _norm(b))


def reference_ntxent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """SimCLR Eq. (1), one anchor at a time, in Python floats."""
    z = z1.tolist() + z2.tolist()
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        partner = i + n if i < n else i - n
        numerator = math.exp(_cos(z[i], z[partner]) / temperature)
        denominator = sum(math.exp(_cos(z[i], z[k]) / temperature) for k in range(2 * n) if k != i)
        total += -math.log(numerator / denominator)
    return total / (2 * n)


def reference_byol(p1, p2, t1, t2) -> float:
    p1, p2, t1, t2 = (x.tolist() for x in (p1, p2, t1, t2))
    n = len(p1)
    a = sum(2 - 2 * _cos(p1[i], t2[i]) for i in range(n)) / n
    b = sum(2 - 2 * _cos(p2[i], t1[i]) for i in range(n)) / n
    return a + b


@pytest.mark.parametrize("temperature", [0.5, 0.1, 1.0])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_ntxent_matches_looped_reference(temperature: float, batch: int) -> None:
    z1 = torch.randn(batch, 5, dtype=torch.float64) * 3
    z2 = torch.randn(batch, 5, dtype=torch.float64)
    got = NTXentLoss(temperature=temperature)(z1, z2)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(reference_ntxent(z1, z2, temperature), rel=1e-12, abs=1e-12)


def test_ntxent_is_scale_invariant_and_symmetric() -> None:
    z1, z2 = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    loss = NTXentLoss(0.5)
    torch.testing.assert_close(loss(z1, z2), loss(7 * z1, 0.1 * z2))
    torch.testing.assert_close(loss(z1, z2), loss(z2, z1))


def test_ntxent_gradient_by_gradcheck() -> None:
    z1 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(NTXentLoss(0.5), (z1, z2))


def test_byol_matches_looped_reference_and_stops_target_gradient() -> None:
    p1, p2 = (torch.randn(5, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    t1, t2 = (torch.randn(5, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    got = BYOLLoss()(p1, p2, t1, t2)
    assert got.item() == pytest.approx(reference_byol(p1, p2, t1, t2), rel=1e-12)
    got.backward()
    assert t1.grad is None and t2.grad is None
    assert p1.grad is not None and p1.grad.abs().sum() > 0


def test_byol_range_and_symmetry() -> None:
    p = torch.randn(3, 4, dtype=torch.float64)
    assert BYOLLoss()(p, p, -p, -p).item() == pytest.approx(8.0)  # opposite directions: maximum
    q, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(BYOLLoss()(p, q, t, p), BYOLLoss()(q, p, p, t))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: NTXentLoss(temperature=0.0), "temperature must be > 0"),
        (lambda: NTXentLoss()(torch.zeros(3, 2), torch.zeros(4, 2)), r"z1 and z2 must both have shape"),
        (lambda: BYOLLoss()(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3)), "shape"),
        (lambda: EMA(decay=1.5), r"decay must lie in \[0, 1\]"),
    ],
)
def test_loss_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_ema_update_formula_and_buffers() -> None:
    online = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()
    target = create_target(online)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    before = [p.detach().clone() for p in target.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online(torch.randn(8, 3, dtype=torch.float64))  # changes BN running stats
    EMA(decay=0.9)(target, online)
    for old, new, cur in zip(before, target.parameters(), online.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * cur.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(target[1].running_mean, online[1].running_mean, rtol=0, atol=0)
    # the target owns its storage: later online updates do not leak into it
    with torch.no_grad():
        online[0].weight.add_(1.0)
    assert not torch.equal(online[0].weight, target[0].weight)


def test_ema_rejects_mismatched_networks() -> None:
    with pytest.raises(ValueError, match="create_target"):
        EMA()(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


# ----------------------------------------------------------------------------- distributed (gloo)


def _ntxent_rank(rank: int, world: int, z1: torch.Tensor, z2: torch.Tensor, out: str) -> None:
    b = z1.shape[0] // world
    l1 = z1[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    l2 = z2[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    loss = NTXentLoss(temperature=0.5)(l1, l2)
    loss.backward()
    torch.save({"loss": loss.detach(), "g1": l1.grad, "g2": l2.grad}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.distributed
def test_ntxent_global_negatives_over_two_gloo_ranks(tmp_path) -> None:
    """Mean of the per-rank losses = single-process loss on the concatenated batch; gradients too."""
    z1 = torch.randn(6, 4, dtype=torch.float64)
    z2 = torch.randn(6, 4, dtype=torch.float64)
    run_gloo(_ntxent_rank, z1, z2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    r1, r2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    full = NTXentLoss(temperature=0.5)(r1, r2)
    full.backward()
    assert full.item() == pytest.approx(reference_ntxent(z1, z2, 0.5), rel=1e-12)
    mean_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    torch.testing.assert_close(mean_loss, full.detach(), rtol=1e-12, atol=1e-12)
    # each rank's input gradient is d(sum_r loss_r)/dz_local; DDP's 1/W averaging makes it the
    # gradient of the global-batch loss
    g1 = torch.cat([ranks[0]["g1"], ranks[1]["g1"]]) / 2
    g2 = torch.cat([ranks[0]["g2"], ranks[1]["g2"]]) / 2
    torch.testing.assert_close(g1, r1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g2, r2.grad, rtol=1e-10, atol=1e-12)
