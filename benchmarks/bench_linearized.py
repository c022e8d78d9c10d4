r"""HVP / gradient cost per mode, with the frozen linearised operator, eager and ``torch.compile``\ d.

For each model of ``benchmarks/models.py`` (MLP, ResNet with BatchNorm through
:func:`hypergrad.stateless`, causal transformer on the math SDPA backend) and each mode:

* ``fwd_rev``, ``rev_rev``: :class:`hypergrad.HessianOperator` recomputing per matvec;
* ``rev_rev_cached``: the reverse graph built once;
* ``fwd_rev_linearized``: ``torch.func.linearize`` once (what :class:`hypergrad.LinearizedHessian` builds);
* ``auto``: the library's choice (the cached reverse graph when it fits);

it records the one-off build time, the time of one matvec after the build (median of ``reps``),
both as multiples of one eager gradient of the same loss (forward + ``torch.autograd.grad``), the
agreement with ``rev_rev`` and the peak memory of build + 5 matvecs (PyTorch profiler allocation events on CPU, i.e. tensor
memory, not RSS). ``--compile MODEL ...`` adds, for those models, ``torch.compile`` of the gradient
(row ``gradient``: compiled / eager gradient) and of the HVP closure of each ``--compile-modes``
mode (``HVP/grad``: over the eager gradient; ``HVP/c.grad``: over the compiled gradient), with the
compile time and dynamo's graph and graph-break counts; a failed compile is reported with its
error and the eager number kept separate.

Run: ``python benchmarks/bench_linearized.py [--preset small] [--device cuda] [--compile resnet transformer]``, or
``python -m pytest benchmarks/bench_linearized.py`` (eager only, one entry per model and mode).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Callable, Iterator

import pytest
import torch

if __package__ in (None, ""):  # `python benchmarks/bench_linearized.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hypergrad
from benchmarks.measure import peak_memory_bytes, rel_error, synchronize
from benchmarks.models import MODELS, build_model

MODES = ("fwd_rev", "rev_rev", "rev_rev_cached", "fwd_rev_linearized", "auto")
DEVICE = "cpu"  # set by --device; every timed call waits for it


def build(fn: Callable, params: dict, mode: str) -> Callable[[Any], Any]:
    return hypergrad.HessianOperator(fn, params, mode=mode)


def _gradient(case: Any) -> Callable[[], Any]:
    """One eager gradient as a training step computes it: forward + ``torch.autograd.grad``.

    The reference of every ratio (plain autograd: cheaper than ``torch.func.grad`` at these
    sizes, so the ratios are not flattered by a slow reference).
    """
    keys = list(case.params)

    def run() -> Any:
        leaves = [case.params[k].detach().requires_grad_(True) for k in keys]
        return torch.autograd.grad(case.fn(dict(zip(keys, leaves))), leaves)

    return run


def _median_time(call: Callable[[], Any], reps: int) -> float:
    dev = torch.device(DEVICE)
    call()  # warm-up
    synchronize(dev)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        call()
        synchronize(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _probe(case: Any) -> dict:
    """A fixed random direction (drawn on the CPU, so every device gets the same one)."""
    gen = torch.Generator().manual_seed(1)
    return {k: torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for k, p in case.params.items()}


def measure_model(
    name: str, preset: str, reps: int, compile_modes: tuple[str, ...] = (), eager_modes: tuple[str, ...] = MODES
) -> Iterator[dict]:
    """The rows of one model, each as soon as it is measured: ``eager_modes``, then ``compile_modes``."""
    case = build_model(name, preset, DEVICE)
    v = _probe(case)
    t_grad = _median_time(_gradient(case), reps)
    ref = hypergrad.hvp(case.fn, case.params, v, mode="rev_rev")
    for mode in eager_modes:
        synchronize(torch.device(DEVICE))
        t0 = time.perf_counter()
        op = build(case.fn, case.params, mode)
        synchronize(torch.device(DEVICE))
        t_build = time.perf_counter() - t0
        t_hvp = _median_time(lambda: op(v), reps)
        err = rel_error(op(v), ref)
        mem = peak_memory_bytes(lambda: _build_and_apply(case, mode, v, 5), DEVICE)
        yield (
            dict(
                model=name,
                mode=mode,
                compiled=False,
                build_over_grad=t_build / t_grad,
                hvp_over_grad=t_hvp / t_grad,
                grad_ms=1e3 * t_grad,
                rel_err_vs_rev_rev=err,
                peak_mem_mb=mem / 2**20,
                num_params=case.num_params,
            )
        )
    if compile_modes:
        yield from compiled_rows(name, preset, reps, compile_modes)


def compiled_rows(name: str, preset: str, reps: int, modes: tuple[str, ...], timeout: float = 1800) -> Iterator[dict]:
    """The compiled gradient and HVP closures of ``modes``, each in its own process.

    A compiler bug can take the process down (the inductor-compiled gradient of the ResNet aborted
    with a heap corruption here), so each compilation runs in a child process: a crash or a timeout
    becomes a row saying so. Each child times the eager gradient too (``HVP/grad`` is over its own
    process's eager gradient); ``HVP/c.grad`` is the compiled HVP's time over the compiled
    gradient's time (absolute times from two processes). Rows come out as each child finishes.
    """
    import json
    import subprocess

    grad_c_ms = float("nan")  # the compiled gradient, absolute
    for item in ("gradient", *modes):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            name,
            item,
            "--preset",
            preset,
            "--reps",
            str(reps),
        ]
        cmd += ["--threads", str(torch.get_num_threads()), "--device", DEVICE]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            if found:
                row = json.loads(found[-1])
                if item == "gradient":
                    grad_c_ms = row.get("compiled_ms", float("nan"))
                else:
                    row["hvp_over_compiled_grad"] = row.get("compiled_ms", float("nan")) / grad_c_ms
                yield row
                continue
            tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["no output"]
            failure = f"process died (exit {proc.returncode}): {tail[0][:160]}"
        except subprocess.TimeoutExpired:
            failure = f"timed out after {timeout:.0f} s"
        yield dict(model=name, mode=item, compiled=True, num_params=0, compile_failed=failure)


def _child_row(name: str, item: str, preset: str, reps: int) -> dict:
    case = build_model(name, preset, DEVICE)
    v = _probe(case)
    t_grad = _median_time(_gradient(case), reps)
    if item == "gradient":
        compile_s, t_grad_c, failed = compiled_grad_time(case, reps)
        row = dict(model=name, mode="gradient", compiled=True, num_params=case.num_params, grad_ms=1e3 * t_grad)
        row.update(compile_s=compile_s, hvp_over_grad=t_grad_c / t_grad, compiled_ms=1e3 * t_grad_c)
        if failed:
            row["compile_failed"] = failed
        return row
    ref = hypergrad.hvp(case.fn, case.params, v, mode="rev_rev")
    op = build(case.fn, case.params, item)
    return _compiled(case, item, op, v, ref, t_grad, reps)


def _build_and_apply(case: Any, mode: str, v: dict, k: int) -> None:
    op = build(case.fn, case.params, mode)
    for _ in range(k):
        op(v)


def _compiled(case: Any, mode: str, op: Any, v: dict, ref: dict, t_grad: float, reps: int) -> dict:
    """One HVP closure of ``mode`` under ``torch.compile`` (default backend, graph breaks allowed).

    ``fwd_rev`` and ``rev_rev`` compile the ``torch.func`` closures ``jvp(grad(f))`` and
    ``vjp(grad(f))`` (the latter is the order of the default ``auto -> rev_rev_cached``, recomputed per
    product, which is what a compiled graph can hold); ``rev_rev_cached`` / ``auto`` compile the
    library's operator itself (its cached autograd graph is outside what dynamo traces: the graph
    breaks are counted and reported); ``fwd_rev_linearized`` compiles the linearised matvec.
    """
    row = dict(model=case.name, mode=mode, compiled=True, num_params=case.num_params, grad_ms=1e3 * t_grad)
    try:
        if mode == "fwd_rev_linearized":
            target: Callable[[dict], Any] = op.matvec
        elif mode == "fwd_rev":

            def target(u: dict) -> dict:
                return torch.func.jvp(torch.func.grad(case.fn), (case.params,), (u,))[1]

        elif mode == "rev_rev":

            def target(u: dict) -> dict:
                return torch.func.vjp(torch.func.grad(case.fn), case.params)[1](u)[0]

        else:
            target = op
        fn = torch.compile(target)
        t0 = time.perf_counter()
        out = fn(v)
        synchronize(torch.device(DEVICE))
        row["compile_s"] = time.perf_counter() - t0
        t_hvp = _median_time(lambda: fn(v), reps)
        row["hvp_over_grad"] = t_hvp / t_grad
        row["compiled_ms"] = 1e3 * t_hvp
        row["rel_err_vs_rev_rev"] = rel_error(out, ref)
        explain = torch._dynamo.explain(target)(v)
        row["graphs"] = f"{explain.graph_count} graph(s), {explain.graph_break_count} break(s)"
        if explain.graph_break_count:
            row["graphs"] += f": {str(explain.break_reasons[0].reason).splitlines()[0][:90]}"
    except Exception as err:
        msg = " | ".join(line.strip() for line in str(err).splitlines() if line.strip())
        row["compile_failed"] = f"{type(err).__name__}: {msg[:200]}"
    return row


def compiled_grad_time(case: Any, reps: int) -> tuple[float, float, str]:
    """``(compile s, median s, error)`` of ``torch.compile(torch.func.grad(f))``; NaNs and the error if it fails."""
    try:
        fn = torch.compile(torch.func.grad(case.fn))
        t0 = time.perf_counter()
        fn(case.params)
        synchronize(torch.device(DEVICE))
        first = time.perf_counter() - t0
        return first, _median_time(lambda: fn(case.params), reps), ""
    except Exception as err:
        return float("nan"), float("nan"), f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", MODES)
def test_hvp_mode(benchmark, model: str, mode: str, preset: str, models) -> None:
    case = models(model)
    v = _probe(case)
    op = build(case.fn, case.params, mode)
    out = benchmark(lambda: op(v))
    err = rel_error(out, hypergrad.hvp(case.fn, case.params, v, mode="rev_rev"))
    benchmark.group = f"hvp modes (built once): {model}"
    benchmark.extra_info.update(kind="hvp_frozen", model=model, mode=mode, rel_err_vs_rev_rev=err)
    assert err <= 1e-3, f"{mode} HVP disagrees with rev_rev on {model}: {err:.2e}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=("small", "full"), default="small")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--compile", nargs="*", default=[], help="models whose HVP closures (and gradient) to compile")
    ap.add_argument(
        "--compile-modes",
        nargs="*",
        default=["rev_rev", "fwd_rev", "rev_rev_cached"],
        choices=MODES,
        help="modes compiled for the --compile models (default: rev_rev fwd_rev rev_rev_cached)",
    )
    ap.add_argument(
        "--eager-modes",
        nargs="*",
        default=list(MODES),
        choices=MODES,
        help="modes timed eagerly for every model (default: all)",
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (times wait for the device)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "ITEM"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = args.device
    if args.child:  # one compiled measurement, run by compiled_rows in its own process
        import json

        print("ROW " + json.dumps(_child_row(*args.child, args.preset, args.reps)), flush=True)
        return 0
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.startswith("cuda") else f"cpu, threads {args.threads}"
    print(f"HVP cost per mode, preset {args.preset}, torch {torch.__version__}, device {DEVICE} ({where})")
    print(
        f"{'model':<12}{'params':>9}{'mode':<16}{'compiled':>9}{'build/grad':>11}{'HVP/grad':>10}{'err':>10}"
        f"{'peak MB':>9}{'HVP/c.grad':>11}  note"
    )
    for name in args.models:
        modes = tuple(args.compile_modes) if name in args.compile else ()
        for r in measure_model(name, args.preset, args.reps, modes, tuple(args.eager_modes)):
            note = r.get("compile_failed", "") or (f"compile {r['compile_s']:.0f} s" if "compile_s" in r else "")
            note = "; ".join(x for x in (note, r.get("graphs", "")) if x)
            if "grad_ms" in r:
                timed = f"; compiled {r['compiled_ms']:.2f} ms" if "compiled_ms" in r else ""
                note = f"grad {r['grad_ms']:.2f} ms{timed}; " + note
            print(
                f"{r['model']:<12}{r['num_params']:>9d} {r['mode']:<15}{str(r['compiled']):>9}"
                f"{r.get('build_over_grad', float('nan')):>11.2f}{r.get('hvp_over_grad', float('nan')):>10.2f}"
                f"{r.get('rel_err_vs_rev_rev', float('nan')):>10.1e}{r.get('peak_mem_mb', float('nan')):>9.1f}"
                f"{r.get('hvp_over_compiled_grad', float('nan')):>11.2f}  {note}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
