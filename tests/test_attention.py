"""Second order through attention (``scaled_dot_product_attention``) and parameter subsets, in float64.

References are dense matrices built by plain double backward under the ``MATH`` attention backend
(the only backend with double backward), never by hypergrad itself.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hypergrad
from hypergrad import HessianOperator, hvp, mixed_hvp, tree_ravel
from tests.helpers_problem import attention_dense_hessian

F64 = torch.float64
EXACT_MODES = ["fwd_rev", "rev_rev", "rev_rev_cached", "auto"]


def _encoder() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0, batch_first=True).to(F64)
    x = torch.randn(3, 5, 4, dtype=F64)
    y = torch.randn(3, 5, 4, dtype=F64)
    return layer, x, y


@pytest.fixture(scope="module")
def encoder_hessian() -> torch.Tensor:
    """Dense Hessian of the encoder's training loss (computed once for the module)."""
    layer, x, y = _encoder()
    f = hypergrad.stateless(layer)
    return attention_dense_hessian(lambda p: ((f(p, x) - y) ** 2).mean(), hypergrad.module_params(layer))


def _random_like(tree: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in tree.items()}


def test_plain_double_backward_through_default_attention_really_fails() -> None:
    """The premise: without the MATH backend, second order through SDPA raises (CPU flash kernel)."""
    layer, x, y = _encoder()
    p = {k: v.detach().requires_grad_(True) for k, v in layer.named_parameters()}
    loss = ((torch.func.functional_call(layer, p, (x,)) - y) ** 2).sum()
    (g,) = torch.autograd.grad(loss, [p["self_attn.in_proj_weight"]], create_graph=True)
    with pytest.raises(RuntimeError, match="scaled_dot_product|not implemented"):
        torch.autograd.grad(g.sum(), [p["self_attn.in_proj_weight"]])


@pytest.mark.parametrize("mode", EXACT_MODES)
def test_hvp_through_transformer_layer_equalsattention_dense_hessian(mode: str, encoder_hessian: torch.Tensor) -> None:
    layer, x, y = _encoder()
    f = hypergrad.stateless(layer)
    params = hypergrad.module_params(layer)

    def loss(p: dict) -> torch.Tensor:
        return ((f(p, x) - y) ** 2).mean()

    h = encoder_hessian
    assert torch.allclose(h, h.T, atol=1e-10)  # the reference itself is a Hessian
    v = _random_like(params, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hypergrad.HVPFallbackWarning)  # no fallback by default
        op = HessianOperator(loss, params, mode=mode)
        out = tree_ravel(op(v))[0]
        single = tree_ravel(hvp(loss, params, v, mode=mode))[0]
    expected = h @ tree_ravel(v)[0]
    scale = float(expected.norm())
    assert float((out - expected).norm()) <= 1e-10 * scale
    assert float((single - expected).norm()) <= 1e-10 * scale
    assert op.mode == ("rev_rev_cached" if mode == "auto" else mode)  # the default: the cached reverse graph


def test_finite_difference_hvp_through_transformer_layer(encoder_hessian: torch.Tensor) -> None:
    layer, x, y = _encoder()
    f = hypergrad.stateless(layer)
    params = hypergrad.module_params(layer)
    loss = lambda p: ((f(p, x) - y) ** 2).mean()
    v = _random_like(params, 2)
    expected = encoder_hessian @ tree_ravel(v)[0]
    out = tree_ravel(hvp(loss, params, v, mode="finite_diff"))[0]
    assert float((out - expected).norm()) <= 1e-6 * float(expected.norm())


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_rev", "auto", "finite_diff"])
def test_mixed_product_through_attention_equals_double_backward(mode: str) -> None:
    """G(theta, lam) with lam = the layer's input (an upstream encoder's output)."""
    layer, x, y = _encoder()
    f = hypergrad.stateless(layer)
    params = hypergrad.module_params(layer)

    def G(p: dict, h: dict) -> torch.Tensor:
        return ((f(p, h["x"]) - y) ** 2).mean()

    v = _random_like(params, 3)
    keys = list(params)
    p = [params[k].detach().clone().requires_grad_(True) for k in keys]
    xx = x.clone().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        g = torch.autograd.grad(G(dict(zip(keys, p)), {"x": xx}), p, create_graph=True)
        (expected,) = torch.autograd.grad(sum((gi * v[k]).sum() for gi, k in zip(g, keys)), [xx])
    with warnings.catch_warnings():
        warnings.simplefilter("error", hypergrad.HVPFallbackWarning)
        out = mixed_hvp(G, params, {"x": x}, v, mode=mode)["x"]
    tol = 1e-6 if mode == "finite_diff" else 1e-10
    assert float((out - expected).norm()) <= tol * float(expected.norm())


def test_implicit_grad_through_attention_default_configuration_no_warning(encoder_hessian: torch.Tensor) -> None:
    layer, x, y = _encoder()
    f = hypergrad.stateless(layer)
    params = hypergrad.module_params(layer)

    def G(p: dict, h: dict) -> torch.Tensor:
        return ((f(p, h["x"]) - y) ** 2).mean() + 0.5 * sum((t**2).sum() for t in p.values())

    def F(p: dict, h: dict) -> torch.Tensor:
        return (f(p, h["x"]) ** 2).mean()

    with warnings.catch_warnings():
        warnings.simplefilter("error", hypergrad.HVPFallbackWarning)
        res = hypergrad.implicit_grad(G, F, params, {"x": x}, solver=hypergrad.Dense())
    assert res.solution.converged
    n = tree_ravel(params)[0].numel()
    h = encoder_hessian + torch.eye(n, dtype=F64)  # Hessian of G
    gF = torch.func.grad(lambda p: F(p, {"x": x}))(params)
    v = torch.linalg.solve(h, tree_ravel(gF)[0])
    unravel = tree_ravel(params)[1]
    cross = mixed_hvp(G, params, {"x": x}, unravel(v), mode="rev_rev")["x"]
    direct = torch.func.grad(lambda h_: F(params, h_))({"x": x})["x"]
    expected = direct - cross
    assert float((res.grad["x"] - expected).norm()) <= 1e-8 * float(expected.norm())


def test_hypergradient_over_a_named_parameter_subset_equals_dense_formula() -> None:
    """Inner variables = the last block's parameters only; the rest of the model is frozen."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    x, y = torch.randn(10, 3, dtype=F64), torch.randn(10, 2, dtype=F64)
    xv, yv = torch.randn(7, 3, dtype=F64), torch.randn(7, 2, dtype=F64)
    f = hypergrad.stateless(net)
    all_params = hypergrad.module_params(net)
    subset = {k: v for k, v in all_params.items() if k.startswith("4.")}  # the last Linear only
    hparams = {"log_wd": torch.tensor(-1.0, dtype=F64)}

    def G(p: dict, h: dict) -> torch.Tensor:
        return ((f(p, x) - y) ** 2).mean() + 0.5 * h["log_wd"].exp() * sum((t**2).sum() for t in p.values())

    def F(p: dict, h: dict) -> torch.Tensor:
        return ((f(p, xv) - yv) ** 2).mean()

    seen: list[set] = []

    def G_watch(p: dict, h: dict) -> torch.Tensor:
        seen.append(set(p))
        return G(p, h)

    res = hypergrad.implicit_grad(G_watch, F, subset, hparams, solver=hypergrad.Dense())
    assert all(keys == set(subset) for keys in seen)  # the frozen parameters never enter a Hessian
    assert set(res.solution.x) == set(subset)
    # dense formula on the subset: d_lam F - G_{lam theta} H^{-1} grad_theta F
    flat, unravel = tree_ravel(subset)
    Gf = lambda t, lw: G(unravel(t), {"log_wd": lw})
    H = torch.func.hessian(Gf, argnums=0)(flat, hparams["log_wd"])
    G_lt = torch.func.jacrev(torch.func.grad(Gf, argnums=0), argnums=1)(flat, hparams["log_wd"])
    gF = torch.func.grad(lambda t: F(unravel(t), hparams))(flat)
    expected = -(G_lt @ torch.linalg.solve(H, gF))
    torch.testing.assert_close(res.grad["log_wd"], expected, rtol=1e-10, atol=1e-14)
    # the same through the model with the frozen blocks as requires_grad=False
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith("4."))
    assert set(hypergrad.module_params(net)) == set(subset)
