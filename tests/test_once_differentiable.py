"""A custom Function with a @once_differentiable backward must not give a silent zero Hessian."""

import pytest
import torch
from torch.autograd.function import once_differentiable

import hypergrad


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


def _loss(p):
    return _Cube.apply(p["x"]).sum() + (p["y"] ** 2).sum()


def _params():
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(3, generator=g, dtype=torch.float64),
        "y": torch.randn(2, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("mode", ["rev_rev", "rev_rev_cached"])
def test_reverse_modes_refuse_once_differentiable(mode):
    p = _params()
    v = {k: torch.ones_like(t) for k, t in p.items()}
    with pytest.raises(RuntimeError, match="once_differentiable"):
        hypergrad.HessianOperator(_loss, p, mode=mode)(v)


def test_auto_never_returns_the_silent_zero():
    p = _params()
    v = {k: torch.ones_like(t) for k, t in p.items()}
    op = hypergrad.HessianOperator(_loss, p)
    with pytest.warns(hypergrad.HVPFallbackWarning), pytest.raises(RuntimeError):
        op(v)


def test_linear_entries_still_give_zero_rows():
    p = {"x": torch.randn(3, dtype=torch.float64)}
    a = torch.arange(3.0, dtype=torch.float64)
    hv = hypergrad.HessianOperator(lambda q: (a * q["x"]).sum(), p, mode="rev_rev_cached")(
        {"x": torch.ones(3, dtype=torch.float64)}
    )
    torch.testing.assert_close(hv["x"], torch.zeros(3, dtype=torch.float64))
