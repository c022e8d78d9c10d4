"""K-FAC preconditioning against closed forms and dense references (float64).

For one linear (or convolution) layer under the MSE loss the model is linear in its weights, so
the Hessian is the Gauss-Newton matrix and K-FAC's Kronecker product is exact:
``L = 1/(N D) sum_n ||W a_n - y_n||^2`` has ``H = (2/D) I_out kron (1/N) sum_n a_n a_n^T`` (rows
of ``W`` flattened out-major, a bias as a last input column of ones; for a convolution the
positions ``t`` of the unfolded patches count as examples: ``H = (2/C_out) I kron mean_{n,t} a a^T``).
For one linear layer under cross-entropy ``G = (1/N) sum_n (diag(p_n) - p_n p_n^T)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad
from hypergrad import CG, KFAC, PCG
from tests.helpers_problem import double_backward_hessian as dense_hessian

F64 = torch.float64


def dense_apply(built, n: int) -> torch.Tensor:
    """The matrix of ``built.apply`` (one application per column of the identity)."""
    return torch.stack([built.apply(e) for e in torch.eye(n, dtype=F64)], dim=1)


def flat(tree: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in tree.values()])


@pytest.mark.parametrize("bias", [False, True])
def test_linear_mse_factors_equal_the_exact_gauss_newton_block(bias: bool) -> None:
    torch.manual_seed(0)
    net = nn.Linear(5, 3, bias=bias).double()
    x, y = torch.randn(11, 5, dtype=F64), torch.randn(11, 3, dtype=F64)
    f, params = hypergrad.stateless(net), hypergrad.module_params(net)
    H = dense_hessian(lambda p: F.mse_loss(f(p, x), y), params)
    # the closed form, rows of W out-major then the bias
    a = torch.cat([x, torch.ones(11, 1, dtype=F64)], dim=1) if bias else x
    closed = torch.kron((2.0 / 3) * torch.eye(3, dtype=F64), a.T @ a / 11)
    if bias:  # reorder [W | b] (out-major) to the tree's order: W rows then b
        n_in = 6
        order = [o * n_in + i for o in range(3) for i in range(5)] + [o * n_in + 5 for o in range(3)]
        closed = closed[order][:, order]
    torch.testing.assert_close(H, closed, rtol=1e-10, atol=1e-12)
    shift, scale = 0.3, 2.0
    built = KFAC(net, x, loss="mse", shift=shift, scale=scale).build(lambda v: v, params)
    n = H.shape[0]
    M = torch.linalg.inv(dense_apply(built, n))
    torch.testing.assert_close((M - shift * torch.eye(n, dtype=F64)) / scale, H, rtol=1e-9, atol=1e-10)
    assert built.forward_passes == 1 and built.backward_passes == 3 and built.num_matvecs == 0
    assert built.layers == ("<root>",)


def test_conv_mse_factors_equal_the_exact_gauss_newton_block() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Flatten()).double()
    x = torch.randn(4, 2, 5, 5, dtype=F64)
    f, params = hypergrad.stateless(net), hypergrad.module_params(net)
    y = torch.randn_like(f(params, x))
    H = dense_hessian(lambda p: F.mse_loss(f(p, x), y), params)
    built = KFAC(net, x, loss="mse", shift=1.0, scale=1.0).build(lambda v: v, params)
    n = H.shape[0]
    M = torch.linalg.inv(dense_apply(built, n))
    torch.testing.assert_close(M - torch.eye(n, dtype=F64), H, rtol=1e-9, atol=1e-10)


def test_conv_reduce_factors_closed_form() -> None:
    """K-FAC-reduce for conv + MSE: G = (2/C_out) I (sums of one-hot columns), A = mean_n abar abar^T."""
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(2, 3, 2, padding=1), nn.Flatten()).double()
    x = torch.randn(5, 2, 4, 4, dtype=F64)
    params = hypergrad.module_params(net)
    built = KFAC(net, x, loss="mse", sharing="reduce", scale=0.5).build(lambda v: v, params)
    patches = F.unfold(x, 2, padding=1).transpose(1, 2)  # (N, T, 8)
    abar = torch.cat([patches, torch.ones_like(patches[..., :1])], dim=-1).mean(1)
    M = torch.eye(27, dtype=F64) + 0.5 * torch.kron((2.0 / 3) * torch.eye(3, dtype=F64), abar.T @ abar / 5)
    order = [o * 9 + i for o in range(3) for i in range(8)] + [o * 9 + 8 for o in range(3)]  # W rows, then b
    r = torch.randn(27, dtype=F64)
    r_kron = torch.empty(27, dtype=F64)
    r_kron[order] = r  # tree position j is Kronecker index order[j]
    torch.testing.assert_close(built.apply(r), torch.linalg.solve(M, r_kron)[order], rtol=1e-10, atol=1e-12)


def test_apply_equals_the_dense_inverse_of_the_kronecker_system() -> None:
    """One linear layer, cross-entropy, type-2 factors: A and G in closed form, M by torch.kron."""
    torch.manual_seed(2)
    net = nn.Linear(4, 5, bias=False).double()
    x = torch.randn(9, 4, dtype=F64)
    params = hypergrad.module_params(net)
    lam = 0.7
    built = KFAC(net, x, shift=1.0, scale=1.0 / lam).build(lambda v: v, params)
    p = torch.softmax(x @ params["weight"].T, dim=1)
    G = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    A = x.T @ x / 9
    M = torch.eye(20, dtype=F64) + torch.kron(G, A) / lam
    r = torch.randn(20, dtype=F64)
    torch.testing.assert_close(built.apply(r), torch.linalg.solve(M, r), rtol=1e-10, atol=1e-12)


def test_eigenvalue_correction_is_exact_where_kfac_is() -> None:
    torch.manual_seed(3)
    net = nn.Linear(4, 3).double()
    x = torch.randn(10, 4, dtype=F64)
    params = hypergrad.module_params(net)
    plain = KFAC(net, x, loss="mse").build(lambda v: v, params)
    corrected = KFAC(net, x, loss="mse", correction=True).build(lambda v: v, params)
    r = torch.randn(15, dtype=F64)
    torch.testing.assert_close(corrected.apply(r), plain.apply(r), rtol=1e-9, atol=1e-12)


def mlp_problem(bn: bool = False):
    torch.manual_seed(4)
    layers: list[nn.Module] = [nn.Linear(3, 6)]
    if bn:
        layers.append(nn.BatchNorm1d(6))
    layers += [nn.Tanh(), nn.Linear(6, 4)]
    net = nn.Sequential(*layers).double()
    x, y = torch.randn(12, 3, dtype=F64), torch.randint(0, 4, (12,))
    f, params = hypergrad.stateless(net), hypergrad.module_params(net)
    return net, x, params, lambda p: F.cross_entropy(f(p, x), y)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"correction": True},
        {"fisher": "mc", "num_samples": 3},
        {"others": "hutchinson", "hutchinson_samples": 4},
        {"sharing": "reduce", "correction": True},
    ],
    ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "type2",
)
def test_pcg_with_kfac_converges_to_the_dense_solution(settings: dict) -> None:
    net, x, params, loss = mlp_problem(bn=True)
    lam = 2.0
    H = hypergrad.HessianOperator(loss, params, mode="rev_rev")
    op = hypergrad.Damped(H, lam)  # lam I + H, positive definite here (checked below)
    Hd = dense_hessian(loss, params)
    n = Hd.shape[0]
    Ad = lam * torch.eye(n, dtype=F64) + Hd
    assert float(torch.linalg.eigvalsh(Ad)[0]) > 0
    gen = torch.Generator().manual_seed(5)
    b = {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in params.items()}
    pre = KFAC(net, x, shift=lam, scale=1.0, **settings)
    sol = PCG(pre, max_steps=200, rtol=1e-10)(op, b)
    assert sol.converged, sol.status
    torch.testing.assert_close(flat(sol.x), torch.linalg.solve(Ad, flat(b)), rtol=1e-7, atol=1e-9)
    expected = settings.get("hutchinson_samples", 0) if settings.get("others") == "hutchinson" else 0
    assert sol.stats["setup_matvecs"] == expected
    # the BatchNorm affine is outside the tracked layers: identity part is 1/shift there
    built = pre.build(op, b)
    assert built.layers == ("0", "3")
    if settings.get("others", "identity") == "identity":
        r = torch.randn(n, generator=gen, dtype=F64)
        keys = list(params)
        start = sum(params[k].numel() for k in keys[: keys.index("1.weight")])
        sl = slice(start, start + 12)  # 1.weight and 1.bias
        torch.testing.assert_close(built.apply(r)[sl], r[sl] / lam)


def test_kfac_beats_cold_cg_on_a_convex_ill_conditioned_problem() -> None:
    """Logistic regression with correlated features: K-FAC's A factor is the feature covariance."""
    torch.manual_seed(6)
    mix = torch.randn(8, 8, dtype=F64) * torch.logspace(0, -2, 8, dtype=F64)
    x = torch.randn(64, 8, dtype=F64) @ mix.T
    y = torch.randint(0, 3, (64,))
    net = nn.Linear(8, 3).double()
    f, params = hypergrad.stateless(net), hypergrad.module_params(net)
    op = hypergrad.Damped(hypergrad.HessianOperator(lambda p: F.cross_entropy(f(p, x), y), params), 1e-4)
    pcg = PCG(KFAC(net, x, shift=1e-4), max_steps=500, rtol=1e-8)(op, params)
    cg = CG(max_steps=500, rtol=1e-8)(op, params)
    assert pcg.converged and cg.converged
    assert 2 * pcg.num_matvecs < cg.num_matvecs, (pcg.num_matvecs, cg.num_matvecs)


def test_params_callable_gives_the_point() -> None:
    """Factors at a functional point equal those of a module holding those weights."""
    net, x, params, _ = mlp_problem()
    moved = {k: v + 0.3 * torch.randn_like(v) for k, v in params.items()}
    twin = mlp_problem()[0]
    with torch.no_grad():
        for k, p in twin.named_parameters():
            p.copy_(moved[k])
    r = torch.randn(sum(v.numel() for v in params.values()), dtype=F64)
    a = KFAC(net, x, params=lambda: moved).build(lambda v: v, moved).apply(r)
    b = KFAC(twin, x).build(lambda v: v, moved).apply(r)
    c = KFAC(net, x).build(lambda v: v, moved).apply(r)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_empirical_fisher_mse_closed_form() -> None:
    torch.manual_seed(7)
    net = nn.Linear(3, 2, bias=False).double()
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    params = hypergrad.module_params(net)
    built = KFAC(net, x, loss="mse", fisher="empirical", targets=y).build(lambda v: v, params)
    e = (2.0 / 2) * (x @ params["weight"].T - y)
    M = torch.eye(6, dtype=F64) + torch.kron(e.T @ e / 6, x.T @ x / 6)
    r = torch.randn(6, dtype=F64)
    torch.testing.assert_close(built.apply(r), torch.linalg.solve(M, r))


def test_bad_inputs_are_refused_with_named_errors() -> None:
    net, x, params, _ = mlp_problem()
    with pytest.raises(TypeError, match="model"):
        KFAC(lambda z: z, x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="inputs"):
        KFAC(net, [1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="params"):
        KFAC(net, x, params=params)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss"):
        KFAC(net, x, loss="hinge")
    with pytest.raises(ValueError, match="fisher"):
        KFAC(net, x, fisher="exact")
    with pytest.raises(ValueError, match="targets"):
        KFAC(net, x, fisher="empirical")
    with pytest.raises(ValueError, match="shift"):
        KFAC(net, x, shift=0.0)
    with pytest.raises(ValueError, match="scale"):
        KFAC(net, x, scale=-1.0)
    with pytest.raises(ValueError, match="sharing"):
        KFAC(net, x, sharing="mean")
    with pytest.raises(ValueError, match="num_samples"):
        KFAC(net, x, num_samples=0)
    with pytest.raises(TypeError, match="b"):
        KFAC(net, x).build(lambda v: v, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="nope"):
        KFAC(net, x).build(lambda v: v, {"nope": torch.ones(3, dtype=F64)})
    with pytest.raises(ValueError, match="targets"):
        KFAC(net, x, fisher="empirical", targets=torch.zeros(5, dtype=torch.long)).build(lambda v: v, params)
    seq = nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (2, 2))).double()
    with pytest.raises(ValueError, match="logits"):
        KFAC(seq, x).build(lambda v: v, hypergrad.module_params(seq))


class _Twice(nn.Module):
    """One linear layer applied twice (weight sharing across calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


@pytest.mark.parametrize("kind", ["cnn", "shared"])
def test_pcg_with_kfac_on_a_small_cnn_and_a_shared_layer(kind: str) -> None:
    torch.manual_seed(9)
    if kind == "cnn":
        net = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Conv2d(3, 4, 3, stride=2, bias=False),
            nn.Flatten(),
            nn.Linear(4, 3),
        ).double()
        x = torch.randn(6, 2, 4, 4, dtype=F64)
    else:
        net = _Twice().double()
        x = torch.randn(6, 3, dtype=F64)
    y = torch.randint(0, net(x).shape[1], (6,))
    f, params = hypergrad.stateless(net), hypergrad.module_params(net)
    loss = lambda p: F.cross_entropy(f(p, x), y)
    lam = 3.0
    op = hypergrad.Damped(hypergrad.HessianOperator(loss, params, mode="rev_rev"), lam)
    Ad = lam * torch.eye(sum(v.numel() for v in params.values()), dtype=F64) + dense_hessian(loss, params)
    assert float(torch.linalg.eigvalsh(Ad)[0]) > 0
    pre = KFAC(net, x, shift=lam, sharing="reduce" if kind == "cnn" else "expand", correction=True)
    sol = PCG(pre, max_steps=300, rtol=1e-10)(op, params)
    assert sol.converged, sol.status
    torch.testing.assert_close(flat(sol.x), torch.linalg.solve(Ad, flat(params)), rtol=1e-7, atol=1e-9)
    built = pre.build(op, params)
    assert built.layers == (("0", "3", "5") if kind == "cnn" else ("lin", "out"))


def test_float32_model_gives_a_float32_preconditioner() -> None:
    torch.manual_seed(10)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(8, 3)
    params = hypergrad.module_params(net)
    built = KFAC(net, x).build(lambda v: v, params)
    out = built.apply(torch.ones(26))
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    ref = (
        KFAC(net.double(), x.double()).build(lambda v: v, hypergrad.module_params(net)).apply(torch.ones(26, dtype=F64))
    )
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_non_finite_factors_are_reported_not_applied() -> None:
    net, x, params, loss = mlp_problem()
    bad = x.clone()
    bad[0, 0] = float("nan")
    built = KFAC(net, bad).build(lambda v: v, params)
    assert not built.finite
    op = hypergrad.Damped(hypergrad.HessianOperator(loss, params, mode="rev_rev"), 1.0)
    sol = PCG(KFAC(net, bad), max_steps=10, rtol=1e-8)(op, params)
    assert sol.status is hypergrad.Status.NONFINITE
