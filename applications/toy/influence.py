r"""Influence functions on L2-regularised softmax regression (digits), checked against leave-one-out retraining.

The training loss over ``n`` examples (64 pixel features, 10 classes, float64) is

.. math::

    L(\theta) = \frac{1}{n} \sum_{i=1}^{n} \ell(z_i, \theta) + \frac{\mu}{2} \|\theta\|^2 .

Removing training example :math:`i` (the loss :math:`L - \ell(z_i, \cdot)/n`, i.e. upweighting it
by :math:`\varepsilon = -1/n`) moves the minimiser by about :math:`\frac{1}{n} H^{-1} \nabla\ell(z_i,
\theta^*)`, so the loss on test example :math:`t` changes by about

.. math::

    \Delta\ell_t(i) \approx \frac{1}{n}\, \nabla\ell(z_t, \theta^*)^\top H^{-1} \nabla\ell(z_i, \theta^*)
    \qquad\text{(Koh \& Liang 2017)},

with :math:`H = \nabla^2 L(\theta^*)` (symmetric positive definite here). The ``s`` test
gradients are known together, so their inverse-Hessian-vector products :math:`S = H^{-1} G_{test}`
are ONE block solve: :func:`hypergrad.inverse_hvp` with :class:`hypergrad.BlockCG` (products
batched by :meth:`hypergrad.HessianOperator.matmat`); then :math:`\Delta = \frac1n S\, G_{train}^\top`
for all ``s x n`` pairs at once. Separate :class:`hypergrad.CG` solves of the same columns are run
for comparison (HVP counts).

Known answers, printed and tested:

* the same matrix from a dense Hessian (double backward, float64) and ``torch.linalg.solve``;
* actual leave-one-out retraining (Newton steps from :math:`\theta^*` on the loss without example
  :math:`i`, to a gradient norm of 1e-12) for ``--loo`` training examples (the most influential
  ones for the first test example, and random ones): the Pearson correlation between predicted and
  actual :math:`\Delta\ell_t(i)`.

``python -m applications.toy.influence --help``

References:
    Koh & Liang (ICML 2017), Understanding black-box predictions via influence functions.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import hypergrad

from ._cli import check_counts, parse_device

F64 = torch.float64


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits_split(n_train: int, n_test: int, seed: int, device: torch.device) -> Data:
    """A random train/test split of scikit-learn's bundled digits (offline), features in [0, 1], float64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=F64)
    y = torch.tensor(d.target, dtype=torch.long)
    if n_train + n_test > len(y):
        raise ValueError(f"n_train + n_test = {n_train + n_test} exceeds the {len(y)} digits images.")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    return Data(x[tr].to(device), y[tr].to(device), x[te].to(device), y[te].to(device))


def example_loss(theta: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of softmax regression on one example (``x`` of shape ``(64,)``)."""
    return F.cross_entropy((theta["W"] @ x + theta["b"])[None], y[None])


def training_loss(data: Data, mu: float, weights: Optional[Tensor] = None) -> Callable[[Mapping[str, Tensor]], Tensor]:
    r""":math:`\theta \mapsto \frac1n \sum_i w_i \ell(z_i, \theta) + \frac{\mu}{2}\|\theta\|^2` (``w = 1`` by default)."""
    n = len(data.y_train)

    def loss(theta: Mapping[str, Tensor]) -> Tensor:
        logits = data.x_train @ theta["W"].T + theta["b"]
        per = F.cross_entropy(logits, data.y_train, reduction="none")
        data_term = per.sum() / n if weights is None else (weights * per).sum() / n
        return data_term + 0.5 * mu * sum((t * t).sum() for t in theta.values())

    return loss


def dense_hessian(loss: Callable[[dict[str, Tensor]], Tensor], theta: dict[str, Tensor]) -> Tensor:
    """The Hessian of ``loss`` at ``theta`` in the flat ``[W, b]`` order, by ``torch.func.hessian`` (not hypergrad's HVPs)."""
    flat, unravel = hypergrad.tree_ravel(theta)
    return torch.func.hessian(lambda v: loss(cast(dict, unravel(v))))(flat)


def newton(
    loss: Callable[[dict[str, Tensor]], Tensor], theta: dict[str, Tensor], gtol: float = 1e-12, max_steps: int = 50
) -> dict[str, Tensor]:
    """Minimise the (strictly convex) ``loss`` by dense Newton steps from ``theta`` to a gradient norm ``gtol``."""
    v, unravel = hypergrad.tree_ravel(theta)
    f = lambda u: loss(cast(dict, unravel(u)))
    for _ in range(max_steps):
        g = torch.func.grad(f)(v)
        if float(g.norm()) <= gtol:
            return cast(dict, unravel(v))
        v = v - torch.linalg.solve(torch.func.hessian(f)(v), g)
    raise RuntimeError(
        f"Newton did not reach a gradient norm of {gtol:g} in {max_steps} steps (last {float(g.norm()):.2e})."
    )


def per_example_grads(theta: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """:math:`\\nabla_\\theta \\ell(z_j, \\theta)` for every row of ``x``: a block keyed like ``theta``."""
    return torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(theta, x, y)


@dataclass
class InfluenceResult:
    influence: Tensor  # (s, n): predicted change of test loss t when training example i is removed
    solution: hypergrad.Solution


def influence_matrix(
    data: Data,
    theta: dict[str, Tensor],
    mu: float,
    solver: hypergrad.AbstractLinearSolver,
    chunk_size: Optional[int] = None,
) -> InfluenceResult:
    r""":math:`\Delta_{ti} = \frac1n \nabla\ell(z_t)^\top H^{-1} \nabla\ell(z_i)` for every test ``t`` and training ``i``."""
    n = len(data.y_train)
    g_test = per_example_grads(theta, data.x_test, data.y_test)
    res = hypergrad.inverse_hvp(
        training_loss(data, mu), theta, g_test, solver=solver, on_failure="raise", chunk_size=chunk_size
    )
    g_train = per_example_grads(theta, data.x_train, data.y_train)
    s = len(data.y_test)
    flat_s = torch.cat([res.x[k].reshape(s, -1) for k in theta], dim=1)
    flat_g = torch.cat([g_train[k].reshape(n, -1) for k in theta], dim=1)
    return InfluenceResult(flat_s @ flat_g.T / n, res.solution)


def dense_influence(data: Data, theta: dict[str, Tensor], mu: float) -> Tensor:
    """The same matrix from a dense Hessian and ``torch.linalg.solve`` (the reference)."""
    n = len(data.y_train)
    H = dense_hessian(training_loss(data, mu), theta)
    gt = torch.stack([hypergrad.tree_ravel(g)[0] for g in _rows(per_example_grads(theta, data.x_test, data.y_test))])
    gi = torch.stack([hypergrad.tree_ravel(g)[0] for g in _rows(per_example_grads(theta, data.x_train, data.y_train))])
    return torch.linalg.solve(H, gt.T).T @ gi.T / n


def _rows(block: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    return [{k: t[j] for k, t in block.items()} for j in range(next(iter(block.values())).shape[0])]


def leave_one_out(data: Data, theta: dict[str, Tensor], mu: float, i: int) -> Tensor:
    """Actual change of every test loss when training example ``i`` is removed (retrained by Newton from ``theta``)."""
    w = torch.ones(len(data.y_train), dtype=F64, device=data.y_train.device)
    w[i] = 0.0
    theta_i = newton(training_loss(data, mu, w), theta)
    before = torch.stack([example_loss(theta, x, y) for x, y in zip(data.x_test, data.y_test)])
    after = torch.stack([example_loss(theta_i, x, y) for x, y in zip(data.x_test, data.y_test)])
    return after - before


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    data = load_digits_split(args.n_train, args.n_test, args.seed, device)
    theta0 = {"W": torch.zeros(10, 64, dtype=F64, device=device), "b": torch.zeros(10, dtype=F64, device=device)}
    theta = newton(training_loss(data, args.mu), theta0)
    out: dict[str, Any] = {}
    for name, solver in (
        ("BlockCG", hypergrad.BlockCG(max_steps=args.max_steps, rtol=args.rtol)),
        ("CG", hypergrad.CG(max_steps=args.max_steps, rtol=args.rtol)),
    ):
        t0 = time.perf_counter()
        res = influence_matrix(data, theta, args.mu, solver, chunk_size=args.chunk_size)
        out[name] = dict(influence=res.influence, hvps=res.solution.num_matvecs, seconds=time.perf_counter() - t0)
    ref = dense_influence(data, theta, args.mu)
    for name in ("BlockCG", "CG"):
        out[name]["rel_err"] = float((out[name]["influence"] - ref).norm() / ref.norm())
    infl = out["BlockCG"]["influence"]
    gen = torch.Generator().manual_seed(args.seed + 1)
    top = infl[0].abs().argsort(descending=True)[: args.loo // 2].tolist()
    rest = [i for i in torch.randperm(args.n_train, generator=gen).tolist() if i not in top]
    chosen = top + rest[: args.loo - len(top)]
    actual = torch.stack(
        [leave_one_out(data, theta, args.mu, i) for i in tqdm(chosen, desc="leave-one-out", disable=args.no_progress)]
    ).T  # (s, loo)
    predicted = infl[:, chosen]
    out["loo"] = dict(
        indices=chosen, actual=actual, predicted=predicted, pearson=pearson(predicted.flatten(), actual.flatten())
    )
    out["test_accuracy"] = float(((data.x_test @ theta["W"].T + theta["b"]).argmax(1) == data.y_test).double().mean())
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m applications.toy.influence",
        description="Influence functions (Koh & Liang 2017) of training digits on test losses, by one block solve "
        "(hypergrad.inverse_hvp + BlockCG), checked against a dense solve and leave-one-out retraining. "
        "CPU, seconds.",
    )
    p.add_argument("--n-train", type=int, default=500, help="training examples, default 500")
    p.add_argument("--n-test", type=int, default=16, help="test examples (the block's columns), default 16")
    p.add_argument("--mu", type=float, default=1e-3, help="L2 strength mu, default 1e-3")
    p.add_argument(
        "--rtol", type=float, default=1e-10, help="per-column relative tolerance of the solves, default 1e-10"
    )
    p.add_argument("--max-steps", type=int, default=1000, help="solver step budget, default 1000")
    p.add_argument("--chunk-size", type=int, default=None, help="batch at most this many products (default: all)")
    p.add_argument(
        "--loo",
        type=int,
        default=20,
        help="training examples retrained without (half the most influential), default 20",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    args = p.parse_args(argv)
    check_counts(p, args, ("n_train", "n_test", "max_steps", "loo"))
    if args.n_train + args.n_test > 1797:
        p.error(f"--n-train + --n-test must be at most the 1797 digits images, got {args.n_train + args.n_test}")
    if args.loo > args.n_train:
        p.error(f"--loo must be at most --n-train ({args.n_train}), got {args.loo}")
    if args.chunk_size is not None and args.chunk_size < 1:
        p.error(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if not (math.isfinite(args.mu) and args.mu > 0):
        p.error(f"--mu must be a finite number > 0 (it makes the Hessian positive definite), got {args.mu}")
    if not (math.isfinite(args.rtol) and 0 < args.rtol < 1):
        p.error(f"--rtol must be in (0, 1), got {args.rtol}; e.g. 1e-10")
    parse_device(p, args.device)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*")  # torch's own, from torch.func.jvp
    out = run(args)
    print(
        f"softmax regression on {args.n_train} digits (mu={args.mu:g}, float64), {args.n_test} test examples; "
        f"test accuracy {out['test_accuracy']:.3f}\n"
    )
    print(f"{'solver':<10}{'HVPs':>7}{'seconds':>9}{'rel. err vs dense':>19}")
    for name in ("BlockCG", "CG"):
        r = out[name]
        print(f"{name:<10}{r['hvps']:>7d}{r['seconds']:>9.2f}{r['rel_err']:>19.1e}")
    loo = out["loo"]
    print(
        f"\nleave-one-out retraining of {len(loo['indices'])} training examples x {args.n_test} test losses: "
        f"Pearson r(predicted, actual) = {loo['pearson']:.4f}"
    )
    infl = out["BlockCG"]["influence"][0]
    order = infl.argsort()
    print(
        f"test example 0: removing training examples {order[-3:].flip(0).tolist()} raises its loss most "
        f"(helpful), removing {order[:3].tolist()} lowers it most (harmful)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
