r"""Time to a 1e-6 hypergradient, eager and compiled, against JAXopt and TorchOpt and hypergrad's own HVP floor.

For the quadratic (condition number 10) and ridge problems of ``benchmarks/problems.py``
(float64), the smallest CG budget :math:`K` whose hypergradient is within relative error ``1e-6``
of the closed form is found once (every CG variant below runs the same iterates), then every row
is timed side by side in one process (median, or with ``--stat min`` the minimum, of ``reps`` after
one warm-up; compilation happens in the warm-up and is reported separately) and its error checked
after timing:

* ``hypergrad cg[rev_rev_cached]``: :func:`hypergrad.implicit_grad` with ``CG(max_steps=K)`` on the
  cached reverse graph (the default ``hvp_mode="auto"``), eager;
* ``hypergrad cg[fwd_rev]``: the same on forward-over-reverse HVPs, eager;
* ``hypergrad CompiledCG[fwd_rev]``: :class:`hypergrad.CompiledCG` (the whole K-step loop, HVPs
  included, one ``torch.compile`` graph; the outer gradient and the cross term stay eager);
* ``solve only``: the linear solve alone on an operator built once (no outer gradient, no cross
  term), eager CG on the cached graph and the compiled loop: where the whole call's time goes;
* ``floor[...]``: :math:`K` bare HVPs plus two gradients written by hand
  (``benchmarks/bench_floor.py``): what torch's per-operation cost allows eagerly;
* ``jaxopt_cg[jit]`` / ``jaxopt_cg[no jit]``: JAXopt's ``custom_root`` with ``solve_cg``, the whole
  hypergradient ``jax.jit``-compiled, or run op by op under ``jax.disable_jit()``;
* ``torchopt_cg[eager]`` / ``torchopt_cg[compile]``: TorchOpt's ``custom_root`` with ``solve_cg``,
  eager, or its whole call under ``torch.compile`` (graph breaks allowed, as a user would try it).

Peers that are not installed are reported as such (they are not in the test environment; see
docs/benchmarks.md for the separate virtual environment used). A compile that fails is reported
with its error, never replaced silently by the eager number.

Run: ``python benchmarks/bench_compile.py [--preset full] [--reps 5] [--stat median|min] [--backend inductor]
[--device cuda]`` (on CUDA a ``CompiledCG(mode="reduce-overhead")`` row replays the compiled loop as a CUDA graph).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Iterator

import torch

if __package__ in (None, ""):  # `python benchmarks/bench_compile.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hypergrad
from benchmarks.bench_floor import floor_call
from benchmarks.measure import rel_error, synchronize
from benchmarks.problems import build_problem

TARGET = 1e-6
PROBLEMS = ("quadratic_k10", "ridge")


_STATS: dict[str, Callable[[list[float]], float]] = {"median": statistics.median, "min": min}
STAT = "median"  # set by --stat: on a machine shared with other jobs the minimum is the steadier estimate
DEVICE = "cpu"  # set by --device; every timed call waits for it


def _median(call: Callable[[], Any], reps: int) -> tuple[float, float]:
    """``(first call s, STAT of reps s)``: the first call compiles where anything compiles."""
    dev = torch.device(DEVICE)
    synchronize(dev)
    t = time.perf_counter()
    call()
    synchronize(dev)
    first = time.perf_counter() - t
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        call()
        synchronize(dev)
        ts.append(time.perf_counter() - t)
    return first, _STATS[STAT](ts)


def _hypergrad(case: Any, solver: Any, mode: str) -> Callable[[], dict]:
    prob = case.problem

    def run() -> dict:
        g, sol = hypergrad.implicit_grad(
            prob.inner_loss, prob.outer_loss, case.params, case.hparams, solver=solver, hvp_mode=mode, validate=False
        )
        run.solution = sol  # type: ignore[attr-defined]
        return g

    return run


def smallest_budget(case: Any, max_k: int = 256) -> int | None:
    """Smallest K with a CG hypergradient (cached graph) within TARGET: doubling, then bisection."""

    def ok(k: int) -> bool:
        return rel_error(_hypergrad(case, hypergrad.CG(max_steps=k), "rev_rev_cached")(), case.exact) <= TARGET

    hi = 1
    while not ok(hi):
        hi *= 2
        if hi > max_k:
            return None
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def _peer_rows(case: Any, k: int, reps: int) -> list[dict]:
    rows: list[dict] = []
    fn: Any = None
    try:
        import jax

        from benchmarks.peers import jaxopt_peer
    except ImportError as err:
        rows.append(dict(row="jaxopt_cg", note=f"not installed ({err})"))
    else:
        try:
            fn, hp = jaxopt_peer._compiled(case, "solve_cg")
        except NotImplementedError as err:  # a row saying why, not a crash that loses the whole table
            rows.append(dict(row="jaxopt_cg", note=f"not run: {err}"))
    if fn is not None:
        maxiter = jax.numpy.asarray(k)

        def jit_run() -> Any:
            return jax.block_until_ready(fn(hp, maxiter))

        def eager_run() -> Any:
            with jax.disable_jit():
                return jax.block_until_ready(fn(hp, maxiter))

        to_grad = jaxopt_peer._build(case, "solve_cg", k, k).to_grad
        where = f"JAX on {jax.default_backend()}"
        for label, call, r in (("jaxopt_cg[jit]", jit_run, reps), ("jaxopt_cg[no jit]", eager_run, max(1, reps // 5))):
            first, med = _median(call, r)
            err = rel_error(to_grad(call()), case.exact)
            rows.append(dict(row=label, first_s=first, t_ms=1e3 * med, err=err, note=where))
    try:
        from benchmarks.peers import torchopt_peer
    except ImportError as err:
        rows.append(dict(row="torchopt_cg", note=f"not installed ({err})"))
    else:
        peer = torchopt_peer.METHODS["torchopt_cg"](case, k)
        first, med = _median(peer.run, reps)
        rows.append(
            dict(
                row="torchopt_cg[eager]",
                first_s=first,
                t_ms=1e3 * med,
                err=rel_error(peer.to_grad(peer.run()), case.exact),
            )
        )
        compiled = torch.compile(peer.run)
        try:
            first, med = _median(compiled, reps)
            err = rel_error(peer.to_grad(compiled()), case.exact)
            explain = torch._dynamo.explain(peer.run)()
            note = f"{explain.graph_count} graphs, {explain.graph_break_count} graph breaks"
            rows.append(dict(row="torchopt_cg[compile]", first_s=first, t_ms=1e3 * med, err=err, note=note))
        except Exception as exc:  # report the failure, not an eager number under the compiled label
            msg = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:240]
            rows.append(dict(row="torchopt_cg[compile]", note=f"compile failed: {type(exc).__name__}: {msg}"))
    return rows


def measure(preset: str, reps: int, backend: str, problems: tuple[str, ...] = PROBLEMS) -> Iterator[dict]:
    """The table's rows, one problem at a time (each problem's rows as soon as they are measured)."""
    for problem in problems:
        case = build_problem(problem, preset, DEVICE)
        k = smallest_budget(case)
        if k is None:
            yield dict(problem=problem, row="-", note="CG did not reach 1e-6 within 256 steps")
            continue
        table = []
        compiled = [(f"CompiledCG[fwd_rev, {backend}]", hypergrad.CompiledCG(max_steps=k, backend=backend))]
        if DEVICE.startswith("cuda") and backend == "inductor":  # the compiled loop replayed as a CUDA graph
            cudagraph = hypergrad.CompiledCG(max_steps=k, backend=backend, mode="reduce-overhead")
            compiled.append(("CompiledCG[fwd_rev, CUDA graph]", cudagraph))
        for label, solver, mode in (
            ("hypergrad cg[rev_rev_cached]", hypergrad.CG(max_steps=k), "rev_rev_cached"),
            ("hypergrad cg[fwd_rev]", hypergrad.CG(max_steps=k), "fwd_rev"),
            *((f"hypergrad {name}", solver, "fwd_rev") for name, solver in compiled),
        ):
            run = _hypergrad(case, solver, mode)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", hypergrad.CompileFallbackWarning)
                first, med = _median(run, reps)
            row = dict(row=label, first_s=first, t_ms=1e3 * med, err=rel_error(run(), case.exact))
            stats = run.solution.stats  # type: ignore[attr-defined]
            if "compiled" in stats:
                row["note"] = "compiled" if stats["compiled"] else f"FELL BACK to eager: {stats['compile_error']}"
            row["note"] = "; ".join([row.get("note", "")] + [str(w.message)[:120] for w in caught]).strip("; ")
            table.append(row)
        # The solve alone (operator built once, the right-hand side given): where the time goes.
        prob = case.problem
        rhs = torch.func.grad(lambda q: prob.outer_loss(q, case.hparams))(case.params)
        for label, solver, mode in (
            ("  solve only: CG[rev_rev_cached]", hypergrad.CG(max_steps=k), "rev_rev_cached"),
            *((f"  solve only: {name}", solver, "fwd_rev") for name, solver in compiled),
        ):
            op = hypergrad.HessianOperator(lambda q: prob.inner_loss(q, case.hparams), case.params, mode=mode)
            first, med = _median(lambda: solver(op, rhs), reps)
            note = "operator built once, outside the timer"
            if isinstance(solver, hypergrad.CompiledCG):
                note += "; compiled" if solver(op, rhs).stats["compiled"] else "; FELL BACK to eager"
            table.append(dict(row=label, first_s=first, t_ms=1e3 * med, note=note))
        for label, cached in (("floor[rev_rev_cached]", True), ("floor[fwd_rev]", False)):
            first, med = _median(floor_call(case, k, cached), reps)
            table.append(dict(row=label, first_s=first, t_ms=1e3 * med, note=f"{k} bare HVPs + 2 grads, by hand"))
        table += _peer_rows(case, k, reps)
        floor = next(r["t_ms"] for r in table if r["row"] == "floor[rev_rev_cached]")
        best = min(r["t_ms"] for r in table if r["row"].startswith("hypergrad") and "t_ms" in r)  # whole calls
        for r in table:
            r.update(problem=problem, budget=k)
            if "t_ms" in r:
                r["over_floor"] = r["t_ms"] / floor
                r["hypergrad_best_over_this"] = best / r["t_ms"]
        yield from table


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=("small", "full"), default="full")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", choices=("inductor", "aot_eager", "eager"), default="inductor")
    ap.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda adds the CompiledCG loop as a CUDA graph)")
    ap.add_argument("--stat", choices=tuple(_STATS), default="median", help="statistic of the timed reps")
    args = ap.parse_args(argv)
    global STAT
    STAT = args.stat
    global DEVICE
    DEVICE = args.device
    torch.set_num_threads(args.threads)
    versions = hypergrad_versions()
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.startswith("cuda") else f"threads {torch.get_num_threads()}"
    print(
        f"Time to a 1e-6 hypergradient, preset {args.preset}, {versions}, device {DEVICE} ({where}), "
        f"{STAT} of {args.reps} reps"
    )
    print(
        f"{'problem':<15}{'K':>4}  {'row':<44}{'first s':>9}{STAT + ' ms':>11}{'rel err':>10}{'/ floor':>9}"
        f"{'hg best / row':>14}  note"
    )
    for r in measure(args.preset, args.reps, args.backend, tuple(args.problems)):
        print(
            f"{r['problem']:<15}{r.get('budget', 0):>4}  {r['row']:<44}{r.get('first_s', float('nan')):>9.2f}"
            f"{r.get('t_ms', float('nan')):>11.3f}{r.get('err', float('nan')):>10.1e}"
            f"{r.get('over_floor', float('nan')):>9.2f}{r.get('hypergrad_best_over_this', float('nan')):>14.2f}"
            f"  {r.get('note', '')}",
            flush=True,
        )
    return 0


def hypergrad_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = [f"torch {torch.__version__}"]
    for dist in ("jax", "jaxopt", "torchopt"):
        try:
            out.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            out.append(f"{dist} absent")
    return ", ".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
