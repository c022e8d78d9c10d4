r"""Many right-hand sides, one matrix: recycling and preconditioning vs cold CG, in HVPs to a tolerance.

The system is BiSSL's upper-step system :math:`(I + H/\lambda_e)\,x = \nabla_{\theta_P} L_D`:
:math:`H` the SimCLR Hessian of the lower ResNet-18 backbone on one pretext batch (the
``bench_bissl_step`` case), and ``N_U = 8`` right-hand sides, the downstream gradients of the 8
upper steps of one alternation (same lower parameters, same Hessian batch: one matrix). Over
``--alternations`` consecutive alternations the lower parameters move (one SGD step on the pretext
loss), so the matrix changes and every solver object sees a new operator object.

For each solver: HVPs per alternation to ``rtol = 1e-4`` (setup included: a Lanczos basis,
a preconditioner's sketch or probes), and the relative error of each solution against a reference
solve to ``rtol = 1e-6`` (float32; its true residual is checked to be below 1e-5). HVPs use the cached reverse graph
(``HessianOperator(mode="rev_rev_cached")``), so they are exact and the counts do not depend on
the HVP mode.

``--small-cnn``: the float64 stand-in (small ResNet with BatchNorm, ``I + H/damping``), reference by
MINRES to rtol 1e-11 with its true residual checked (``--dense``: a dense ``torch.linalg.solve`` and
the spectrum, one HVP per parameter). One solver object per name serves every alternation, so only
``RecycledLanczos(carry=True)`` takes anything from one alternation to the next. The small CNN
also runs ``PCG`` with :class:`hypergrad.KFAC` (``pcg_kfac*``: the preconditioner reads the model
and the Hessian batch); its build is not a matvec, so its cost is printed apart, in network passes
and in units of one HVP's time. ``--spectra D1 D2 ...``: the condition numbers of ``I + H/D``,
plain and preconditioned by K-FAC, the exact Gauss-Newton matrix, the exact diagonal and the exact
per-tensor blocks (dense; why a curvature preconditioner helps or not).

Run: ``python benchmarks/bench_recycling.py [--preset small|full] [--damping 500] [--alternations 2]``
(prints a table), or ``python -m pytest benchmarks/bench_recycling.py`` (one pytest-benchmark
entry per solver with the counts in ``extra_info``).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python benchmarks/bench_recycling.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hypergrad
from benchmarks.bench_bissl_step import LAM, N_U, Case

RTOL = 1e-4


def solvers(max_steps: int = 200) -> dict[str, Callable[[], hypergrad.AbstractLinearSolver]]:
    """Solver factories (one object per solver name and run; its cache starts empty)."""
    return {
        "cg_cold": lambda: hypergrad.CG(max_steps=max_steps, rtol=RTOL),
        "minres_cold": lambda: hypergrad.MINRES(max_steps=max_steps, rtol=RTOL),
        "recycled_lanczos_8": lambda: hypergrad.RecycledLanczos(basis_size=8, max_steps=max_steps, rtol=RTOL),
        "recycled_lanczos_16": lambda: hypergrad.RecycledLanczos(basis_size=16, max_steps=max_steps, rtol=RTOL),
        "recycled_converged_16": lambda: hypergrad.RecycledLanczos(
            basis_size=16, max_steps=max_steps, rtol=RTOL, ritz_tol=1e-2
        ),
        "recycled_converged_32": lambda: hypergrad.RecycledLanczos(
            basis_size=32, max_steps=max_steps, rtol=RTOL, ritz_tol=1e-2
        ),
        "recycled_carry_16": lambda: hypergrad.RecycledLanczos(
            basis_size=16, max_steps=max_steps, rtol=RTOL, ritz_tol=1e-2, carry=True
        ),
        "recycled_carry_32": lambda: hypergrad.RecycledLanczos(
            basis_size=32, max_steps=max_steps, rtol=RTOL, ritz_tol=1e-2, carry=True
        ),
        "pcg_nystrom_lanczos_8": lambda: hypergrad.PCG(hypergrad.Nystrom(rank=8), max_steps=max_steps, rtol=RTOL),
        "pcg_nystrom_random_8": lambda: hypergrad.PCG(
            hypergrad.Nystrom(rank=8, sketch="random"), max_steps=max_steps, rtol=RTOL
        ),
        "pcg_hutchinson_8": lambda: hypergrad.PCG(
            hypergrad.HutchinsonDiagonal(num_samples=8), max_steps=max_steps, rtol=RTOL
        ),
    }


def structured_solvers(system: Any, max_steps: int = 200) -> dict[str, Callable[[], hypergrad.AbstractLinearSolver]]:
    """PCG with K-FAC preconditioners (they read the model and the Hessian batch; small CNN only).

    The point is read through ``params=lambda: system.params``, so each alternation's operator gets
    factors at the moved lower parameters; type-2 (exact Gauss-Newton) factors: one forward and one
    backward pass per class (10); ``mc1``: one sampled label per example, one backward pass.
    """
    if not isinstance(system, SmallCNNSystem):
        return {}

    def kfac(**kw: Any) -> hypergrad.KFAC:
        x = system.h_batch[0]
        return hypergrad.KFAC(system.net, x, params=lambda: system.params, shift=1.0, scale=1.0 / system.lam, **kw)

    return {
        "pcg_kfac": lambda: hypergrad.PCG(kfac(), max_steps=max_steps, rtol=RTOL),
        "pcg_ekfac": lambda: hypergrad.PCG(kfac(correction=True), max_steps=max_steps, rtol=RTOL),
        "pcg_kfac_reduce": lambda: hypergrad.PCG(kfac(sharing="reduce"), max_steps=max_steps, rtol=RTOL),
        "pcg_ekfac_reduce": lambda: hypergrad.PCG(
            kfac(sharing="reduce", correction=True), max_steps=max_steps, rtol=RTOL
        ),
        "pcg_kfac_mc1": lambda: hypergrad.PCG(kfac(fisher="mc"), max_steps=max_steps, rtol=RTOL),
        "pcg_kfac_hutch8": lambda: hypergrad.PCG(
            kfac(others="hutchinson", hutchinson_samples=8), max_steps=max_steps, rtol=RTOL
        ),
    }


def kfac_setup_cost(solver: Any, op: Callable[[Any], Any], b: dict, reps: int = 3) -> dict:
    """A K-FAC build's cost: its network passes and its time in units of one (steady-state) HVP.

    Built again outside the solver (the solver's own build is not timed separately), median of
    ``reps``; the HVP time is the median of ``2 * reps`` products after the first (which builds the
    cached graph and costs more), so the ratio errs on the expensive side.
    """
    pre = solver.preconditioner
    times, built = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        built = pre.build(op, b)
        times.append(time.perf_counter() - t0)
    op(b)
    hvp_t = []
    for _ in range(2 * reps):
        t0 = time.perf_counter()
        op(b)
        hvp_t.append(time.perf_counter() - t0)
    t_build, t_hvp = sorted(times)[reps // 2], sorted(hvp_t)[reps]
    return dict(
        setup_passes=f"{built.forward_passes}F+{built.backward_passes}B",
        setup_hvp_equiv=t_build / t_hvp,
        setup_matvecs=built.num_matvecs,
    )


class System:
    """The lower SSL model at one point, its pretext Hessian and the N_U right-hand sides."""

    def __init__(self, case: Case, damping: float):
        self.case, self.lam_eff = case, LAM + damping
        self.ssl = copy.deepcopy(case.ssl)
        if hasattr(getattr(self.ssl, "loss_fn", None), "gather"):
            self.ssl.loss_fn.gather = False  # one process: no all_gather inside torch.func
        self.f = hypergrad.stateless(self.ssl)

    def backbone(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.ssl.named_parameters() if k.startswith("backbone.")}

    def operator(self) -> Callable[[Any], Any]:
        """``v -> v + H v / lam_eff`` at the current lower parameters (a new object each call)."""
        x1, x2, _ = self.case.h_batch
        H = hypergrad.HessianOperator(lambda p: self.f(p, x1, x2), self.backbone(), mode="rev_rev_cached")
        return hypergrad.Damped(_Scaled(H, 1.0 / self.lam_eff), 1.0)

    def rhs(self) -> list[dict[str, torch.Tensor]]:
        out = []
        for x, y in self.case.d_batches:
            bb = self.backbone()
            g = torch.func.grad(lambda p: F.cross_entropy(self.case.head(self._features(p, x)), y))(bb)
            out.append({k: v.detach() for k, v in g.items()})
        return out

    def _features(self, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        trimmed = {k[len("backbone.") :]: v for k, v in p.items()}
        return hypergrad.stateless(self.ssl.backbone)(trimmed, x)

    def lower_step(self, lr: float = 0.05) -> None:
        """One SGD step on the pretext loss: the next alternation's matrix."""
        x1, x2, _ = self.case.h_batch
        g = torch.func.grad(lambda p: self.f(p, x1, x2))(self.backbone())
        with torch.no_grad():
            for k, p in self.ssl.named_parameters():
                if k in g:
                    p.sub_(lr * g[k])


class SmallCNNSystem:
    """A cheaper stand-in (float64): the small-preset ResNet with BatchNorm of ``benchmarks/models.py``,
    :math:`H` the Hessian of its loss on one batch, right-hand sides = loss gradients on 8 other batches."""

    def __init__(self, lam: float):
        from benchmarks.models import SmallResNet

        torch.manual_seed(0)
        self.net, self.lam = SmallResNet((4, 8)).double().train(), lam
        gen = torch.Generator().manual_seed(1)
        batches = [
            (torch.randn(8, 3, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 10, (8,), generator=gen))
            for _ in range(N_U + 1)
        ]
        self.h_batch, self.d_batches = batches[0], batches[1:]
        self.f = hypergrad.stateless(self.net)
        self.params = hypergrad.module_params(self.net)

    def _loss(self, batch: tuple) -> Callable[[dict], torch.Tensor]:
        return lambda p: F.cross_entropy(self.f(p, batch[0]), batch[1])

    def operator(self) -> Callable[[Any], Any]:
        H = hypergrad.HessianOperator(self._loss(self.h_batch), self.params, mode="rev_rev_cached")
        return hypergrad.Damped(_Scaled(H, 1.0 / self.lam), 1.0)

    def rhs(self) -> list[dict[str, torch.Tensor]]:
        return [torch.func.grad(self._loss(b))(self.params) for b in self.d_batches]

    def lower_step(self, lr: float = 0.01) -> None:
        g = torch.func.grad(self._loss(self.h_batch))(self.params)
        self.params = {k: v - lr * g[k] for k, v in self.params.items()}

    def dense(self) -> torch.Tensor:
        r"""The dense float64 matrix :math:`I + H/\lambda` (one HVP per column of the identity)."""
        op, keys = self.operator(), list(self.params)
        sizes = [self.params[k].numel() for k in keys]

        def unflat(e: torch.Tensor) -> dict[str, torch.Tensor]:
            return {k: t.reshape(self.params[k].shape) for k, t in zip(keys, torch.split(e, sizes))}

        eye = torch.eye(sum(sizes), dtype=torch.float64)

        def column(e: torch.Tensor) -> torch.Tensor:  # one HVP per column (not one per key)
            out = op(unflat(e))
            return torch.cat([out[k].reshape(-1) for k in keys])

        cols = [column(e) for e in eye]
        A = torch.stack(cols, dim=1)
        return 0.5 * (A + A.T)

    def exact(self) -> list[dict[str, torch.Tensor]]:
        """Dense ``torch.linalg.solve`` of every right-hand side (the float64 reference)."""
        A, keys = self.dense(), list(self.params)
        sizes = [self.params[k].numel() for k in keys]
        eig = torch.linalg.eigvalsh(A)
        self.spectrum = (float(eig[0]), float(eig[-1]), float(eig.abs().max() / eig.abs().min()))
        out = []
        for b in self.rhs():
            x = torch.linalg.solve(A, torch.cat([b[k].reshape(-1) for k in keys]))
            out.append({k: t.reshape(self.params[k].shape) for k, t in zip(keys, torch.split(x, sizes))})
        return out


class LogRegSystem(SmallCNNSystem):
    """A regime where the Hessian *is* the Gauss-Newton matrix (float64): multinomial logistic
    regression, 16 correlated features (mixing matrix with column scales 1 ... 1e-2), 5 classes,
    random labels, batches of 64; :math:`H` on one batch, right-hand sides on 8 others."""

    def __init__(self, lam: float):
        torch.manual_seed(0)
        self.net, self.lam = torch.nn.Linear(16, 5).double(), lam
        gen = torch.Generator().manual_seed(1)
        mix = torch.randn(16, 16, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, 16, dtype=torch.float64)
        batches = [
            (torch.randn(64, 16, generator=gen, dtype=torch.float64) @ mix.T, torch.randint(0, 5, (64,), generator=gen))
            for _ in range(N_U + 1)
        ]
        self.h_batch, self.d_batches = batches[0], batches[1:]
        self.f = hypergrad.stateless(self.net)
        self.params = hypergrad.module_params(self.net)


def curvature_spectra(system: SmallCNNSystem, dampings: list[float]) -> None:
    r"""Why K-FAC helps or not: condition numbers of :math:`I + H/\lambda` preconditioned by
    :math:`I + C/\lambda` for K-FAC curvatures :math:`C` and the exact Gauss-Newton matrix, and by
    the exact diagonal and the exact per-tensor diagonal blocks of :math:`I + H/\lambda` itself (the
    best any diagonal or layer-wise preconditioner can do). Dense: one HVP per parameter at the
    first point; :math:`H` is the same for every damping."""
    A, n = system.dense(), sum(v.numel() for v in system.params.values())
    eye = torch.eye(n, dtype=torch.float64)
    H = (A - eye) * system.lam
    keys = list(system.params)
    sizes = [system.params[k].numel() for k in keys]
    x = system.h_batch[0]

    def logits(flat: torch.Tensor) -> torch.Tensor:
        p = {k: t.reshape(system.params[k].shape) for k, t in zip(keys, torch.split(flat, sizes))}
        return system.f(p, x)

    flat = torch.cat([system.params[k].reshape(-1) for k in keys])
    J = torch.func.jacrev(logits)(flat)  # (N, C, n)
    prob = torch.softmax(logits(flat).detach(), dim=1)
    lam_z = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    ggn = torch.einsum("ncp,ncd,ndq->pq", J, lam_z, J) / x.shape[0]
    curv = {"exact Gauss-Newton": ggn}
    for label, kw in [
        ("K-FAC expand", {}),
        ("K-FAC reduce", {"sharing": "reduce"}),
        ("EK-FAC expand", {"correction": True}),
        ("EK-FAC reduce", {"sharing": "reduce", "correction": True}),
    ]:
        pre = hypergrad.KFAC(system.net, x, params=lambda: system.params, shift=1.0, scale=1.0, **kw)
        built = pre.build(lambda v: v, system.params)
        curv[label] = torch.linalg.inv(torch.stack([built.apply(e) for e in eye], dim=1)) - eye
    eh, eg, er = (torch.linalg.eigvalsh(0.5 * (m + m.T)) for m in (H, ggn, H - ggn))
    print(
        f"eigenvalues: H [{eh[0]:.3g}, {eh[-1]:.3g}], Gauss-Newton [{eg[0]:.2g}, {eg[-1]:.3g}], "
        f"H - Gauss-Newton [{er[0]:.3g}, {er[-1]:.3g}]"
    )

    def blocks(m: torch.Tensor) -> torch.Tensor:  # the per-tensor diagonal blocks of m
        out, start = torch.zeros_like(m), 0
        for size in sizes:
            out[start : start + size, start : start + size] = m[start : start + size, start : start + size]
            start += size
        return out

    labels = [*curv, "exact diagonal", "exact per-tensor blocks"]
    print(f"{'damping':>8}{'plain':>12}" + "".join(f"{k:>26}" for k in labels))
    for lam in dampings:
        sys_mat = eye + H / lam
        e = torch.linalg.eigvalsh(sys_mat)
        row = f"{lam:>8g}{float(e.abs().max() / e.abs().min()):>12.4g}"
        precs = [eye + 0.5 * (c + c.T) / lam for c in curv.values()]
        precs += [torch.diag(torch.diag(sys_mat)), blocks(sys_mat)]  # the best any diagonal / layer-wise M can do
        for P in precs:
            L, info = torch.linalg.cholesky_ex(P)
            if int(info) != 0:
                row += f"{'n/a (M indefinite)':>26}"
                continue
            Li = torch.linalg.solve_triangular(L, eye, upper=False)
            e = torch.linalg.eigvalsh(Li @ sys_mat @ Li.T)
            row += f"{float(e.abs().max() / e.abs().min()):>26.4g}"
        print(row)


class _Scaled(hypergrad.LinearOperator):
    """``v -> s A v`` (one HVP per call)."""

    def __init__(self, op: Callable[[Any], Any], s: float):
        self.op, self.s = op, s

    def matvec(self, v: Any) -> Any:
        return hypergrad.tree_scale(self.op(v), self.s)


def _checked_solves(solver: Any, op: Callable[[Any], Any], rhs: list[dict], bound: float) -> list[dict]:
    """``solver`` on each right-hand side, refused unless its true relative residual is <= ``bound``."""
    out = []
    for b in rhs:
        sol = solver(op, b).raise_if_failed(solver)
        true_res = float(hypergrad.tree_norm(hypergrad.tree_sub(b, op(sol.x)))) / float(hypergrad.tree_norm(b))
        if true_res > bound:
            raise RuntimeError(f"reference solve not accurate: true relative residual {true_res:.1e}")
        out.append(sol.x)
    return out


def reference(op: Callable[[Any], Any], rhs: list[dict]) -> list[dict]:
    """Tight solves (recycled basis of 24 + PCG/MINRES to 1e-6); their true residuals are checked."""
    return _checked_solves(hypergrad.RecycledLanczos(basis_size=24, max_steps=400, rtol=1e-6), op, rhs, 1e-5)


def tight(op: Callable[[Any], Any], rhs: list[dict]) -> list[dict]:
    """float64 MINRES to rtol 1e-11 (any symmetric system), true relative residual checked <= 1e-9."""
    return _checked_solves(hypergrad.MINRES(max_steps=5000, rtol=1e-11), op, rhs, 1e-9)


def _rel(a: dict, b: dict) -> float:
    return float(hypergrad.tree_norm(hypergrad.tree_sub(a, b))) / float(hypergrad.tree_norm(b))


def run_alternation(system: System, solver: hypergrad.AbstractLinearSolver, exact: list[dict]) -> dict:
    op = system.operator()
    hvps, errs, statuses, t0 = 0, [], [], time.perf_counter()
    for b, ref in zip(system.rhs(), exact):
        sol = solver(op, b)
        hvps += sol.num_matvecs
        errs.append(_rel(sol.x, ref))
        statuses.append(sol.status.value)
    row = dict(hvps=hvps, max_rel_err=max(errs), statuses=sorted(set(statuses)), time_s=time.perf_counter() - t0)
    if isinstance(getattr(solver, "preconditioner", None), hypergrad.KFAC):
        row.update(kfac_setup_cost(solver, op, system.rhs()[0]))
    return row


def measure(
    preset: str,
    damping: float,
    alternations: int,
    names: list[str] | None = None,
    small_cnn: bool = False,
    dense: bool = False,
    logreg: bool = False,
) -> dict[str, list]:
    """``{solver: [per-alternation dict]}`` over consecutive alternations (matrix changes between)."""
    torch.manual_seed(0)
    system: Any = (
        LogRegSystem(damping) if logreg else SmallCNNSystem(damping) if small_cnn else System(Case(preset), damping)
    )
    small_cnn = small_cnn or logreg
    factories = {**solvers(), **structured_solvers(system)}
    unknown = [n for n in (names or []) if n not in factories]
    if unknown:
        raise ValueError(f"--solvers: unknown {unknown}; choose from {sorted(factories)} (pcg_kfac*: --small-cnn only)")
    table: dict[str, list] = {n: [] for n in (names or factories)}
    # one solver object per name for all alternations: each alternation is a new operator object, so
    # only a solver that carries its basis on purpose (``carry=True``) keeps anything across them
    objects = {n: factories[n]() for n in table}
    for _ in range(alternations):
        if small_cnn and dense:
            exact = system.exact()
            lo, hi, cond = system.spectrum
            print(
                f"alternation {len(next(iter(table.values())))}: eigenvalues of I + H/lam in "
                f"[{lo:.3g}, {hi:.3g}], |cond| {cond:.3g}"
            )
        elif small_cnn:
            exact = tight(system.operator(), system.rhs())
        else:
            exact = reference(system.operator(), system.rhs())
        for name in table:
            table[name].append(run_alternation(system, objects[name], exact))
        system.lower_step()
    return table


@pytest.mark.parametrize("name", list(solvers()))
def test_recycling(benchmark, name: str, preset: str) -> None:
    key = ("table", preset)
    if key not in _CACHE:
        _CACHE[key] = measure(preset, 500.0, 2)
    rows = _CACHE[key][name]
    benchmark.pedantic(lambda: None, rounds=1)  # the counts, not the time, are the result here
    benchmark.group = f"recycling N_U={N_U} rtol={RTOL}"
    benchmark.extra_info.update(kind="recycling", solver=name, per_alternation=rows)
    cold = _CACHE[key]["cg_cold"]
    for row, c in zip(rows, cold):
        assert row["max_rel_err"] < 10 * RTOL * 100, row  # same tolerance: comparable accuracy
        assert row["hvps"] > 0 and c["hvps"] > 0


_CACHE: dict[Any, Any] = {}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=("small", "full"), default="small")
    ap.add_argument("--damping", type=float, default=500.0)
    ap.add_argument("--alternations", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--solvers", nargs="*", default=None)
    ap.add_argument("--small-cnn", action="store_true", help="the float64 small ResNet system (lam = --damping)")
    ap.add_argument(
        "--dense", action="store_true", help="small CNN: dense reference and spectrum (one HVP per parameter)"
    )
    ap.add_argument(
        "--spectra",
        type=float,
        nargs="*",
        default=None,
        help="small CNN: condition numbers of I + H/lam for these dampings, plain and preconditioned by "
        "K-FAC / EK-FAC / the exact Gauss-Newton matrix (dense), then exit",
    )
    ap.add_argument(
        "--logreg",
        action="store_true",
        help="instead: multinomial logistic regression on correlated features (H = Gauss-Newton; lam = --damping)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.spectra is not None:
        system = LogRegSystem(args.damping) if args.logreg else SmallCNNSystem(args.damping)
        curvature_spectra(system, args.spectra or [args.damping])
        return 0
    table = measure(args.preset, args.damping, args.alternations, args.solvers, args.small_cnn, args.dense, args.logreg)
    args.small_cnn = args.small_cnn or args.logreg
    print(
        f"{'logistic regression' if args.logreg else 'small CNN' if args.small_cnn else 'BiSSL upper-step'} systems (I + H/lam_e), lam_e={(0.0 if args.small_cnn else LAM) + args.damping:g}, N_U={N_U} right-hand sides per "
        f"alternation, rtol={RTOL}, preset {args.preset}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    cold = table.get("cg_cold")
    print(
        f"{'solver':<24}"
        + "".join(f"{'HVPs a' + str(i):>10}{'x fewer':>9}{'max err':>10}" for i in range(args.alternations))
        + "  statuses"
    )
    for name, rows in table.items():
        cells = ""
        for i, r in enumerate(rows):
            ratio = cold[i]["hvps"] / r["hvps"] if cold else float("nan")
            cells += f"{r['hvps']:>10d}{ratio:>9.2f}{r['max_rel_err']:>10.1e}"
        print(f"{name:<24}{cells}  {sorted({s for r in rows for s in r['statuses']})}")
    for name, rows in table.items():
        if "setup_hvp_equiv" in rows[0]:
            equiv = "  ".join(
                f"a{i}: {r['setup_passes']} = {r['setup_hvp_equiv']:.2f} HVP-times, "
                f"{r['hvps'] + r['setup_hvp_equiv']:.1f} HVP-equivalents in all "
                f"({cold[i]['hvps'] / (r['hvps'] + r['setup_hvp_equiv']) if cold else float('nan'):.2f}x fewer)"
                for i, r in enumerate(rows)
            )
            print(f"{name} K-FAC setup (not in the HVP column: {rows[0]['setup_matvecs']} matvecs there): {equiv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
