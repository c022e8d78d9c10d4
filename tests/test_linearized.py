"""LinearizedHessian: the frozen forward-over-reverse operator against dense double-backward Hessians."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as nnf
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hypergrad
from hypergrad import LinearizedHessian

F64 = torch.float64


def dense_hessian(fn, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rows of the Hessian by double backward (create_graph), on the flattened parameters."""
    keys = list(params)
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    g = torch.autograd.grad(fn(p), [p[k] for k in keys], create_graph=True)
    flat = torch.cat([t.reshape(-1) for t in g])
    rows = [
        torch.cat([t.reshape(-1) for t in torch.autograd.grad(flat[i], [p[k] for k in keys], retain_graph=True)])
        for i in range(flat.numel())
    ]
    return torch.stack(rows)


def materialize(op, params: dict[str, torch.Tensor]) -> torch.Tensor:
    return hypergrad.materialize(op, params)


def _mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    x, y = torch.randn(7, 3, dtype=F64), torch.randint(0, 2, (7,))
    f = hypergrad.stateless(net)
    return (lambda p: nnf.cross_entropy(f(p, x), y)), hypergrad.module_params(net)


def _bn_convnet():
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.BatchNorm2d(2),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, 3),
    ).to(F64)
    x, y = torch.randn(6, 1, 3, 3, dtype=F64), torch.randint(0, 3, (6,))
    f = hypergrad.stateless(net)
    return (lambda p: nnf.cross_entropy(f(p, x), y)), hypergrad.module_params(net), net


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 2).permute(2, 0, 3, 1, 4)
        with sdpa_kernel(SDPBackend.MATH):
            a = nnf.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(x.shape))


def _attention():
    torch.manual_seed(2)
    net = _Attn().to(F64)
    x = torch.randn(2, 5, 4, dtype=F64)
    f = hypergrad.stateless(net)
    return (lambda p: f(p, x).pow(2).mean()), hypergrad.module_params(net)


@pytest.mark.parametrize("model", ["mlp", "bn_convnet", "attention"])
def test_equals_dense_double_backward_hessian(model: str) -> None:
    if model == "mlp":
        fn, params = _mlp()
    elif model == "bn_convnet":
        fn, params, net = _bn_convnet()
        before = {k: b.clone() for k, b in net.named_buffers()}
    else:
        fn, params = _attention()
    op = LinearizedHessian(fn, params)
    assert op.mode == "linearized"
    torch.testing.assert_close(materialize(op, params), dense_hessian(fn, params), rtol=1e-10, atol=1e-10)
    g = torch.func.grad(fn)(params)
    for k in params:
        torch.testing.assert_close(op.grad_value[k], g[k], rtol=1e-12, atol=1e-12)
    if model == "bn_convnet":  # the module's running statistics were never touched
        for k, b in net.named_buffers():
            assert torch.equal(b, before[k]), k


def test_reused_by_several_solves_and_matches_dense_solve() -> None:
    fn, params = _mlp()
    op = LinearizedHessian(fn, params)
    h = dense_hessian(fn, params)
    n = h.shape[0]
    damped = hypergrad.Damped(op, 1.0)
    for seed in range(3):
        b = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=F64)
        bt = {k: v for k, v in zip(params, torch.split(b, [p.numel() for p in params.values()]))}
        bt = {k: v.reshape(params[k].shape) for k, v in bt.items()}
        sol = hypergrad.CG(max_steps=200, rtol=1e-12)(damped, bt)
        x = torch.cat([sol.x[k].reshape(-1) for k in params])
        torch.testing.assert_close(x, torch.linalg.solve(h + torch.eye(n, dtype=F64), b), rtol=1e-9, atol=1e-9)


def test_falls_back_to_the_cached_reverse_graph_with_a_warning() -> None:
    def branching(p: dict[str, torch.Tensor]) -> torch.Tensor:  # data-dependent control flow: not traceable
        w = p["w"]
        return (w**3).sum() if float(w.sum()) > 0 else (w**2).sum()

    params = {"w": torch.tensor([1.0, 2.0], dtype=F64)}
    with pytest.warns(hypergrad.HVPFallbackWarning, match="cached reverse graph"):
        op = LinearizedHessian(branching, params)
    assert op.mode == "rev_rev_cached"
    torch.testing.assert_close(op({"w": torch.ones(2, dtype=F64)})["w"], torch.tensor([6.0, 12.0], dtype=F64))
    with pytest.raises(Exception):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            LinearizedHessian(branching, params, fallback=False)


def test_bad_inputs_name_the_argument() -> None:
    with pytest.raises(TypeError, match=r"LinearizedHessian: `fn` must be a callable params -> scalar"):
        LinearizedHessian("f", {"w": torch.ones(1)})
    with pytest.raises(TypeError, match=r"LinearizedHessian: `params` must be a non-empty dict of tensors, got Tensor"):
        LinearizedHessian(lambda p: p.sum(), torch.ones(2))
