"""The autograd bridge (custom_root / custom_fixed_point) against dense implicit-function references
and central finite differences, in float64, around three real inner solvers: ``torch.linalg.solve``
(ridge), ``torch.optim.LBFGS`` (logistic regression) and a DEQ fixed-point loop inside a network.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergrad

F64 = torch.float64


def _central_difference(f, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """d f / d x entry by entry (f returns a float)."""
    out = torch.zeros_like(x)
    flat = out.view(-1)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = eps
        e = e.view_as(x)
        flat[i] = (f(x + e) - f(x - e)) / (2 * eps)
    return out


# ------------------------------------------------------------------------------------------ ridge
def _ridge_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(30, 4, generator=gen, dtype=F64)
    y = torch.randn(30, generator=gen, dtype=F64)
    Xv = torch.randn(12, 4, generator=gen, dtype=F64)
    return X, y, Xv


def _make_ridge(X: torch.Tensor) -> hypergrad.ImplicitFunction:
    def optimality(w: torch.Tensor, lam: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return X.T @ (X @ w - y) + lam * w

    @hypergrad.custom_root(optimality, solver=hypergrad.CG(max_steps=50, rtol=1e-13), symmetric=True)
    def ridge(lam: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=X.dtype), X.T @ y)

    return ridge


def test_ridge_around_linalg_solve_matches_dense_formula_and_finite_differences() -> None:
    X, y, Xv = _ridge_data()
    ridge = _make_ridge(X)
    lam = torch.tensor(0.8, dtype=F64, requires_grad=True)
    scale = torch.tensor(1.5, dtype=F64, requires_grad=True)  # upstream of y: y_used = scale * y
    w = ridge(lam, scale * y)
    loss = 0.5 * ((Xv @ w) ** 2).sum()
    loss.backward()
    assert ridge.last_solution is not None and ridge.last_solution.converged
    # dense implicit-function formula: A = X^T X + lam I, dw/dlam = -A^-1 w, dw/dy = A^-1 X^T
    A = X.T @ X + 0.8 * torch.eye(4, dtype=F64)
    gw = Xv.T @ (Xv @ w.detach())
    u = torch.linalg.solve(A, gw)
    torch.testing.assert_close(lam.grad, -(u @ w.detach()), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(scale.grad, (X @ u) @ y, rtol=1e-10, atol=1e-14)
    # central finite differences of the whole forward (linalg.solve)
    f = lambda lam_, s_: float(0.5 * ((Xv @ ridge(lam_, s_ * y)) ** 2).sum())
    fd_lam = _central_difference(lambda t: f(t, scale.detach()), lam.detach())
    fd_s = _central_difference(lambda t: f(lam.detach(), t), scale.detach())
    torch.testing.assert_close(lam.grad, fd_lam, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(scale.grad, fd_s, rtol=1e-7, atol=1e-10)


def test_ridge_gradcheck() -> None:
    X, y, _ = _ridge_data()
    ridge = _make_ridge(X)
    lam = torch.tensor(0.8, dtype=F64, requires_grad=True)
    yy = y.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ridge(a, b), (lam, yy), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------ L-BFGS
def _logistic_data() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(40, 3, generator=gen, dtype=F64)
    t = (X @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + 0.3 * torch.randn(40, generator=gen, dtype=F64) > 0).to(F64)
    Xv = torch.randn(20, 3, generator=gen, dtype=F64)
    tv = (Xv @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) > 0).to(F64)
    return X, t, Xv, tv


def test_logistic_regression_around_lbfgs() -> None:
    X, t, Xv, tv = _logistic_data()

    def G(w: torch.Tensor, log_lam: torch.Tensor) -> torch.Tensor:
        return (
            nn.functional.binary_cross_entropy_with_logits(X @ w, t, reduction="sum")
            + 0.5 * log_lam.exp() * (w**2).sum()
        )

    def optimality(w: torch.Tensor, log_lam: torch.Tensor) -> torch.Tensor:
        return torch.func.grad(G)(w, log_lam)

    @hypergrad.custom_root(optimality, solver=hypergrad.CG(max_steps=50, rtol=1e-13), symmetric=True)
    def fit(log_lam: torch.Tensor) -> torch.Tensor:
        w = torch.zeros(3, dtype=F64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [w], lr=1.0, max_iter=500, tolerance_grad=1e-14, tolerance_change=0.0, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = G(w, log_lam)
            loss.backward()
            return loss

        for _ in range(3):  # restarts: L-BFGS stops on its evaluation budget before 1e-14
            opt.step(closure)
        return w.detach()

    def F(w: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(Xv @ w, tv)

    log_lam = torch.tensor(0.2, dtype=F64, requires_grad=True)
    w = fit(log_lam)
    F(w).backward()
    assert fit.last_solution is not None and fit.last_solution.converged
    w0 = w.detach()
    assert float(optimality(w0, log_lam.detach()).norm()) < 1e-8  # L-BFGS reached the root (to its limit)
    # dense implicit-function reference: -G_{lam w} H^-1 grad F
    H = torch.func.hessian(G)(w0, log_lam.detach())
    G_lw = torch.func.jacrev(optimality, argnums=1)(w0, log_lam.detach())
    gF = torch.func.grad(F)(w0)
    expected = -(G_lw @ torch.linalg.solve(H, gF))
    torch.testing.assert_close(log_lam.grad, expected, rtol=1e-9, atol=1e-14)

    def newton(s: torch.Tensor) -> torch.Tensor:
        """The inner problem to machine precision (L-BFGS stalls near 1e-10 in float64), for the FD reference."""
        w_ = w0.clone()
        for _ in range(8):
            w_ = w_ - torch.linalg.solve(torch.func.hessian(G)(w_, s), optimality(w_, s))
        return w_

    fd = _central_difference(lambda s: float(F(newton(s))), log_lam.detach(), eps=1e-5)
    torch.testing.assert_close(log_lam.grad, fd, rtol=1e-6, atol=1e-10)


# ------------------------------------------------------------------------------------------ DEQ
class DEQ(nn.Module):
    """z* = tanh(W z* + x) (W scaled to a contraction), differentiated by custom_fixed_point."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        with torch.no_grad():
            self.lin.weight.mul_(0.4 / torch.linalg.matrix_norm(self.lin.weight, ord=2))

        def phi(z: torch.Tensor, x: torch.Tensor, params: dict) -> torch.Tensor:
            return torch.tanh(functional_call(self.lin, params, (z,)) + x)

        self.phi = phi

        @hypergrad.custom_fixed_point(phi, solver=hypergrad.FixedPoint(max_steps=200, rtol=1e-14))
        def equilibrium(x: torch.Tensor, params: dict) -> torch.Tensor:
            z = torch.zeros_like(x)
            for _ in range(200):
                z = phi(z, x, params)
            return z

        self.equilibrium = equilibrium

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.equilibrium(x, dict(self.lin.named_parameters()))


def _deq_net() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), DEQ(4), nn.Linear(4, 2)).to(F64)
    x = torch.randn(5, 3, dtype=F64)
    y = torch.randn(5, 2, dtype=F64)
    return net, x, y


def test_deq_layer_gradients_reach_the_encoder_and_match_dense_formula_and_finite_differences() -> None:
    net, x, y = _deq_net()
    enc, deq, head = net[0], net[1], net[2]
    loss = ((net(x) - y) ** 2).mean()
    loss.backward()
    assert enc.weight.grad is not None and float(enc.weight.grad.abs().sum()) > 0  # the encoder is reached
    assert deq.equilibrium.last_solution.converged
    got = {k: p.grad.clone() for k, p in net.named_parameters()}

    # dense reference: u = (I - dphi/dz)^-T dL/dz*, then one VJP of phi through the encoder and the DEQ weights
    net.zero_grad()
    params = dict(deq.lin.named_parameters())
    with torch.no_grad():
        x_in = enc(x)
        z = deq(x_in)
    zc = z.clone().requires_grad_(True)
    gz = torch.autograd.grad(((head(zc) - y) ** 2).mean(), zc)[0]
    jac = torch.func.jacrev(lambda zz: deq.phi(zz, x_in, {k: v.detach() for k, v in params.items()}))(z)
    n = z.numel()
    J = jac.reshape(n, n)
    u = torch.linalg.solve((torch.eye(n, dtype=F64) - J).T, gz.reshape(-1)).reshape_as(z)
    surrogate = ((head(z) - y) ** 2).mean() + (deq.phi(z, enc(x), params) * u).sum()
    surrogate.backward()
    for k, p in net.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-9, atol=1e-12, msg=k)

    # central finite differences on the encoder's weight (the whole forward, DEQ loop included)
    w0 = enc.weight.detach().clone()

    def f(w: torch.Tensor) -> float:
        with torch.no_grad():
            enc.weight.copy_(w)
            out = float(((net(x) - y) ** 2).mean())
            enc.weight.copy_(w0)
        return out

    fd = _central_difference(f, w0, eps=1e-6)
    torch.testing.assert_close(got["0.weight"], fd, rtol=1e-6, atol=1e-9)


def test_deq_gradcheck() -> None:
    net, x, _ = _deq_net()
    deq = net[1]
    xin = torch.randn(2, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: deq(a), (xin,), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------ errors
def test_captured_tensor_requiring_grad_is_refused() -> None:
    lin = nn.Linear(2, 2).to(F64)
    bad = hypergrad.custom_root(lambda z, a: z - lin(a), solver=hypergrad.Dense())(lambda a: lin(a).detach())
    with pytest.raises(TypeError, match=r"depends on tensors that require grad but are not arguments"):
        bad(torch.ones(2, dtype=F64, requires_grad=True))


def test_cg_refuses_a_non_symmetric_bridge_and_failed_backward_solve_warns() -> None:
    phi = lambda z, a: 0.5 * torch.tanh(z) + a
    f = hypergrad.custom_fixed_point(phi, solver=hypergrad.CG(max_steps=5))(lambda a: a.detach())
    a = torch.ones(2, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="CG assumes a symmetric operator"):
        f(a).sum().backward()
    g = hypergrad.custom_fixed_point(phi, solver=hypergrad.FixedPoint(max_steps=1, rtol=1e-14))(lambda a: a.detach())
    with pytest.warns(hypergrad.SolveFailedWarning, match="max_steps_reached"):
        g(a).sum().backward()
    assert g.last_solution.failed
    h = hypergrad.custom_fixed_point(phi, solver=hypergrad.FixedPoint(max_steps=1, rtol=1e-14), on_failure="raise")(
        lambda a: a.detach()
    )
    with pytest.raises(hypergrad.SolverError):
        h(a).sum().backward()


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"custom_root: `solver` must be a hypergrad solver"):
        hypergrad.custom_root(lambda x: x, solver="cg")
    with pytest.raises(ValueError, match=r"on_failure='skip'.*only makes sense inside hypergrad.BilevelProblem"):
        hypergrad.custom_root(lambda x: x, solver=hypergrad.Dense(), on_failure="skip")
    f = hypergrad.custom_root(lambda x, a: x - a, solver=hypergrad.Dense())(lambda a: "not a tensor")
    with pytest.raises(TypeError, match=r"must return a Tensor or a non-empty dict of tensors, got str"):
        f(torch.ones(1))


def test_guide_deq_example_runs() -> None:
    """The DEQ example of docs/guide/custom_root.md runs and does what it says."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "guide" / "custom_root.md"
    (block,) = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    namespace: dict = {}
    exec(compile(block, str(page), "exec"), namespace)
    net = namespace["net"]
    assert float(net[0].weight.grad.norm()) > 0
    assert net[1].equilibrium.last_solution.converged
