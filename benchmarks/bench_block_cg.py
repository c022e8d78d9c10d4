r"""Many right-hand sides known at once: block CG vs separate CG solves, in HVPs, error and time.

The system is the float64 stand-in of ``bench_recycling.py --small-cnn``: a small ResNet with
BatchNorm (1454 parameters), :math:`H` the Hessian of its loss on one batch of 8, and the
``N_U = 8`` right-hand sides :math:`b_j` the loss gradients on 8 other batches. It solves
:math:`(I + H/\lambda)\,x_j = b_j`, written for :func:`hypergrad.inverse_hvp` as
:math:`(H + \lambda I)\,x_j = \lambda b_j` (same solutions, same relative residuals), to
``rtol = 1e-4`` per column, three ways in one run:

* ``cg_cold``: 8 separate ``CG`` solves (``inverse_hvp`` with a single-right-hand-side solver);
* ``block_cg``: one ``BlockCG`` solve of the 8 columns, its products batched
  (:meth:`hypergrad.HessianOperator.matmat`: one double backward with ``is_grads_batched``);
* ``block_cg_looped``: the same block solve with one product per column (an operator without a
  batched ``matmat``): the same HVP count, the time of unbatched products.

HVPs: total column products (a batched block of ``r`` counts ``r``). Error: the largest relative
error of a column against a dense ``torch.linalg.solve`` (one HVP per parameter, built once). Time:
wall-clock seconds of the whole call (operator construction, i.e. the cached graph, included),
median of ``--reps`` round-robin repetitions.

Run: ``python benchmarks/bench_block_cg.py --damping 6 [--reps 3]``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

import torch

if __package__ in (None, ""):  # `python benchmarks/bench_block_cg.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hypergrad
from benchmarks.bench_recycling import SmallCNNSystem

RTOL = 1e-4
MAX_STEPS = 300


class _Looped(hypergrad.LinearOperator):
    """An operator with only ``matvec``: its ``matmat`` is the default, one product per column."""

    symmetric = True

    def __init__(self, op: Callable[[Any], Any]):
        self.op = op

    def matvec(self, v: Any) -> Any:
        return self.op(v)


def _stack(cols: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([c[k] for c in cols]) for k in cols[0]}


def rows(system: SmallCNNSystem) -> dict[str, Callable[[dict], hypergrad.Solution]]:
    """``{name: V -> Solution}`` solving :math:`(H + \\lambda I) X = V` for the block ``V``."""
    lam, loss = system.lam, system._loss(system.h_batch)

    def cg_cold(V: dict) -> hypergrad.Solution:
        solver = hypergrad.CG(max_steps=MAX_STEPS, rtol=RTOL)
        return hypergrad.inverse_hvp(
            loss, system.params, V, damping=lam, solver=solver, hvp_mode="rev_rev_cached"
        ).solution

    def block_cg(V: dict) -> hypergrad.Solution:
        solver = hypergrad.BlockCG(max_steps=MAX_STEPS, rtol=RTOL)
        return hypergrad.inverse_hvp(
            loss, system.params, V, damping=lam, solver=solver, hvp_mode="rev_rev_cached"
        ).solution

    def block_cg_looped(V: dict) -> hypergrad.Solution:
        H = hypergrad.HessianOperator(loss, system.params, mode="rev_rev_cached")
        op = hypergrad.Damped(_Looped(H), lam)
        return hypergrad.BlockCG(max_steps=MAX_STEPS, rtol=RTOL).solve_block(op, V)

    return {"cg_cold": cg_cold, "block_cg": block_cg, "block_cg_looped": block_cg_looped}


def measure(damping: float, reps: int = 3) -> tuple[dict[str, dict], tuple[float, float, float]]:
    """``({row: {hvps, max_rel_err, time_s, steps, status}}, spectrum)`` at one damping."""
    system = SmallCNNSystem(damping)
    exact = system.exact()  # dense reference (and the spectrum of I + H/lam)
    V = _stack([{k: damping * t for k, t in b.items()} for b in system.rhs()])
    ref = _stack(exact)
    fns = rows(system)
    times: dict[str, list[float]] = {name: [] for name in fns}
    out: dict[str, dict] = {}
    for _ in range(reps):  # round-robin: every row sees the same machine load
        for name, fn in fns.items():
            t0 = time.perf_counter()
            sol = fn(V)
            times[name].append(time.perf_counter() - t0)
            errs = [
                float(hypergrad.tree_norm({k: sol.x[k][j] - ref[k][j] for k in ref}))
                / float(hypergrad.tree_norm({k: ref[k][j] for k in ref}))
                for j in range(ref[next(iter(ref))].shape[0])
            ]
            out[name] = dict(hvps=sol.num_matvecs, max_rel_err=max(errs), steps=sol.num_steps, status=sol.status.value)
    for name in fns:
        out[name]["time_s"] = sorted(times[name])[len(times[name]) // 2]
    return out, system.spectrum


def test_block_cg(benchmark) -> None:
    """One damping, one repetition: the counts and errors are the result (checked), not the time."""
    table, _ = measure(6.0, reps=1)
    benchmark.pedantic(lambda: None, rounds=1)
    benchmark.group = f"block CG, N_U=8, rtol={RTOL}"
    benchmark.extra_info.update(kind="block_cg", rows=table)
    for row in table.values():
        assert row["status"] == "success" and row["max_rel_err"] < 100 * RTOL, row
    # the same iteration with batched or looped products: the same counts up to a rounding-level rank decision
    assert abs(table["block_cg"]["hvps"] - table["block_cg_looped"]["hvps"]) <= 8
    assert table["block_cg"]["hvps"] < table["cg_cold"]["hvps"]


def measure_products(preset: str, device: str, columns: int, reps: int) -> dict[str, dict]:
    """One block of ``columns`` products on the BiSSL ResNet-18 system: batched vs one by one.

    The operator is ``HessianOperator(mode="rev_rev_cached")`` of the SimCLR pretext loss of
    ``bench_bissl_step``'s case (float32), built once and kept (its graph is not counted in the
    products' peak); the block is ``columns`` random directions. Rows: ``matmat`` (one batched double
    backward), ``matmat, chunks of c`` (``inverse_hvp(chunk_size=c)``'s products) and ``matvec x s``
    (one double backward per column); time: median of ``reps``
    round-robin repetitions (device-synchronised); peak: the products' own peak allocation
    (``measure.peak_memory_bytes``); ``max rel diff``: of any row's block against the looped one.
    """
    from benchmarks.bench_bissl_step import _hvp_case
    from benchmarks.measure import peak_memory_bytes, synced

    ssl, x1, x2, _ = _hvp_case(preset, device)
    f = hypergrad.stateless(ssl)
    bb = {k: p.detach() for k, p in ssl.backbone.named_parameters()}
    op = hypergrad.HessianOperator(
        lambda p: f({"backbone." + k: t for k, t in p.items()}, x1, x2), bb, mode="rev_rev_cached"
    )
    gen = torch.Generator(device=device).manual_seed(0)
    V = {k: torch.randn((columns, *t.shape), generator=gen, device=device, dtype=t.dtype) for k, t in bb.items()}
    op({k: t[0] for k, t in V.items()})  # builds the cached graph once, outside every measurement

    def looped() -> dict:
        return _stack([op({k: t[j] for k, t in V.items()}) for j in range(columns)])

    def chunks(c: int) -> Callable[[], dict]:  # what inverse_hvp(chunk_size=c) asks of the operator
        def run() -> dict:
            parts = [op.matmat({k: t[i : i + c] for k, t in V.items()}) for i in range(0, columns, c)]
            return {k: torch.cat([p[k] for p in parts]) for k in V}

        return run

    fns: dict[str, Callable[[], Any]] = {"matmat (batched)": lambda: op.matmat(V)}
    fns.update({f"matmat, chunks of {c}": chunks(c) for c in (4, 2) if c < columns})
    fns[f"matvec x {columns}"] = looped
    out_blocks = {name: fn() for name, fn in fns.items()}
    b = out_blocks[f"matvec x {columns}"]
    diff = max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for a in out_blocks.values() for k in b)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            run = synced(fn, device)
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    table = {}
    for name, fn in fns.items():
        t = sorted(times[name])[len(times[name]) // 2]
        table[name] = dict(time_s=t, peak_mb=peak_memory_bytes(fn, device) / 2**20, batched=op.matmat_batched)
    table["max_rel_diff"] = {"value": diff}
    return table


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--damping", type=float, nargs="+", default=[6.0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--products",
        choices=("tiny", "small", "full"),
        help="only the batched vs one-by-one products on the BiSSL ResNet-18 system of this preset (time, memory)",
    )
    ap.add_argument("--columns", type=int, default=8, help="--products: block size s")
    ap.add_argument("--device", default="cpu", help="--products: device")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.products:
        table = measure_products(args.products, args.device, args.columns, args.reps)
        diff = table.pop("max_rel_diff")["value"]
        print(
            f"BiSSL ResNet-18 system ({args.products} preset, float32, {args.device}), HessianOperator[rev_rev_cached], "
            f"one block of {args.columns} products, torch {torch.__version__}, threads {torch.get_num_threads()}, "
            f"median of {args.reps}; max rel diff batched vs looped {diff:.1e}"
        )
        loop = table[f"matvec x {args.columns}"]
        print(f"{'row':<22}{'time s':>9}{'x faster':>10}{'peak MB':>9}{'x memory':>10}")
        for name, r in table.items():
            print(
                f"{name:<22}{r['time_s']:>9.3f}{loop['time_s'] / r['time_s']:>10.2f}{r['peak_mb']:>9.1f}"
                f"{r['peak_mb'] / loop['peak_mb']:>10.2f}"
            )
        print(f"batched: {table['matmat (batched)']['batched']}")
        return 0
    print(
        f"small CNN (float64, 1454 params), (I + H/lam) X = B, N_U=8 right-hand sides at once, rtol={RTOL} per "
        f"column, torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.reps} reps"
    )
    for damping in args.damping:
        table, (lo, hi, cond) = measure(damping, args.reps)
        cold = table["cg_cold"]
        print(f"\nlam = {damping:g}: eigenvalues of I + H/lam in [{lo:.3g}, {hi:.3g}], |cond| {cond:.3g}")
        print(f"{'row':<18}{'HVPs':>7}{'x fewer':>9}{'steps':>7}{'max err':>10}{'time s':>9}{'x faster':>10}  status")
        for name, r in table.items():
            print(
                f"{name:<18}{r['hvps']:>7d}{cold['hvps'] / r['hvps']:>9.2f}{r['steps']:>7d}{r['max_rel_err']:>10.1e}"
                f"{r['time_s']:>9.3f}{cold['time_s'] / r['time_s']:>10.2f}  {r['status']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
