"""LARS against hand-computed updates; the warm-up + cosine schedule against its closed form."""

from __future__ import annotations

import math

import pytest
import torch

from applications.bissl.optim import LARS, WarmupCosine, warmup_cosine


def _hand_lars_step(p, g, buf, *, lr, wd, mom, eta, adapt):
    """One LARS step written out with Python floats on flat lists."""
    if adapt:
        g = [gi + wd * pi for gi, pi in zip(g, p)]
        pn = math.sqrt(sum(x * x for x in p))
        gn = math.sqrt(sum(x * x for x in g))
        r = eta * pn / gn if pn > 0 and gn > 0 else 1.0
        g = [r * gi for gi in g]
    buf = list(g) if buf is None else [mom * b + gi for b, gi in zip(buf, g)]
    return [pi - lr * b for pi, b in zip(p, buf)], buf


@pytest.mark.parametrize("exclude", [True, False])
def test_lars_two_steps_match_hand_computation(exclude: bool) -> None:
    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([0.3, -0.7], dtype=torch.float64))
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, eta=0.02, exclude_bias_and_norm=exclude)
    grads = [
        (torch.tensor([[0.2, 0.1], [-0.4, 0.3]]), torch.tensor([1.0, -2.0])),
        (torch.tensor([[-0.1, 0.5], [0.2, 0.2]]), torch.tensor([0.5, 0.5])),
    ]
    hw, hb = w.detach().flatten().tolist(), b.detach().tolist()
    bw = bb = None
    for gw, gb in grads:
        w.grad, b.grad = gw.double(), gb.double()
        opt.step()
        hw, bw = _hand_lars_step(hw, gw.flatten().tolist(), bw, lr=0.5, wd=0.1, mom=0.9, eta=0.02, adapt=True)
        hb, bb = _hand_lars_step(hb, gb.tolist(), bb, lr=0.5, wd=0.1, mom=0.9, eta=0.02, adapt=not exclude)
    torch.testing.assert_close(w.detach().flatten(), torch.tensor(hw, dtype=torch.float64), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(b.detach(), torch.tensor(hb, dtype=torch.float64), rtol=1e-14, atol=1e-15)


def test_lars_trust_ratio_is_one_for_zero_parameters() -> None:
    w = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = LARS([w], lr=1.0, weight_decay=0.0, momentum=0.0, eta=0.001)
    w.grad = torch.ones(2, 2, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w.detach(), -torch.ones(2, 2, dtype=torch.float64))


def test_lars_skips_parameters_without_grad_and_saves_state() -> None:
    a = torch.nn.Parameter(torch.ones(2, 2))
    c = torch.nn.Parameter(torch.ones(2, 2))
    opt = LARS([a, c], lr=0.1)
    a.grad = torch.ones(2, 2)
    opt.step()
    assert torch.equal(c.detach(), torch.ones(2, 2))
    state = opt.state_dict()
    fresh = LARS([a, c], lr=0.1)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.state[a]["momentum_buffer"], opt.state[a]["momentum_buffer"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"lr": 0.1, "weight_decay": -1e-6}, "Invalid weight_decay"),
        ({"lr": 0.1, "momentum": 1.0}, "Invalid momentum"),
        ({"lr": 0.1, "eta": 0.0}, "Invalid eta"),
    ],
)
def test_lars_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        LARS([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_warmup_cosine_closed_form() -> None:
    w, t, c = 3, 11, 0.001
    f = WarmupCosine(w, t, c)
    for s in range(w):
        assert f(s) == pytest.approx((s + 1) / w)
    for s in range(w, t + 3):
        progress = min(1.0, (s - w) / (t - w))
        assert f(s) == pytest.approx(c + (1 - c) * 0.5 * (1 + math.cos(math.pi * progress)))
    assert f(w) == pytest.approx(1.0) and f(t) == pytest.approx(c) and f(t + 5) == pytest.approx(c)
    assert f((w + t) / 2) == pytest.approx(c + (1 - c) * 0.5)


def test_warmup_cosine_drives_the_optimizer_lr_and_resumes() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = LARS([p], lr=4.8)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=6, final_lr_scale=0.0)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.4, 4.8, 4.8, 4.8 * 0.5 * (1 + math.cos(math.pi / 4))])
    opt2 = LARS([p], lr=4.8)
    sched2 = warmup_cosine(opt2, 2, 6, 0.0)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(4.8 * 0.5)  # step 4 of 6: cosine midpoint
    sched2.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


@pytest.mark.parametrize(
    ("args", "match"),
    [((-1, 5, 0.0), "warmup_steps"), ((6, 5, 0.0), "total_steps"), ((0, 5, 1.5), "final_lr_scale")],
)
def test_schedule_errors(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        WarmupCosine(*args)
