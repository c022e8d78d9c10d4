"""Shared pieces of the BilevelProblem tests: small problems, dense references, the error registry.

References never use hypergrad: dense Hessians from ``torch.func.hessian``/``jacrev`` and
``torch.linalg.solve`` on flattened parameters, in float64.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import grad, hessian, jacrev

import hypergrad

Batch = tuple[Tensor, Tensor]


def flat(tree: dict[str, Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1) for v in tree.values()])


def unflat(vec: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i : i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


def dense_implicit(G: Callable, F: Callable, theta: dict, lam: dict) -> dict[str, Tensor]:
    """``dF/dlam = d_lam F - (d2_{theta lam} G)^T (d2_theta G)^-1 d_theta F`` with dense matrices."""
    t0, l0 = flat(theta), flat(lam)
    g = lambda t, l: G(unflat(t, theta), unflat(l, lam))  # noqa: E731
    f = lambda t, l: F(unflat(t, theta), unflat(l, lam))  # noqa: E731
    H = hessian(g, argnums=0)(t0, l0)
    M = jacrev(grad(g, argnums=0), argnums=1)(t0, l0)  # d/dlam of grad_theta G: (n_theta, n_lam)
    ft, fl = grad(f, argnums=(0, 1))(t0, l0)
    v = torch.linalg.solve(H, ft)
    return unflat(fl - M.T @ v, lam)


def dense_hessian(L: Callable, theta: dict) -> Tensor:
    return hessian(lambda t: L(unflat(t, theta)))(flat(theta))


def ridge_data(n: int = 40, d: int = 5, seed: int = 0) -> tuple[Batch, Batch]:
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=gen, dtype=torch.float64)
    X = torch.randn(2 * n, d, generator=gen, dtype=torch.float64)
    y = X @ w_true + 0.5 * torch.randn(2 * n, generator=gen, dtype=torch.float64)
    return (X[:n], y[:n]), (X[n:], y[n:])


def ridge_losses() -> tuple[Callable, Callable]:
    """inner: mean squared error / 2 + exp(log_lam) / 2 ||w||^2; outer: validation MSE / 2."""

    def inner_loss(inner: nn.Module, outer: nn.Module, batch: Batch) -> Tensor:
        X, y = batch
        return 0.5 * ((inner(X).squeeze(-1) - y) ** 2).mean() + 0.5 * outer.log_lam.exp() * (inner.weight**2).sum()

    def outer_loss(inner: nn.Module, outer: nn.Module, batch: Batch) -> Tensor:
        X, y = batch
        return 0.5 * ((inner(X).squeeze(-1) - y) ** 2).mean()

    return inner_loss, outer_loss


class LogLam(nn.Module):
    def __init__(self, value: float = 0.0):
        super().__init__()
        self.log_lam = nn.Parameter(torch.tensor(value, dtype=torch.float64))


def ridge_problem(method: Any, *, inner_lr: float = 0.1, outer_lr: float = 0.1, **kw: Any) -> tuple[hypergrad.BilevelProblem, nn.Module, nn.Module]:
    inner = nn.Linear(5, 1, bias=False).double()
    outer = LogLam(-1.0)
    G, F = ridge_losses()
    problem = hypergrad.BilevelProblem(
        inner=hypergrad.Level(inner, torch.optim.SGD(inner.parameters(), lr=inner_lr)),
        outer=hypergrad.Level(outer, torch.optim.SGD(outer.parameters(), lr=outer_lr)),
        inner_loss=G, outer_loss=F, method=method, **kw,
    )
    return problem, inner, outer


def ridge_solve(train: Batch, log_lam: float) -> Tensor:
    X, y = train
    n, d = X.shape
    A = X.T @ X / n + torch.exp(torch.tensor(log_lam, dtype=X.dtype)) * torch.eye(d, dtype=X.dtype)
    return torch.linalg.solve(A, X.T @ y / n)


# ---------------------------------------------------------------- the BiSSL-shaped proximal problem
class Lower(nn.Module):
    """theta_P: a backbone plus a pretext projector (only the backbone is coupled)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
        self.projector = nn.Linear(4, 2)


class Upper(nn.Module):
    """theta_D (same backbone shape) plus a downstream head phi."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
        self.head = nn.Linear(4, 3)


def pretext_loss(lower: nn.Module, upper: nn.Module, batch: Tensor) -> Tensor:
    z = lower.projector(torch.tanh(lower.backbone(batch)))
    return ((z - batch[:, :2].sin()) ** 2).mean()


def downstream_loss(lower: nn.Module, upper: nn.Module, batch: Batch, gamma: float = 0.5) -> Tensor:
    x, y = batch
    ce = nn.functional.cross_entropy
    return ce(upper.head(torch.tanh(lower.backbone(x))), y) + gamma * ce(upper.head(torch.tanh(upper.backbone(x))), y)


def bissl_batches(seed: int = 0, n: int = 16) -> tuple[Tensor, Batch]:
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return pre, (x, y)


def bissl_problem(method: hypergrad.Proximal, seed: int = 0, inner_loss: Callable = pretext_loss, **kw: Any) -> tuple[hypergrad.BilevelProblem, Lower, Upper]:
    torch.manual_seed(seed)
    lower, upper = Lower().double(), Upper().double()
    upper.backbone.load_state_dict(lower.backbone.state_dict())
    problem = hypergrad.BilevelProblem(
        inner=hypergrad.Level(lower, torch.optim.SGD(lower.parameters(), lr=0.05, momentum=0.9)),
        outer=hypergrad.Level(upper, torch.optim.SGD(upper.parameters(), lr=0.05, momentum=0.9)),
        inner_loss=inner_loss, outer_loss=downstream_loss, method=method, **kw,
    )
    return problem, lower, upper


def snapshot(*modules: nn.Module, optimizers: tuple = ()) -> list[Tensor]:
    """All parameters, buffers and optimiser state tensors, cloned (for bitwise comparisons)."""
    out = [t.detach().clone() for m in modules for t in [*m.parameters(), *m.buffers()]]
    for opt in optimizers:
        for state in opt.state.values():
            out += [v.clone() for v in state.values() if isinstance(v, Tensor)]
    return out


def same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
