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
from tests.helpers_problem import double_backward_hessian as dense_hessian

F64 = torch.float64


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
    assert op.mode == "fwd_rev_linearized" and isinstance(op, hypergrad.HessianOperator)
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


@pytest.mark.parametrize("model", ["mlp", "bn_convnet"])
def test_hvp_mode_fwd_rev_linearized_equals_double_backward(model: str) -> None:
    """The mode itself (not the wrapper): ``HessianOperator(mode="fwd_rev_linearized")`` and ``hvp``."""
    if model == "mlp":
        fn, params = _mlp()
        net = None
    else:
        fn, params, net = _bn_convnet()
    before = {} if net is None else {k: b.clone() for k, b in net.named_buffers()}
    h = dense_hessian(fn, params)
    op = hypergrad.HessianOperator(fn, params, mode="fwd_rev_linearized")
    assert op.mode == "fwd_rev_linearized"
    torch.testing.assert_close(materialize(op, params), h, rtol=1e-10, atol=1e-10)
    v = {k: torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=F64) for k, p in params.items()}
    flat_v = torch.cat([v[k].reshape(-1) for k in params])
    out = hypergrad.hvp(fn, params, v, mode="fwd_rev_linearized")
    torch.testing.assert_close(torch.cat([out[k].reshape(-1) for k in params]), h @ flat_v, rtol=1e-10, atol=1e-10)
    for k, b in net.named_buffers() if net is not None else []:  # BatchNorm buffers unchanged
        assert torch.equal(b, before[k]), k


def _count_linearize(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import hypergrad.operators as ops

    calls = [0]
    real = ops.linearize

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "linearize", counting)
    return calls


@pytest.mark.parametrize("cls", ["Proximal", "Implicit"])
def test_reused_operator_keeps_its_linearisation_across_upper_steps(monkeypatch: pytest.MonkeyPatch, cls: str) -> None:
    """``reuse_operator=True`` + ``hvp_mode="fwd_rev_linearized"``: one ``torch.func.linearize`` per
    declared Hessian batch (the token), served to every upper step; a new batch linearises again.
    The hypergradients equal those of a problem that never reuses (``rev_rev``) at the same points."""
    from tests.helpers_problem import bissl_batches, bissl_problem, flat

    calls = _count_linearize(monkeypatch)
    solver = hypergrad.CG(max_steps=60, rtol=1e-13)

    def method(mode: str, reuse: bool):
        if cls == "Implicit":
            return hypergrad.Implicit(solver=solver, damping=5.0, hvp_mode=mode, reuse_operator=reuse)
        return hypergrad.Proximal(
            lam=0.5, damping=1.0, coupling={"backbone": "backbone"}, solver=solver, hvp_mode=mode, reuse_operator=reuse
        )

    pre, down = bissl_batches()
    problem, _, upper = bissl_problem(method("fwd_rev_linearized", True))
    ref, _, ref_upper = bissl_problem(method("rev_rev", False))
    for p in (problem, ref):
        p.inner_step(pre)
        p.new_hessian_batch(pre)
    for step in range(3):
        rec = problem.hypergradient(down)
        ref.hypergradient(down)
        assert rec.operator_reused is (step > 0)
        g = flat({k: q.grad for k, q in upper.named_parameters()})
        g_ref = flat({k: q.grad for k, q in ref_upper.named_parameters()})
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
    assert calls[0] == 1  # linearised once for the three upper steps
    assert problem.method_state.operator.mode == "fwd_rev_linearized"
    problem.new_hessian_batch(pre * 2.0)
    assert not problem.hypergradient(down).operator_reused
    assert calls[0] == 2  # a new Hessian batch: a new linearisation
