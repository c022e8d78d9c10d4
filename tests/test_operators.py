"""HVP operators against dense ``torch.func`` references in float64."""

from __future__ import annotations

import copy
import warnings
from typing import Callable, NamedTuple

import pytest
import torch
from torch import nn
from torch.func import hessian, jacfwd, jacrev

import hypergrad
from hypergrad import Damped, FixedPointOperator, HessianOperator, HVPFallbackWarning, hvp, mixed_hvp, tree_ravel

F64 = torch.float64
EXACT_MODES = ["fwd_rev", "rev_rev", "rev_rev_cached", "auto", "fwd_rev_linearized"]


def dense_hessian(fn, params: dict) -> torch.Tensor:
    """The reference: ``torch.func.hessian`` of ``fn`` on the flattened parameters.

    It is applied to hand-written losses built from elementary ops only: with torch 2.15,
    ``torch.func.hessian`` of the fused ``batch_norm`` (batch statistics) and ``layer_norm`` kernels
    is wrong (asymmetric), although single HVPs through them are right.
    """
    flat, unravel = tree_ravel(params)
    return hessian(lambda x: fn(unravel(x)))(flat)


def random_tree(like: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device) for k, v in like.items()}


def assert_tree_close(actual: dict, expected_flat: torch.Tensor, rtol: float) -> None:
    flat = tree_ravel(actual)[0]
    err = float(torch.linalg.vector_norm(flat - expected_flat))
    assert err <= rtol * max(1.0, float(torch.linalg.vector_norm(expected_flat))), err


class Problem(NamedTuple):
    net: nn.Module
    fn: Callable  # loss(params) through hypergrad.stateless
    params: dict
    reference: Callable  # the same loss written by hand with elementary ops
    module_loss: Callable  # the same loss from the module's own forward (on a copy)


def _norm(z: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    mean = z.mean(dims, keepdim=True)
    return (z - mean) / torch.sqrt(((z - mean) ** 2).mean(dims, keepdim=True) + eps)


def mlp_problem(device: str) -> Problem:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 1)).to(device, F64)
    x = torch.randn(16, 4, dtype=F64, device=device)
    y = torch.randn(16, 1, dtype=F64, device=device)
    f = hypergrad.stateless(net)

    def reference(p: dict) -> torch.Tensor:
        h = torch.tanh(x @ p["0.weight"].T + p["0.bias"])
        h = torch.tanh(h @ p["2.weight"].T + p["2.bias"])
        return ((h @ p["4.weight"].T + p["4.bias"] - y) ** 2).mean()

    return Problem(
        net,
        lambda p: ((f(p, x) - y) ** 2).mean(),
        hypergrad.module_params(net),
        reference,
        lambda: ((copy.deepcopy(net)(x) - y) ** 2).mean(),
    )


def _norm_problem(device: str, norm: nn.Module, dims: tuple[int, ...], batch: int, seed: int) -> Problem:
    """Linear -> normalisation layer -> tanh -> Linear, with a hand-written twin as reference."""
    torch.manual_seed(seed)
    width = norm.weight.numel()
    net = nn.Sequential(nn.Linear(3, width), norm, nn.Tanh(), nn.Linear(width, 1)).to(device, F64)
    net.train()
    with torch.no_grad():  # a non-trivial affine part
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.normal_()
    x = torch.randn(batch, 3, dtype=F64, device=device)
    y = torch.randn(batch, 1, dtype=F64, device=device)
    f = hypergrad.stateless(net)

    def reference(p: dict) -> torch.Tensor:
        z = _norm(x @ p["0.weight"].T + p["0.bias"], dims, net[1].eps) * p["1.weight"] + p["1.bias"]
        return ((torch.tanh(z) @ p["3.weight"].T + p["3.bias"] - y) ** 2).mean()

    return Problem(
        net,
        lambda p: ((f(p, x) - y) ** 2).mean(),
        hypergrad.module_params(net),
        reference,
        lambda: ((copy.deepcopy(net)(x) - y) ** 2).mean(),
    )


def bn_problem(device: str) -> Problem:
    """BatchNorm in training mode: batch statistics; the running statistics hold junk that must stay unused."""
    bn = nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(2.0)
    return _norm_problem(device, bn, (0,), batch=12, seed=1)


def ln_problem(device: str) -> Problem:
    return _norm_problem(device, nn.LayerNorm(6), (-1,), batch=10, seed=2)


PROBLEMS = {"mlp_tanh": mlp_problem, "batchnorm": bn_problem, "layernorm": ln_problem}


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_stateless_matches_module_and_reference(problem: str) -> None:
    """Value and gradient of the stateless function equal the module's own forward and the reference."""
    net, fn, params, reference, module_loss = PROBLEMS[problem]("cpu")
    assert set(params) == set(dict(net.named_parameters()))
    torch.testing.assert_close(fn(params), module_loss().detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(fn(params), reference(params), rtol=1e-13, atol=1e-13)
    g = torch.func.grad(fn)(params)
    g_ref = torch.func.grad(reference)(params)
    for k in params:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("mode", EXACT_MODES)
def test_hvp_matches_dense_hessian(problem: str, mode: str, device: str) -> None:
    net, fn, params, reference, _ = PROBLEMS[problem](device)
    buffers_before = {k: b.clone() for k, b in net.named_buffers()}
    h = dense_hessian(reference, params)
    assert torch.allclose(h, h.T, atol=1e-12) and float(h.abs().max()) > 1e-3  # a real, non-trivial Hessian
    op = HessianOperator(fn, params, mode=mode)
    for seed in range(3):  # the same operator serves several right-hand sides (rev_rev_cached reuses its graph)
        v = random_tree(params, seed)
        out = op(v)
        assert set(out) == set(params) and all(out[k].shape == params[k].shape for k in params)
        assert not any(t.requires_grad for t in out.values())
        assert_tree_close(out, h @ tree_ravel(v)[0], 1e-10)
    assert_tree_close(hvp(fn, params, v, mode=mode), h @ tree_ravel(v)[0], 1e-10)
    for k, b in net.named_buffers():  # BatchNorm running statistics are never mutated
        assert torch.equal(b, buffers_before[k]), k


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_hvp_finite_diff(problem: str) -> None:
    _, fn, params, reference, _ = PROBLEMS[problem]("cpu")
    h = dense_hessian(reference, params)
    v = random_tree(params, 5)
    assert_tree_close(hvp(fn, params, v, mode="finite_diff"), h @ tree_ravel(v)[0], 1e-6)


def test_finite_diff_survives_directions_whose_norm_underflows() -> None:
    """A converged solver hands the operator residuals like 1e-24 in float32, whose squared norm
    underflows to 0; finite differences must still return the (linear) H v, not NaN."""
    _, fn, params, reference, _ = PROBLEMS["mlp_tanh"]("cpu")
    h = dense_hessian(reference, params)
    v = random_tree(params, 7)
    hv = h @ tree_ravel(v)[0]
    p32 = {k: t.float() for k, t in params.items()}
    fn32 = lambda p: fn({k: t.double() for k, t in p.items()}).float()
    tiny = {k: (t * 1e-24).float() for k, t in v.items()}
    assert float(torch.sqrt(sum((t * t).sum() for t in tiny.values()))) == 0.0  # the norm underflows
    out = hvp(fn32, p32, tiny, mode="finite_diff")
    assert all(bool(torch.isfinite(t).all()) for t in out.values())
    got = tree_ravel({k: t.double() for k, t in out.items()})[0] / 1e-24
    assert float(torch.linalg.vector_norm(got - hv) / torch.linalg.vector_norm(hv)) < 1e-2  # float32 FD accuracy
    zero = hvp(fn32, p32, {k: torch.zeros_like(t) for k, t in p32.items()}, mode="finite_diff")
    assert all(bool((t == 0).all()) for t in zero.values())


def test_batchnorm_running_stats_policy_matches_eval_mode() -> None:
    net, _, params, _, _ = bn_problem("cpu")
    x = torch.randn(12, 3, dtype=F64)
    f_run = hypergrad.stateless(net, buffers="running_stats")
    fn = lambda p: (f_run(p, x) ** 2).mean()
    net.eval()
    with torch.no_grad():
        expected_value = (net(x) ** 2).mean()
    net.train()
    torch.testing.assert_close(fn(params), expected_value, rtol=1e-14, atol=1e-14)
    v = random_tree(params, 6)
    assert_tree_close(hvp(fn, params, v), dense_hessian(fn, params) @ tree_ravel(v)[0], 1e-10)
    assert net.training and int(net[1].num_batches_tracked) == 0


def _mixed_problem(device: str) -> tuple:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(10, 3, generator=gen, dtype=F64).to(device)

    def G(p: dict, h: dict) -> torch.Tensor:
        z = torch.tanh(x @ p["w"] + p["b"])
        return (torch.exp(h["log_lam"]) * p["w"] ** 2).sum() + (h["scale"] * z**2).mean() + (z * h["shift"]).sum()

    params = {
        "w": torch.randn(3, generator=gen, dtype=F64).to(device),
        "b": torch.randn((), generator=gen, dtype=F64).to(device),
    }
    hparams = {
        "log_lam": torch.randn(3, generator=gen, dtype=F64).to(device),
        "scale": torch.tensor(0.7, dtype=F64, device=device),
        "shift": torch.tensor(-0.2, dtype=F64, device=device),
    }
    return G, params, hparams


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_rev", "auto", "finite_diff"])
def test_mixed_hvp_matches_dense_jacobian(mode: str, device: str) -> None:
    G, params, hparams = _mixed_problem(device)
    pflat, punravel = tree_ravel(params)
    hflat, hunravel = tree_ravel(hparams)
    # d/d(lam) of grad_theta G: shape (n_theta, n_lam); the mixed product is its transpose times v
    block = jacfwd(jacrev(lambda a, b: G(punravel(a), hunravel(b)), argnums=0), argnums=1)(pflat, hflat)
    v = random_tree(params, 7)
    out = mixed_hvp(G, params, hparams, v, mode=mode)
    assert set(out) == set(hparams) and all(out[k].shape == hparams[k].shape for k in hparams)
    assert_tree_close(out, block.T @ tree_ravel(v)[0], 1e-10)


def test_damped_adds_mu_identity() -> None:
    _, fn, params, reference, _ = mlp_problem("cpu")
    h = dense_hessian(reference, params)
    v = random_tree(params, 8)
    op = Damped(HessianOperator(fn, params), 0.37)
    assert_tree_close(op(v), (h + 0.37 * torch.eye(h.shape[0], dtype=F64)) @ tree_ravel(v)[0], 1e-10)
    assert_tree_close(Damped(HessianOperator(fn, params), 0.0)(v), h @ tree_ravel(v)[0], 1e-10)


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("mode", ["fwd_rev", "rev_rev_cached"])
def test_materialized_hessian_matches_reference(problem: str, mode: str) -> None:
    """``materialize`` (what ``Dense`` does) batches HVPs with vmap: the whole matrix must be right."""
    _, fn, params, reference, _ = PROBLEMS[problem]("cpu")
    m = hypergrad.materialize(HessianOperator(fn, params, mode=mode), params)
    torch.testing.assert_close(m, dense_hessian(reference, params), rtol=1e-10, atol=1e-12)


def test_fixed_point_operator_matches_dense_jacobian(device: str) -> None:
    gen = torch.Generator().manual_seed(3)
    w = (0.4 * torch.randn(5, 5, generator=gen, dtype=F64)).to(device)
    u = torch.randn(5, 2, generator=gen, dtype=F64).to(device)

    def phi(p: dict, h: dict) -> dict:
        return {"z": torch.tanh(w @ p["z"] + u @ h["x"]) * h["gain"]}

    params = {"z": torch.randn(5, generator=gen, dtype=F64).to(device)}
    hparams = {
        "x": torch.randn(2, generator=gen, dtype=F64).to(device),
        "gain": torch.tensor(0.9, dtype=F64, device=device),
    }
    j_theta = jacrev(lambda z: phi({"z": z}, hparams)["z"])(params["z"])  # (5, 5), not symmetric
    j_x = jacrev(lambda x: phi(params, {"x": x, "gain": hparams["gain"]})["z"])(hparams["x"])
    j_gain = jacrev(lambda g: phi(params, {"x": hparams["x"], "gain": g})["z"])(hparams["gain"])
    op = FixedPointOperator(phi, params, hparams)
    v = random_tree(params, 9)
    torch.testing.assert_close(op(v)["z"], v["z"] - j_theta.T @ v["z"], rtol=1e-12, atol=1e-12)
    cross = op.hparam_vjp(v)
    torch.testing.assert_close(cross["x"], j_x.T @ v["z"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cross["gain"], j_gain @ v["z"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.phi_value["z"], phi(params, hparams)["z"])


class _CubeNoJvp(torch.autograd.Function):
    """x**3 with a hand-written backward and no forward-mode (jvp) rule."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


def _cube_loss(p: dict) -> torch.Tensor:
    return _CubeNoJvp.apply(p["w"]).sum() + (p["w"] ** 2).sum()


def test_forward_mode_really_fails_without_jvp_rule() -> None:
    p = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=F64)}
    with pytest.raises((NotImplementedError, RuntimeError), match="jvp"):
        hvp(_cube_loss, p, {"w": torch.ones(3, dtype=F64)}, mode="fwd_rev")


def test_auto_takes_the_cached_reverse_graph_without_forward_mode_rules() -> None:
    """``"auto"`` resolves to ``"rev_rev_cached"`` (the fastest exact mode measured): a function without
    forward-mode rules needs no fallback and no warning. (Before the default changed, this test pinned
    ``"auto"`` -> ``"fwd_rev"`` -> warning -> ``"rev_rev"``.)"""
    p = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=F64)}
    op = HessianOperator(_cube_loss, p, mode="auto")
    assert op.mode == "auto"  # resolved on the first product, not before
    expected = torch.diag(6 * p["w"] + 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = op({"w": torch.ones(3, dtype=F64)})
        assert op.mode == "rev_rev_cached"
        out2 = op({"w": torch.tensor([0.0, 1.0, 0.0], dtype=F64)})
    torch.testing.assert_close(out["w"], expected @ torch.ones(3, dtype=F64), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(out2["w"], expected[:, 1], rtol=1e-14, atol=1e-14)


class _Sq3NoBackward(torch.autograd.Function):
    """3 x**2 (the derivative of the cube) with a jvp rule and a backward that raises."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return 3 * x**2

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("no double backward for this cube")

    @staticmethod
    def jvp(ctx, t: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 6 * x * t


class _CubeNoDoubleBackward(torch.autograd.Function):
    """x**3 whose backward (and jvp) go through ``_Sq3NoBackward``: forward-over-reverse works,
    reverse-over-reverse raises (on the first product: building the graph succeeds)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _Sq3NoBackward.apply(x) * g

    @staticmethod
    def jvp(ctx, t: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _Sq3NoBackward.apply(x) * t


def _cube_loss_no_double_backward(p: dict) -> torch.Tensor:
    return _CubeNoDoubleBackward.apply(p["w"]).sum() + (p["w"] ** 2).sum()


def test_auto_falls_back_to_fwd_rev_with_warning_when_reverse_mode_fails() -> None:
    p = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=F64)}
    with pytest.raises(NotImplementedError, match="no double backward"):
        hvp(_cube_loss_no_double_backward, p, {"w": torch.ones(3, dtype=F64)}, mode="rev_rev")
    op = HessianOperator(_cube_loss_no_double_backward, p, mode="auto")
    expected = torch.diag(6 * p["w"] + 2)
    with pytest.warns(HVPFallbackWarning, match=r"reverse-over-reverse HVP failed .*mode='fwd_rev'"):
        out = op({"w": torch.ones(3, dtype=F64)})
    assert op.mode == "fwd_rev"
    torch.testing.assert_close(out["w"], expected @ torch.ones(3, dtype=F64), rtol=1e-14, atol=1e-14)
    with warnings.catch_warnings():  # warns once per operator, not on every matvec
        warnings.simplefilter("error")
        out2 = op({"w": torch.tensor([0.0, 1.0, 0.0], dtype=F64)})
    torch.testing.assert_close(out2["w"], expected[:, 1], rtol=1e-14, atol=1e-14)


def test_auto_takes_fwd_rev_when_the_cached_graph_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory guard: with less free memory than the cached graph needs, ``"auto"`` keeps no graph
    and uses forward-over-reverse (logged, no warning: a choice, not a failure)."""
    import hypergrad.operators as ops

    _, fn, params, reference, _ = mlp_problem("cpu")
    h = dense_hessian(reference, params)
    calls = iter(range(0, 10**9, 10**6))  # "memory in use" grows by 1 MB per reading: the graph "takes" 1 MB
    monkeypatch.setattr(ops, "memory_in_use", lambda device: next(calls))
    monkeypatch.setattr(ops, "memory_available", lambda device: 1000)  # 1 kB left
    op = HessianOperator(fn, params)
    v = random_tree(params, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = op(v)
    assert op.mode == "fwd_rev" and op._apply is None  # no graph kept
    assert_tree_close(out, h @ tree_ravel(v)[0], 1e-10)
    monkeypatch.setattr(ops, "memory_available", lambda device: 10**12)  # plenty: the cached graph
    op = HessianOperator(fn, params)
    assert_tree_close(op(v), h @ tree_ravel(v)[0], 1e-10)
    assert op.mode == "rev_rev_cached" and op._apply is not None


def _cube_problem(cube: type[torch.autograd.Function]) -> tuple[Callable, Callable, dict, dict]:
    """``(G, F, params, hparams)``: G = sum(w^3)/3 + |w|^2 - lam.w with ``cube`` computing w^3, F = |w|^2 / 2.

    grad_w G = w^2 + 2 w - lam, so the inner solution is the root w* = -1 + sqrt(1 + lam) > 0.
    """

    def G(p: dict, h: dict) -> torch.Tensor:
        return cube.apply(p["w"]).sum() / 3 + (p["w"] ** 2).sum() - (h["lam"] * p["w"]).sum()

    def F(p: dict, h: dict) -> torch.Tensor:
        return 0.5 * (p["w"] ** 2).sum()

    lam = torch.tensor([3.0, 8.0], dtype=F64)
    return G, F, {"w": -1 + torch.sqrt(1 + lam)}, {"lam": lam}


def _assert_cube_hypergradient(g: dict, params: dict) -> None:
    w_star = params["w"]
    # dw*/dlam = 1 / (2 w* + 2), dF/dlam = w* dw*/dlam
    torch.testing.assert_close(g["lam"], w_star / (2 * w_star + 2), rtol=1e-12, atol=1e-14)


def test_auto_mixed_product_and_implicit_grad_without_forward_mode_rules() -> None:
    G, F, params, hparams = _cube_problem(_CubeNoJvp)  # built from the jvp-less op
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default needs no fallback here
        g, sol = hypergrad.implicit_grad(G, F, params, hparams, solver=hypergrad.CG(max_steps=5, rtol=1e-14))
    _assert_cube_hypergradient(g, params)
    assert sol.converged
    with pytest.raises((NotImplementedError, RuntimeError), match="jvp"):
        hypergrad.implicit_grad(G, F, params, hparams, solver=hypergrad.CG(max_steps=5), hvp_mode="fwd_rev")


def test_auto_fallback_inside_implicit_grad_gives_the_right_hypergradient() -> None:
    """Reverse mode fails (no double backward): the Hessian and the mixed product fall back to forward mode."""
    G, F, params, hparams = _cube_problem(_CubeNoDoubleBackward)
    with pytest.warns(HVPFallbackWarning, match="reverse-over-reverse"):
        g, sol = hypergrad.implicit_grad(G, F, params, hparams, solver=hypergrad.CG(max_steps=5, rtol=1e-14))
    _assert_cube_hypergradient(g, params)
    assert sol.converged


def test_stateless_refuses_a_misspelt_parameter_key() -> None:
    net = nn.Linear(2, 1).to(F64)
    f = hypergrad.stateless(net)
    with pytest.raises(ValueError, match=r"key\(s\) \['wieght'\] that name no parameter .*did you mean 'weight'"):
        f({"wieght": torch.zeros(1, 2, dtype=F64)}, torch.ones(1, 2, dtype=F64))
    with pytest.raises(TypeError, match=r"`params` must be a dict"):
        f([torch.zeros(1, 2, dtype=F64)], torch.ones(1, 2, dtype=F64))
    out = f({"weight": torch.zeros(1, 2, dtype=F64)}, torch.ones(1, 2, dtype=F64))
    torch.testing.assert_close(out, net.bias.detach().reshape(1, 1))  # the given weight, not the module's


def test_stateless_runs_sync_batchnorm_with_batch_statistics_and_leaves_its_buffers_alone() -> None:
    """SyncBatchNorm (no process group: local statistics) refuses num_batches_tracked=None in training mode;
    ``stateless`` must still run it, equal to plain BatchNorm, its buffers untouched, and its HVP equal."""
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(F64).train()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    assert isinstance(synced[1], nn.SyncBatchNorm)
    before = {k: b.clone() for k, b in synced.named_buffers()}
    x = torch.randn(8, 3, dtype=F64)
    f_plain, f_sync = hypergrad.stateless(plain), hypergrad.stateless(synced)
    params = hypergrad.module_params(plain)
    loss = lambda f: lambda p: (f(p, x) ** 2).mean()
    torch.testing.assert_close(loss(f_sync)(params), loss(f_plain)(params), rtol=0, atol=0)
    v = {k: torch.randn_like(t) for k, t in params.items()}
    torch.testing.assert_close(hvp(loss(f_sync), params, v), hvp(loss(f_plain), params, v), rtol=1e-12, atol=0)
    for k, b in synced.named_buffers():
        assert torch.equal(b, before[k]), k


def test_stateless_running_stats_restores_the_training_flag_even_on_error() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).to(F64).train()
    f = hypergrad.stateless(net, buffers="running_stats")
    f(hypergrad.module_params(net), torch.randn(4, 2, dtype=F64))
    assert net.training and net[1].training
    with pytest.raises(RuntimeError):
        f(hypergrad.module_params(net), torch.randn(4, 5, dtype=F64))  # wrong input width
    assert net.training and net[1].training


def test_hvp_direction_and_meta_errors_name_the_argument() -> None:
    p = {"w": torch.ones(3, dtype=F64)}
    f = lambda q: (q["w"] ** 3).sum()
    with pytest.raises(
        ValueError, match=r"hvp: `v` must have the keys of `params`; missing \['w'\], unexpected \['x'\]"
    ):
        hvp(f, p, {"x": torch.ones(3, dtype=F64)})
    with pytest.raises(ValueError, match=r"hvp: `v\['w'\]` has shape \(2,\) but `params\['w'\]` has shape \(3,\)"):
        hvp(f, p, {"w": torch.ones(2, dtype=F64)})
    with pytest.raises(ValueError, match=r"mixed_hvp: `v\['w'\]` is torch.float32"):
        mixed_hvp(lambda q, h: f(q) * h["a"].sum(), p, {"a": torch.ones(1, dtype=F64)}, {"w": torch.ones(3)})
    with pytest.raises(ValueError, match=r"meta tensor"):
        hvp(f, {"w": torch.ones(3, device="meta")}, {"w": torch.ones(3, device="meta")})
    with (
        torch.inference_mode(),
        pytest.raises(RuntimeError, match=r"implicit_grad was called under torch.inference_mode"),
    ):
        hypergrad.implicit_grad(
            lambda q, h: ((q["w"] - h["a"]) ** 2).sum(),
            lambda q, h: q["w"].sum(),
            p,
            {"a": torch.ones(3, dtype=F64)},
            solver=hypergrad.Dense(),
        )


@pytest.mark.parametrize("mode", ["auto", "rev_rev", "rev_rev_cached"])
def test_reverse_modes_inside_vmap_need_no_fallback(mode: str) -> None:
    """A first product inside ``vmap`` (``Dense`` materialises a fresh operator) works without a fallback."""
    _, fn, params, reference, _ = mlp_problem("cpu")
    op = HessianOperator(fn, params, mode=mode)
    flat, unravel = tree_ravel(params)
    eye = torch.eye(flat.numel(), dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HVPFallbackWarning)
        cols = torch.func.vmap(lambda e: tree_ravel(op(unravel(e)))[0])(eye)
    assert op.mode == ("rev_rev_cached" if mode == "auto" else mode)
    torch.testing.assert_close(cols.T, dense_hessian(reference, params), rtol=1e-10, atol=1e-12)
