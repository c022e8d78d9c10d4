"""Shared pieces of the BilevelProblem tests: small problems, dense references, the error registry.

References never use hypergrad: dense Hessians from ``torch.func.hessian``/``jacrev`` and
``torch.linalg.solve`` on flattened parameters, in float64.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.autograd.functional as AF
from torch import Tensor, nn

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
    """``dF/dlam = d_lam F - (d2_{theta lam} G)^T (d2_theta G)^-1 d_theta F`` with dense matrices.

    Built with ``torch.autograd.functional`` column by column (no vmap): ``torch.func.hessian``
    returns a wrong, non-symmetric Hessian through training-mode BatchNorm (seen with torch 2.15).
    """
    t0, l0 = flat(theta).detach(), flat(lam).detach()
    g = lambda t, l: G(unflat(t, theta), unflat(l, lam))
    f = lambda t, l: F(unflat(t, theta), unflat(l, lam))
    H = AF.hessian(lambda t: g(t, l0), t0)

    def grad_theta(l: Tensor) -> Tensor:
        t = t0.clone().requires_grad_(True)
        return torch.autograd.grad(g(t, l), t, create_graph=True)[0]

    M = AF.jacobian(grad_theta, l0)  # (n_theta, n_lam)
    ft, fl = AF.jacobian(f, (t0, l0))
    v = torch.linalg.solve(H, ft)
    return unflat(fl - M.T @ v, lam)


def dense_hessian(L: Callable, theta: dict) -> Tensor:
    return AF.hessian(lambda t: L(unflat(t, theta)), flat(theta).detach())


def double_backward_hessian(fn: Callable[[dict], Tensor], params: dict[str, Tensor]) -> Tensor:
    """The Hessian of ``fn(params)`` row by row by double backward (``create_graph``), flattened in ``params``' key
    order; a gradient entry that does not depend on some parameter gives zeros there (e.g. a final bias)."""
    keys = list(params)
    leaves = [params[k].detach().clone().requires_grad_(True) for k in keys]
    g = torch.autograd.grad(fn(dict(zip(keys, leaves))), leaves, create_graph=True)
    flat_g = torch.cat([t.reshape(-1) for t in g])
    rows = []
    for i in range(flat_g.numel()):
        row = torch.autograd.grad(flat_g[i], leaves, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(r if r is not None else torch.zeros_like(t)).reshape(-1) for r, t in zip(row, leaves)]))
    return torch.stack(rows)


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


def ridge_problem(
    method: Any, *, inner_lr: float = 0.1, outer_lr: float = 0.1, **kw: Any
) -> tuple[hypergrad.BilevelProblem, nn.Module, nn.Module]:
    inner = nn.Linear(5, 1, bias=False).double()
    outer = LogLam(-1.0)
    G, F = ridge_losses()
    problem = hypergrad.BilevelProblem(
        inner=hypergrad.Level(inner, torch.optim.SGD(inner.parameters(), lr=inner_lr)),
        outer=hypergrad.Level(outer, torch.optim.SGD(outer.parameters(), lr=outer_lr)),
        inner_loss=G,
        outer_loss=F,
        method=method,
        **kw,
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


def bissl_problem(
    method: hypergrad.Proximal, seed: int = 0, inner_loss: Callable = pretext_loss, **kw: Any
) -> tuple[hypergrad.BilevelProblem, Lower, Upper]:
    torch.manual_seed(seed)
    lower, upper = Lower().double(), Upper().double()
    upper.backbone.load_state_dict(lower.backbone.state_dict())
    problem = hypergrad.BilevelProblem(
        inner=hypergrad.Level(lower, torch.optim.SGD(lower.parameters(), lr=0.05, momentum=0.9)),
        outer=hypergrad.Level(upper, torch.optim.SGD(upper.parameters(), lr=0.05, momentum=0.9)),
        inner_loss=inner_loss,
        outer_loss=downstream_loss,
        method=method,
        **kw,
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


# ---------------------------------------------------------------- transactional state: a BatchNorm problem
def bn_problem(
    on_nonfinite: str = "skip",
    *,
    width: int = 4,
    dtype: torch.dtype = torch.float64,
    inner_opt: str = "adam",
    scheduler: str | None = "step",
    **method_kw: Any,
) -> tuple[hypergrad.BilevelProblem, nn.Module, nn.Module, Callable[[], Batch]]:
    """Inner: Linear-BatchNorm-Tanh-Linear (``width`` hidden units) with a learnt weight decay per
    layer (outer, SGD with momentum); ``inner_opt`` "adam", "sgd" or "adam2" (two groups);
    ``scheduler`` "step", "exp" or None on both levels. Returns ``(problem, net, hp, batch)``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width), nn.Tanh(), nn.Linear(width, 1)).to(dtype)
    hp = nn.ParameterDict({"log_wd": nn.Parameter(torch.tensor([-2.0, -1.0], dtype=dtype))})
    if inner_opt == "adam2":
        opt_i: torch.optim.Optimizer = torch.optim.Adam(
            [{"params": net[0].parameters()}, {"params": [*net[1].parameters(), *net[3].parameters()]}], lr=0.01
        )
    elif inner_opt == "sgd":
        opt_i = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    else:
        opt_i = torch.optim.Adam(net.parameters(), lr=0.01)
    opt_o = torch.optim.SGD(hp.parameters(), lr=0.1, momentum=0.9)
    sched = {
        "step": lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.9),
        "exp": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9),
        None: lambda o: None,
    }[scheduler]

    def G(inner: nn.Module, outer: nn.Module, b: Batch) -> Tensor:
        wd = outer["log_wd"].exp()
        fit = ((inner(b[0]) - b[1]) ** 2).mean()
        return fit + wd[0] * (inner[0].weight ** 2).sum() + wd[1] * (inner[3].weight ** 2).sum()

    def F(inner: nn.Module, outer: nn.Module, b: Batch) -> Tensor:
        return ((inner(b[0]) - b[1]) ** 2).mean()

    method = hypergrad.Implicit(
        solver=hypergrad.CG(max_steps=3), damping=10.0, warm_start=True, hvp_mode="rev_rev", **method_kw
    )
    problem = hypergrad.BilevelProblem(
        hypergrad.Level(net, opt_i, scheduler=sched(opt_i)),
        hypergrad.Level(hp, opt_o, scheduler=sched(opt_o)),
        G,
        F,
        method,
        on_nonfinite=on_nonfinite,
    )
    gen = torch.Generator().manual_seed(1)
    batch = lambda: (torch.randn(8, 3, generator=gen, dtype=dtype), torch.randn(8, 1, generator=gen, dtype=dtype))
    return problem, net, hp, batch


def full_state(problem) -> dict:
    """Everything a step may touch, copied: parameters, buffers, optimiser and scheduler state,
    counters, warm-start vector, the outer .grad."""
    out = {}
    for which in ("inner", "outer"):
        level = getattr(problem, which)
        for k, v in level.module.state_dict().items():  # parameters and every buffer
            out[f"{which}.module.{k}"] = v.detach().clone()
        for pid, st in level.optimizer.state_dict()["state"].items():
            for k, v in st.items():
                out[f"{which}.opt.{pid}.{k}"] = v.clone() if isinstance(v, torch.Tensor) else v
        out[f"{which}.sched"] = None if level.scheduler is None else dict(level.scheduler.state_dict())
        out[f"{which}.lr"] = level.optimizer.param_groups[0]["lr"]
    for k in ("inner_steps", "outer_steps", "inner_skipped", "outer_skipped", "failed_solves"):
        out[k] = getattr(problem, k)
    x0 = problem.method_state.x0
    out["x0"] = None if x0 is None else {k: v.clone() for k, v in x0.items()}
    return out


def state_diff(a: dict, b: dict, skip: tuple = ()) -> list[str]:
    bad = []
    for k in a:
        if k in skip:
            continue
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        elif isinstance(x, dict) and isinstance(y, dict):
            same = x.keys() == y.keys() and all(
                torch.equal(x[i], y[i]) if isinstance(x[i], torch.Tensor) else x[i] == y[i] for i in x
            )
        else:
            same = x == y
        if not same:
            bad.append(k)
    return sorted(bad)


# ---------------------------------------------------------------- error registry (data, STYLE rule 13)
def _net() -> nn.Module:
    return nn.Linear(2, 1)


def _level(module: nn.Module | None = None, **kw: Any) -> hypergrad.Level:
    module = module if module is not None else _net()
    return hypergrad.Level(module, torch.optim.SGD(module.parameters(), lr=0.1), **kw)


def _problem(**kw: Any) -> hypergrad.BilevelProblem:
    args = {
        "inner": _level(),
        "outer": _level(),
        "inner_loss": lambda i, o, b: i(b).sum(),
        "outer_loss": lambda i, o, b: o(b).sum(),
        "method": hypergrad.Implicit(),
    }
    args.update(kw)
    return hypergrad.BilevelProblem(**args)


def _shared() -> hypergrad.BilevelProblem:
    net = _net()
    return _problem(inner=_level(net), outer=_level(net))


def _other_scheduler() -> hypergrad.Level:
    net = _net()
    other = torch.optim.SGD(_net().parameters(), lr=0.1)
    return hypergrad.Level(
        net, torch.optim.SGD(net.parameters(), lr=0.1), scheduler=torch.optim.lr_scheduler.StepLR(other, 1)
    )


def _frozen() -> hypergrad.Level:
    net = _net()
    net.bias.requires_grad_(False)
    return hypergrad.Level(net, torch.optim.SGD(net.parameters(), lr=0.1))


def _prox(coupling: dict) -> Callable[[], Any]:
    return lambda: bissl_problem(hypergrad.Proximal(lam=1.0, coupling=coupling))


def _uses_outer(lower: nn.Module, upper: nn.Module, batch: Tensor) -> Tensor:
    return pretext_loss(lower, upper, batch) + (upper.head.weight**2).sum()


def _prox_inner_uses_outer() -> None:
    problem = bissl_problem(hypergrad.Proximal(lam=1.0, coupling={"backbone": "backbone"}), inner_loss=_uses_outer)[0]
    pre, down = bissl_batches()
    problem.hypergradient(down, hessian_batch=pre)


def _run(call: Callable[[hypergrad.BilevelProblem], Any], **kw: Any) -> Callable[[], Any]:
    return lambda: call(_problem(**kw))


def _load_mismatch() -> None:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with_sched = _problem(inner=hypergrad.Level(net, opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 1)))
    _problem().load_state_dict(with_sched.state_dict())


X2 = torch.randn(16, 2)

#: (id, builder, exception type, message regex): every configuration error names the argument.
PROBLEM_ERRORS: list[tuple[str, Callable[[], Any], type, str]] = [
    (
        "implicit-solver-string",
        lambda: hypergrad.Implicit(solver="cg"),
        TypeError,
        r"Implicit: `solver` must be a hypergrad solver, got str\. Pass an object",
    ),
    (
        "implicit-solver-class",
        lambda: hypergrad.Implicit(solver=hypergrad.CG),
        TypeError,
        r"got the class CG; call it: solver=CG\(\)",
    ),
    (
        "implicit-hvp-mode",
        lambda: hypergrad.Implicit(hvp_mode="fast"),
        ValueError,
        r"Implicit: `hvp_mode` must be one of .* got 'fast'",
    ),
    (
        "implicit-damping",
        lambda: hypergrad.Implicit(damping=-1),
        ValueError,
        r"Implicit: `damping` must be a finite number >= 0, got -1",
    ),
    (
        "implicit-warm-start",
        lambda: hypergrad.Implicit(warm_start=1),
        TypeError,
        r"Implicit: `warm_start` must be True or False, got 1",
    ),
    (
        "proximal-lam",
        lambda: hypergrad.Proximal(lam=0, coupling={"": ""}),
        ValueError,
        r"Proximal: `lam` must be a finite number > 0, got 0",
    ),
    (
        "proximal-no-coupling",
        lambda: hypergrad.Proximal(lam=1.0),
        ValueError,
        r"Proximal: `coupling` must be a non-empty dict",
    ),
    (
        "proximal-coupling-type",
        lambda: hypergrad.Proximal(lam=1.0, coupling={"a": 1}),
        TypeError,
        r"`coupling` keys and values must be strings, got 'a': 1",
    ),
    (
        "unrolled-steps",
        lambda: hypergrad.Unrolled(steps=0),
        ValueError,
        r"Unrolled: `steps` must be an integer >= 1, got 0",
    ),
    (
        "unrolled-lr",
        lambda: hypergrad.Unrolled(lr=-1.0),
        ValueError,
        r"Unrolled: `lr` must be a finite number > 0, got -1.0",
    ),
    (
        "unrolled-truncate",
        lambda: hypergrad.Unrolled(steps=3, truncate=4),
        ValueError,
        r"`truncate` must be None or an integer in \[1, steps=3\], got 4",
    ),
    (
        "level-module",
        lambda: hypergrad.Level("net", torch.optim.SGD(_net().parameters(), lr=0.1)),
        TypeError,
        r"Level: `module` must be an nn.Module",
    ),
    (
        "level-optimizer-class",
        lambda: hypergrad.Level(_net(), torch.optim.SGD),
        TypeError,
        r"Level: `optimizer` must be a torch.optim.Optimizer, got type\. Construct it",
    ),
    (
        "level-foreign-params",
        lambda: hypergrad.Level(_net(), torch.optim.SGD(_net().parameters(), lr=0.1)),
        ValueError,
        r"`optimizer` holds 2 tensor\(s\) .* not parameters of `module`",
    ),
    (
        "level-grad-norm",
        lambda: _level(max_grad_norm=0),
        ValueError,
        r"Level: `max_grad_norm` must be None or a finite number > 0, got 0",
    ),
    ("level-scheduler", _other_scheduler, ValueError, r"Level: `scheduler` was built for a different optimizer"),
    (
        "level-dict-tensor",
        lambda: hypergrad.Level({"w": torch.zeros(2)}, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)),
        TypeError,
        r"`module\['w'\]` must be an nn.Module or nn.Parameter, got Tensor\. Wrap tensors",
    ),
    ("level-frozen", _frozen, ValueError, r"`optimizer` holds parameters with requires_grad=False: \['bias'\]"),
    (
        "problem-inner-type",
        lambda: _problem(inner=_net()),
        TypeError,
        r"`inner` must be a hypergrad.Level\(module, optimizer\), got Linear",
    ),
    (
        "problem-loss-type",
        lambda: _problem(inner_loss="mse"),
        TypeError,
        r"`inner_loss` must be a callable \(inner, outer, batch\)",
    ),
    (
        "problem-method-string",
        lambda: _problem(method="implicit"),
        TypeError,
        r"`method` must be a hypergrad method .* got 'implicit'",
    ),
    (
        "problem-buffers",
        lambda: _problem(buffers="eval"),
        ValueError,
        r"`buffers` must be 'batch_stats' or 'running_stats', got 'eval'",
    ),
    (
        "problem-on-nonfinite",
        lambda: _problem(on_nonfinite="ignore"),
        ValueError,
        r"`on_nonfinite` must be 'skip' or 'raise', got 'ignore'",
    ),
    (
        "problem-distributed",
        lambda: _problem(distributed=True),
        ValueError,
        r"`distributed=True` but torch.distributed is not initialised",
    ),
    ("problem-shared", _shared, ValueError, r"`inner` and `outer` share 2 parameter tensor\(s\)"),
    ("problem-callbacks", lambda: _problem(callbacks=[1]), TypeError, r"`callbacks` must hold callables"),
    (
        "coupling-unknown",
        _prox({"encoder": "backbone"}),
        ValueError,
        r"`coupling` key 'encoder' names no trained inner parameter",
    ),
    (
        "coupling-missing-outer",
        _prox({"backbone": "trunk"}),
        ValueError,
        r"maps inner 'backbone.0.weight' to outer 'trunk.0.weight', which is not a trained outer parameter",
    ),
    (
        "coupling-shape",
        _prox({"backbone.0.weight": "head.weight"}),
        ValueError,
        r"coupled tensors must have equal shapes",
    ),
    (
        "proximal-inner-uses-outer",
        _prox_inner_uses_outer,
        ValueError,
        r"`inner_loss` depends on the outer parameters \['head.weight'\] directly",
    ),
    (
        "step-tuple",
        _run(lambda p: p.step((X2, X2), X2)),
        TypeError,
        r"`inner_batches` must be a list or iterator of batches, got tuple; for a single batch pass \[batch\]",
    ),
    (
        "no-hessian-batch",
        _run(lambda p: p.hypergradient(X2)),
        ValueError,
        r"no inner step has been applied yet.*pass `hessian_batch=`",
    ),
    (
        "outer-step-first",
        _run(lambda p: p.outer_step()),
        RuntimeError,
        r"no outer gradients; call hypergradient\(outer_batch\) first",
    ),
    (
        "loss-not-scalar",
        _run(lambda p: p.inner_step(X2), inner_loss=lambda i, o, b: i(b)),
        TypeError,
        r"`inner_loss` must return a floating-point scalar tensor, got a tensor of shape \(16, 1\)",
    ),
    (
        "inner-loss-constant",
        _run(lambda p: p.inner_step(X2), inner_loss=lambda i, o, b: b.sum()),
        ValueError,
        r"`inner_loss` does not depend on the inner level's trained parameters",
    ),
    (
        "load-format",
        _run(lambda p: p.load_state_dict({"inner_module": {}})),
        ValueError,
        r"`state` is not a BilevelProblem.state_dict\(\)",
    ),
    ("load-scheduler", _load_mismatch, ValueError, r"the checkpoint has an inner scheduler but this problem has none"),
    # inputs of the calls (issue 9): never iterated, computed on or applied when they cannot be right
    (
        "step-string",
        _run(lambda p: p.step("abc", X2)),
        TypeError,
        r"`inner_batches` must be a list or iterator of batches, got the string 'abc'; a string would be iterated",
    ),
    ("step-int", _run(lambda p: p.step(5, X2)), TypeError, r"`inner_batches` must be a list .* got int; .* \[batch\]"),
    ("step-dict", _run(lambda p: p.step({"x": X2}, X2)), TypeError, r"`inner_batches` .* got dict"),
    (
        "batch-meta",
        _run(lambda p: p.inner_step(torch.empty(16, 2, device="meta"))),
        ValueError,
        r"`batch` is a tensor on the meta device \(shape only, no data\)",
    ),
    (
        "step-meta-nested",
        _run(lambda p: p.step([(X2, torch.empty(2, device="meta"))], X2)),
        ValueError,
        r"`inner_batches\[0\]\[1\]` is a tensor on the meta device",
    ),
    (
        "outer-batch-meta",
        _run(lambda p: p.hypergradient({"x": torch.empty(2, device="meta")}, X2)),
        ValueError,
        r"`outer_batch\['x'\]` is a tensor on the meta device",
    ),
    (
        "module-meta",
        lambda: _problem(inner=_level(nn.Linear(2, 1, device="meta"))),
        ValueError,
        r"`inner` has tensors on the meta device .*module.to_empty",
    ),
    (
        "accumulate-int",
        _run(lambda p: p.hypergradient(X2, X2, accumulate=1)),
        TypeError,
        r"`accumulate` must be True or False, got 1",
    ),
    (
        "outer-step-hessian-only",
        _run(lambda p: p.outer_step(hessian_batch=X2)),
        ValueError,
        r"outer_step: `hessian_batch` is used only with `outer_batch`",
    ),
    (
        "callbacks-callable",
        lambda: _problem(callbacks=print),
        TypeError,
        r"`callbacks` must be a list of callables .*callbacks=\[fn\]",
    ),
    (
        "reduction-type",
        lambda: _problem(reduction="ddp"),
        TypeError,
        r"`reduction` must be a hypergrad.AbstractReduction",
    ),
    (
        "loss-meta",
        _run(
            lambda p: p.inner_step(X2),
            inner_loss=lambda i, o, b: torch.zeros((), device="meta") + i(b).sum().to("meta"),
        ),
        ValueError,
        r"`inner_loss` returned a tensor on the meta device",
    ),
    (
        "new-hessian-meta",
        _run(lambda p: p.new_hessian_batch(torch.empty(1, device="meta"))),
        ValueError,
        r"`batch` is a tensor on the meta device",
    ),
]


# ---------------------------------------------------------------- data-parallel equivalence
def ddp_case(rank: int, world: int) -> dict[str, Tensor]:
    """Run Implicit and Proximal problems on shard ``rank`` of ``world`` (world=1: the full batch)."""
    shard = lambda t: t.chunk(world)[rank]
    out: dict[str, Tensor] = {}
    # Implicit on a small network with per-layer weight decay
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    hp = nn.ParameterDict({"log_wd": nn.Parameter(torch.tensor([-2.0, -1.0], dtype=torch.float64))})
    gen = torch.Generator().manual_seed(1)
    x, y, xv, yv = (torch.randn(16, d, generator=gen, dtype=torch.float64) for d in (3, 1, 3, 1))

    def G(inner: nn.Module, outer: nn.Module, b: Batch) -> Tensor:
        wd = outer["log_wd"].exp()
        return (
            ((inner(b[0]) - b[1]) ** 2).mean()
            + wd[0] * (inner[0].weight ** 2).sum()
            + wd[1] * (inner[2].weight ** 2).sum()
        )

    def F(inner: nn.Module, outer: nn.Module, b: Batch) -> Tensor:
        return ((inner(b[0]) - b[1]) ** 2).mean()

    problem = hypergrad.BilevelProblem(
        hypergrad.Level(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5)),
        hypergrad.Level(hp, torch.optim.SGD(hp.parameters(), lr=0.1)),
        G,
        F,
        hypergrad.Implicit(solver=hypergrad.CG(max_steps=6), damping=5.0, hvp_mode="rev_rev"),
    )
    for _ in range(2):
        problem.inner_step((shard(x), shard(y)))
    rec = problem.hypergradient((shard(xv), shard(yv)))
    out["implicit_grad"] = hp["log_wd"].grad.clone()
    out["implicit_outer_loss"] = torch.tensor(rec.outer_loss, dtype=torch.float64)
    out["implicit_inner"] = flat({k: v.detach() for k, v in net.named_parameters()})
    # Proximal (BiSSL-shaped), a full step
    # reverse-mode HVPs: the first forward-mode call costs seconds of one-off set-up per process
    problem, lower, upper = bissl_problem(
        hypergrad.Proximal(
            lam=0.5,
            damping=1.0,
            coupling={"backbone": "backbone"},
            solver=hypergrad.CG(max_steps=5),
            hvp_mode="rev_rev",
        )
    )
    pre, (xd, yd) = bissl_batches(n=16)
    problem.step([shard(pre), shard(pre)], (shard(xd), shard(yd)))
    out["proximal_upper"] = flat({k: v.detach() for k, v in upper.named_parameters()})
    out["proximal_lower"] = flat({k: v.detach() for k, v in lower.named_parameters()})
    return out


def ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(ddp_case(rank, world), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- kill-and-resume training run
def resume_train(ckpt: str, out: str, steps: int, save_every: int, progress: Any = None) -> None:
    """A small BiSSL-like run that checkpoints every ``save_every`` iterations and resumes from ``ckpt``.

    Exercises everything a checkpoint must carry: momentum, two schedulers, the warm-start vector,
    counters and (opt-in, next to the problem's state) the global RNG: batches are drawn with
    ``torch.randint``/``torch.randn``.
    """
    import os
    import random

    import numpy as np

    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    lower, upper = Lower().double(), Upper().double()
    upper.backbone.load_state_dict(lower.backbone.state_dict())
    opt_l = torch.optim.SGD(lower.parameters(), lr=0.05, momentum=0.9)
    opt_u = torch.optim.SGD(upper.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    problem = hypergrad.BilevelProblem(
        hypergrad.Level(lower, opt_l, scheduler=torch.optim.lr_scheduler.StepLR(opt_l, 5, 0.5), max_grad_norm=10.0),
        hypergrad.Level(
            upper, opt_u, scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt_u, 2 * steps), max_grad_norm=10.0
        ),
        pretext_loss,
        downstream_loss,
        hypergrad.Proximal(
            lam=0.5,
            damping=1.0,
            coupling={"backbone": "backbone"},
            solver=hypergrad.CG(max_steps=4),
            warm_start=True,
            reuse_operator=True,
        ),
    )
    start = 0
    if os.path.exists(ckpt):
        state = hypergrad.load_checkpoint(ckpt)
        problem.load_state_dict(state["problem"])
        hypergrad.set_rng_state(state["rng"])  # opt-in, outside the problem's state dict
        start = state["iteration"]
    gen = torch.Generator().manual_seed(5)
    pool_x, pool_y = torch.randn(64, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (64,), generator=gen)
    for it in range(start, steps):
        pre = [torch.randn(8, 3, dtype=torch.float64) for _ in range(2)]
        idx = torch.randint(0, 64, (8,))
        down = (pool_x[idx] + 0.01 * torch.randn(8, 3, dtype=torch.float64), pool_y[idx])
        for b in pre:
            problem.inner_step(b)
        problem.new_hessian_batch(pre[-1])
        for _ in range(2):  # BiSSL-style: several outer steps on one Hessian batch (operator reused)
            problem.outer_step(down)
        if (it + 1) % save_every == 0:
            state = {"problem": problem.state_dict(), "rng": hypergrad.get_rng_state(), "iteration": it + 1}
            hypergrad.save_checkpoint(state, ckpt)
        if progress is not None:
            progress.put(it + 1)
    torch.save(problem.state_dict(), out)


def state_leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists (a ``state_dict()``) flattened to ``{path: leaf}``."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(state_leaves(v, f"{prefix}/{k}"))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(state_leaves(v, f"{prefix}/{i}"))
        return out
    return {prefix: tree}


def attention_dense_hessian(loss: Callable[[dict], Tensor], params: dict) -> Tensor:
    """All rows at once by batched double backward (``torch.autograd.grad``) under the MATH attention
    backend (the only one with double backward); never through hypergrad."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    keys = list(params)
    p = [params[k].detach().clone().requires_grad_(True) for k in keys]
    with sdpa_kernel(SDPBackend.MATH):
        g = torch.autograd.grad(loss(dict(zip(keys, p))), p, create_graph=True)
        flat = torch.cat([t.reshape(-1) for t in g])
        eye = torch.eye(flat.numel(), dtype=flat.dtype)
        rows = torch.autograd.grad(flat, p, eye, is_grads_batched=True)
    return torch.cat([r.reshape(flat.numel(), -1) for r in rows], dim=1)
