r"""Time to a 1e-6 hypergradient on the quadratic and ridge problems, as a multiple of hypergrad's own HVP floor.

For each problem (float64, ``benchmarks/problems.py``) and each hypergrad configuration, the
smallest CG budget :math:`K` whose hypergradient is within relative error ``1e-6`` of the closed
form is found; then, side by side in one process:

* ``t_solve``: :func:`hypergrad.implicit_grad` with ``CG(max_steps=K)`` (median of ``reps``);
* ``t_floor``: :math:`K` bare HVPs of the same inner loss written directly (``torch.func``
  ``jvp(grad(G))``, or for the cached mode plain autograd double backward through a gradient graph
  built once, as the library's reverse modes do since 2026-11-27) plus the two
  gradients any implicit hypergradient needs (the outer gradient and the mixed VJP, approximated by
  two ``torch.func.grad`` calls).

``bench_compile.py`` puts the same floor beside the compiled solve and the peers.

``t_solve / t_floor`` separates hypergrad's own overhead (operator construction, checks, CG's
vector updates, the cross term) from the cost of torch's per-operation dispatch, which a peer with
a compiled loop (JAXopt under XLA) does not pay. Peer columns come from ``bench_peers.py`` after
``bash run.sh peers`` (not installed in the shared environment).

Run: ``python benchmarks/bench_floor.py [--preset small|full] [--reps 5]``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch.func import grad, jvp

if __package__ in (None, ""):  # `python benchmarks/bench_floor.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hypergrad
from benchmarks.measure import rel_error
from benchmarks.problems import build_problem
from benchmarks.solvers_registry import Method

# label -> hvp_mode of CG (spelled out: the registry's "cg" follows the library default, "auto").
CONFIGS = {"cg[fwd_rev]": "fwd_rev", "cg[rev_rev_cached]": "rev_rev_cached"}
BUDGETS = (2, 4, 8, 16, 32, 64, 128)


def _median(call: Callable[[], Any], reps: int) -> float:
    call()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def floor_call(case: Any, k: int, cached: bool) -> Callable[[], Any]:
    """K bare HVPs of the inner loss at theta* (+ two gradients), written directly.

    ``cached``: one ``create_graph`` gradient, then K ``torch.autograd.grad`` calls through it with
    ``retain_graph=True`` (the plain double backward the library's reverse modes use); otherwise
    K ``torch.func`` ``jvp(grad(G))`` products.
    """
    prob, p, h = case.problem, case.params, case.hparams
    keys = list(p)

    def g_theta(q: dict) -> Any:
        return prob.inner_loss(q, h)

    def run() -> Any:
        v = grad(lambda q: prob.outer_loss(q, h))(p)
        if cached:
            leaves = [p[key].detach().requires_grad_(True) for key in keys]
            g = torch.autograd.grad(g_theta(dict(zip(keys, leaves))), leaves, create_graph=True)
            vs = [v[key] for key in keys]
            for _ in range(k):
                vs = list(torch.autograd.grad(g, leaves, grad_outputs=vs, retain_graph=True))
            v = dict(zip(keys, vs))
        else:
            for _ in range(k):
                v = jvp(grad(g_theta), (p,), (v,))[1]
        return grad(lambda hh: prob.inner_loss(p, hh))(h), v

    return run


def measure(preset: str, reps: int) -> list[dict]:
    rows = []
    for problem in ("quadratic_k10", "ridge"):
        case = build_problem(problem, preset, "cpu")
        for label, mode in CONFIGS.items():
            method = Method(label, "implicit", lambda k, c: hypergrad.CG(max_steps=k), hvp_mode=mode)
            k = next((b for b in BUDGETS if rel_error(method.build(case, b)().grad, case.exact) <= 1e-6), None)
            if k is None:
                rows.append(dict(problem=problem, config=label, reached=False))
                continue
            solve = method.build(case, k)
            t_solve = _median(solve, reps)
            t_floor = _median(floor_call(case, k, cached="cached" in label), reps)
            rows.append(
                dict(
                    problem=problem,
                    config=label,
                    reached=True,
                    budget=k,
                    rel_err=rel_error(solve().grad, case.exact),
                    t_solve_ms=1e3 * t_solve,
                    t_floor_ms=1e3 * t_floor,
                    over_floor=t_solve / t_floor,
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=("small", "full"), default="small")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"Time to a 1e-6 hypergradient vs the HVP floor, preset {args.preset}, torch {torch.__version__}")
    print(f"{'problem':<16}{'config':<22}{'K':>5}{'rel err':>10}{'solve ms':>10}{'floor ms':>10}{'solve/floor':>12}")
    for r in measure(args.preset, args.reps):
        if not r["reached"]:
            print(f"{r['problem']:<16}{r['config']:<22}  did not reach 1e-6 within {BUDGETS[-1]} steps")
            continue
        print(
            f"{r['problem']:<16}{r['config']:<22}{r['budget']:>5d}{r['rel_err']:>10.1e}{r['t_solve_ms']:>10.2f}"
            f"{r['t_floor_ms']:>10.2f}{r['over_floor']:>12.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
