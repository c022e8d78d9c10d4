"""BlockCG (many right-hand sides at once), batched operator products (matmat) and inverse_hvp.

References: dense ``torch.linalg.solve`` on random SPD matrices, dense Hessians by double backward,
and the column-by-column products of the same operator. float64 throughout.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad
from hypergrad import CG, BlockCG, Damped, HessianOperator, SolverError, Status
from tests.helpers_problem import double_backward_hessian

F64 = torch.float64


def spd(n: int, eig: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    a = (q * eig) @ q.T
    return 0.5 * (a + a.T)


def rhs(s: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(s, n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def to_tree(m: torch.Tensor) -> dict[str, torch.Tensor]:
    """A block (s, n) as a tree with two leaves: ``a`` (s, 3, 2) and ``b`` (s, n - 6)."""
    return {"a": m[:, :6].reshape(-1, 3, 2), "b": m[:, 6:]}


def from_tree(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t["a"].reshape(t["a"].shape[0], -1), t["b"]], dim=1)


def tree_matmat(a: torch.Tensor, calls: list[int] | None = None):
    def matmat(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if calls is not None:
            calls.append(t["b"].shape[0])
        return to_tree(from_tree(t) @ a)  # a symmetric: rows of V A are (A v_j)^T

    return matmat


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


# ---------------------------------------------------------------------------------------------
# BlockCG against dense solves
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [1, 3, 8])
@pytest.mark.parametrize("warm", [False, True])
def test_block_cg_matches_dense_solve_on_trees(s: int, warm: bool) -> None:
    n = 40
    a = spd(n, torch.logspace(0, 2, n, dtype=F64), seed=s)
    b = rhs(s, n, seed=10 + s)
    exact = torch.linalg.solve(a, b.T).T
    calls: list[int] = []
    x0 = to_tree(exact + 1e-3 * rhs(s, n, seed=99)) if warm else None
    sol = BlockCG(max_steps=200, rtol=1e-10).solve_block(tree_matmat(a, calls), to_tree(b), x0)
    assert sol.status is Status.SUCCESS and sol.converged
    x = from_tree(sol.x)
    assert sol.x["a"].shape == (s, 3, 2) and sol.x["b"].shape == (s, n - 6)
    for j in range(s):  # every column to its own tolerance, against the dense solve
        assert float(torch.linalg.vector_norm(b[j] - a @ x[j])) <= 1e-10 * float(b[j].norm()) * 1.01
        assert rel(x[j], exact[j]) <= 1e-7
    true_res = torch.linalg.vector_norm(b - x @ a, dim=1)
    torch.testing.assert_close(torch.tensor(sol.stats["residual_norms"], dtype=F64), true_res, rtol=1e-3, atol=1e-13)
    assert sol.residual_norm == pytest.approx(math.sqrt(sum(r * r for r in sol.stats["residual_norms"])))
    assert sol.b_norm == pytest.approx(float(b.norm()))
    # HVP count: every column product, the initial residual of X0 included
    assert sol.num_matvecs == sum(calls) == sum(sol.stats["block_sizes"]) + (s if warm else 0)
    assert len(sol.stats["block_sizes"]) == sol.num_steps and max(sol.stats["block_sizes"]) <= s


def test_single_vector_protocol_is_a_block_of_one_and_equals_cg() -> None:
    n = 25
    a = spd(n, torch.logspace(0, 2, n, dtype=F64), seed=1)
    b = rhs(1, n, seed=2)[0]
    sol = BlockCG(max_steps=100, rtol=1e-11)(lambda v: a @ v, b)
    ref = CG(max_steps=100, rtol=1e-11)(lambda v: a @ v, b)
    assert sol.converged and sol.x.shape == b.shape
    assert abs(sol.num_steps - ref.num_steps) <= 2  # the same method; rounding differs after many steps
    for k in (1, 4, 8):  # s = 1: the same Krylov iterates as CG (exact arithmetic), here to rounding
        blk, cg = BlockCG(max_steps=k)(lambda v: a @ v, b), CG(max_steps=k)(lambda v: a @ v, b)
        assert blk.num_matvecs == cg.num_matvecs == k
        assert rel(blk.x, cg.x) <= 1e-10
    assert rel(sol.x, torch.linalg.solve(a, b)) <= 1e-9
    block = BlockCG(max_steps=100, rtol=1e-11).solve_block(lambda v: v @ a, b[None])
    torch.testing.assert_close(block.x[0], sol.x, rtol=1e-10, atol=1e-13)


def test_outliers_take_fewer_products_than_separate_cg_solves() -> None:
    """A tight bulk in [1, 2] and 12 outliers up to 1e4: separate CG solves each find the
    outliers again; the block finds them once for all 8 columns."""
    n, s = 300, 8
    eig = torch.cat([torch.linspace(1.0, 2.0, n - 12, dtype=F64), torch.logspace(2, 4, 12, dtype=F64)])
    a = spd(n, eig, seed=3)
    b = rhs(s, n, seed=4)
    exact = torch.linalg.solve(a, b.T).T
    sol = BlockCG(max_steps=300, rtol=1e-8).solve_block(lambda v: v @ a, b)
    separate = [CG(max_steps=300, rtol=1e-8)(lambda v: a @ v, b[j]) for j in range(s)]
    assert sol.converged and all(c.converged for c in separate)
    assert max(rel(sol.x[j], exact[j]) for j in range(s)) <= 1e-6
    cg_total = sum(c.num_matvecs for c in separate)
    assert sol.num_matvecs < 0.75 * cg_total, (sol.num_matvecs, cg_total)


def test_dependent_duplicate_and_zero_columns() -> None:
    n = 30
    a = spd(n, torch.logspace(0, 2, n, dtype=F64), seed=5)
    base = rhs(3, n, seed=6)
    b = torch.stack([base[0], base[0], base[1], 2.0 * base[0] - 3.0 * base[1], torch.zeros(n, dtype=F64), base[2]])
    exact = torch.linalg.solve(a, b.T).T
    sol = BlockCG(max_steps=100, rtol=1e-10).solve_block(tree_matmat(a), to_tree(b))
    assert sol.status is Status.SUCCESS
    x = from_tree(sol.x)
    assert bool(torch.isfinite(x).all())
    assert torch.equal(x[4], torch.zeros(n, dtype=F64))  # the zero column: solved exactly, no direction
    for j in (0, 1, 2, 3, 5):
        assert rel(x[j], exact[j]) <= 1e-7
    # three independent columns: never more than 3 directions per step (not 6)
    assert max(sol.stats["block_sizes"]) == 3
    assert sol.stats["residual_norms"][4] == 0.0 and sol.stats["b_norms"][4] == 0.0


def test_zero_block_converges_at_once_and_columns_of_very_different_scales() -> None:
    n = 20
    a = spd(n, torch.logspace(0, 1, n, dtype=F64), seed=7)
    zero = BlockCG(max_steps=5, rtol=1e-8).solve_block(lambda v: v @ a, torch.zeros(3, n, dtype=F64))
    assert zero.status is Status.SUCCESS and zero.num_matvecs == 0 and zero.num_steps == 0
    b = rhs(2, n, seed=8) * torch.tensor([[1e-9], [1e6]], dtype=F64)  # a tiny column is not "dependent"
    sol = BlockCG(max_steps=100, rtol=1e-10).solve_block(lambda v: v @ a, b)
    exact = torch.linalg.solve(a, b.T).T
    assert sol.converged and rel(sol.x[0], exact[0]) <= 1e-8 and rel(sol.x[1], exact[1]) <= 1e-8


# ---------------------------------------------------------------------------------------------
# Failure statuses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rtol", [1e-10, 0.0])
def test_nan_gives_nonfinite(rtol: float) -> None:
    n = 10
    a = spd(n, torch.linspace(1, 2, n, dtype=F64), seed=9)
    poison = torch.ones(n, dtype=F64)
    poison[3] = float("nan")
    sol = BlockCG(max_steps=20, rtol=rtol).solve_block(lambda v: (v @ a) * poison, rhs(3, n, seed=10))
    assert sol.status is Status.NONFINITE and sol.failed
    with pytest.raises(SolverError, match=r"nonfinite.*Check that the losses"):
        sol.raise_if_failed(BlockCG())
    b = rhs(2, n, seed=11)
    b[1, 0] = float("inf")
    assert BlockCG(max_steps=5, rtol=1e-8).solve_block(lambda v: v @ a, b).status is Status.NONFINITE


@pytest.mark.parametrize("rtol", [1e-10, 0.0])
def test_indefinite_gives_negative_curvature(rtol: float) -> None:
    a = torch.diag(torch.tensor([2.0, -1.0, 3.0, 4.0], dtype=F64))
    b = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]], dtype=F64)  # spans e_2: curvature -1
    sol = BlockCG(max_steps=10, rtol=rtol).solve_block(lambda v: v @ a, b)
    assert sol.status is Status.NEGATIVE_CURVATURE and sol.failed
    assert sol.stats["min_curvature"] < 0 and bool(torch.isfinite(sol.x).all())
    assert sol.num_steps == 1 and torch.equal(sol.x, torch.zeros_like(b))  # refused before stepping
    with pytest.raises(SolverError, match=r"negative_curvature.*Add damping"):
        sol.raise_if_failed(BlockCG())
    single = BlockCG(max_steps=10, rtol=rtol)(lambda v: a @ v, b[0])
    assert single.status is Status.NEGATIVE_CURVATURE


def test_max_steps_fixed_budget_and_budget_rtol_per_column() -> None:
    n, s = 40, 4
    a = spd(n, torch.logspace(0, 3, n, dtype=F64), seed=12)
    b = rhs(s, n, seed=13)
    short = BlockCG(max_steps=2, rtol=1e-12).solve_block(lambda v: v @ a, b)
    assert short.status is Status.MAX_STEPS_REACHED and short.num_steps == 2 and short.num_matvecs == 2 * s
    with pytest.raises(SolverError, match=r"'max_steps_reached' after 2 steps.*Try increasing `max_steps`"):
        short.raise_if_failed(BlockCG())
    a = spd(n, torch.logspace(0, 1, n, dtype=F64), seed=14)  # condition 10: a fixed budget gets somewhere
    budget = BlockCG(max_steps=3).solve_block(lambda v: v @ a, b)
    assert budget.status is Status.FIXED_BUDGET and budget.num_steps == 3 and budget.num_matvecs == 3 * s
    true_rel = [float((b[j] - a @ budget.x[j]).norm() / b[j].norm()) for j in range(s)]
    assert 1e-6 < max(true_rel) < 0.4  # budget_rtol must be < 1
    loose = BlockCG(max_steps=3, budget_rtol=2 * max(true_rel)).solve_block(lambda v: v @ a, b)
    tight = BlockCG(max_steps=3, budget_rtol=0.5 * max(true_rel)).solve_block(lambda v: v @ a, b)
    assert loose.status is Status.SUCCESS and tight.status is Status.MAX_STEPS_REACHED
    assert tight.stats["budget_rtol"] == 0.5 * max(true_rel)


# ---------------------------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "regex"),
    [
        ({"max_steps": 0}, r"BlockCG: `max_steps` must be an integer >= 1, got 0"),
        ({"max_steps": 2.5}, r"`max_steps` must be an integer >= 1, got 2.5 \(a float\? pass an int\)"),
        ({"rtol": -1.0}, r"BlockCG: `rtol` must be a finite number >= 0, got -1.0"),
        ({"rtol": 1.0}, r"BlockCG: `rtol` must be in \[0, 1\), got 1.0: .*met by x = 0 without a single product"),
        ({"atol": float("nan")}, r"BlockCG: `atol` must be a finite number >= 0, got nan"),
    ],
)
def test_construction_errors_name_the_argument(kwargs: dict, regex: str) -> None:
    with pytest.raises(ValueError, match=regex):
        BlockCG(**kwargs)


class _Asymmetric(hypergrad.LinearOperator):
    symmetric = False

    def matvec(self, v):
        return v


def test_solve_block_errors_name_the_argument() -> None:
    a = torch.eye(3, dtype=F64)
    solver = BlockCG(max_steps=3)
    with pytest.raises(ValueError, match=r"`B\['w'\]` is 0-dim; every leaf needs a leading block dimension"):
        solver.solve_block(lambda v: v, {"w": torch.tensor(1.0, dtype=F64)})
    with pytest.raises(ValueError, match=r"different leading \(block\) dimensions \[2, 3\]"):
        solver.solve_block(lambda v: v, {"u": torch.ones(2, 4, dtype=F64), "w": torch.ones(3, 4, dtype=F64)})
    with pytest.raises(ValueError, match=r"no columns \(block dimension 0\)"):
        solver.solve_block(lambda v: v, torch.ones(0, 3, dtype=F64))
    with pytest.raises(TypeError, match=r"`matmat` must be a callable V -> A V on blocks.*got int"):
        solver.solve_block(3, torch.ones(2, 3, dtype=F64))
    with pytest.raises(TypeError, match=r"BlockCG.solve_block: `B` has dtype torch\.int64"):
        solver.solve_block(lambda v: v, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"`X0` has shape \(1, 3\) but `B` has shape \(2, 3\)"):
        solver.solve_block(lambda v: v @ a, torch.ones(2, 3, dtype=F64), torch.zeros(1, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"`matmat\(V\)` has shape \(3,\) but `V` has shape \(2, 3\).*V @ M\.T"):
        solver.solve_block(lambda v: a @ v[0], torch.eye(3, dtype=F64)[:2])
    with pytest.raises(ValueError, match=r"BlockCG assumes a symmetric operator.*_Asymmetric"):
        solver.solve_block(_Asymmetric(), torch.ones(2, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"BlockCG assumes a symmetric operator"):
        solver(_Asymmetric(), torch.ones(3, dtype=F64))


# ---------------------------------------------------------------------------------------------
# matmat: batched == looped
# ---------------------------------------------------------------------------------------------


def _mlp_case():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(11, 5, dtype=F64), torch.randint(0, 3, (11,))
    f = hypergrad.stateless(net)
    return (lambda p: F.cross_entropy(f(p, x), y)), hypergrad.module_params(net)


def _bn_conv_case():
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)
    ).double()
    net.train()  # batch statistics: the Hessian couples the examples
    x, y = torch.randn(6, 2, 6, 6, dtype=F64), torch.randint(0, 4, (6,))
    f = hypergrad.stateless(net)
    return (lambda p: F.cross_entropy(f(p, x), y)), hypergrad.module_params(net)


def _block(params: dict, s: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, *t.shape, generator=gen, dtype=F64) for k, t in params.items()}


def _looped(op, V: dict) -> dict:
    s = next(iter(V.values())).shape[0]
    cols = [op({k: t[j] for k, t in V.items()}) for j in range(s)]
    return {k: torch.stack([c[k] for c in cols]) for k in V}


def _assert_block_close(a: dict, b: dict) -> None:
    for k in b:  # float64 rounding: the batched and looped products sum the same terms
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("case", [_mlp_case, _bn_conv_case], ids=["mlp", "bn_conv"])
@pytest.mark.parametrize("mode", ["rev_rev_cached", "rev_rev", "fwd_rev", "auto"])
def test_matmat_batched_equals_looped(case, mode: str) -> None:
    fn, params = case()
    V = _block(params, 4, seed=2)
    H = HessianOperator(fn, params, mode=mode)
    out = H.matmat(V)
    assert H.matmat_batched is True
    _assert_block_close(out, _looped(H, V))
    assert all(out[k].shape == V[k].shape and not out[k].requires_grad for k in V)
    # against the dense Hessian by double backward
    Hd, keys = dense_hessian(fn, params)
    flat = torch.cat([V[k].reshape(4, -1) for k in keys], dim=1)
    got = torch.cat([out[k].reshape(4, -1) for k in keys], dim=1)
    torch.testing.assert_close(got, flat @ Hd, rtol=1e-10, atol=1e-12)
    damped = Damped(H, 0.7, scale=0.5)
    _assert_block_close(damped.matmat(V), _looped(damped, V))
    mapped = hypergrad.operators.Mapped(damped, lambda t: {k: 2.0 * v for k, v in t.items()})
    _assert_block_close(mapped.matmat(V), _looped(mapped, V))


class _Cube(torch.autograd.Function):
    """x^3 whose second derivative runs Python control flow on the tensor: vmap (and so a batched
    double backward) refuses it, the one-at-a-time double backward does not."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _CubeGrad.apply(x, g)


class _CubeGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g):
        ctx.save_for_backward(x, g)
        return 3 * x**2 * g

    @staticmethod
    def backward(ctx, gg):
        x, g = ctx.saved_tensors
        if bool((gg != 0).any()):  # data-dependent control flow: refused under vmap
            return 6 * x * g * gg, 3 * x**2 * gg
        return torch.zeros_like(x), torch.zeros_like(g)


def test_matmat_falls_back_to_the_loop_with_the_same_result(caplog: pytest.LogCaptureFixture) -> None:
    params = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=F64)}
    fn = lambda p: _Cube.apply(p["w"]).sum() + (p["w"] ** 2).sum()
    H = HessianOperator(fn, params, mode="rev_rev_cached")
    V = {"w": torch.randn(3, 3, dtype=F64)}
    with caplog.at_level("INFO", logger="hypergrad"):
        out = H.matmat(V)
    assert H.matmat_batched is False and "one product per column" in caplog.text
    expected = V["w"] * (6 * params["w"] + 2)  # the diagonal Hessian 6 w + 2
    torch.testing.assert_close(out["w"], expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(H.matmat(V)["w"], expected, rtol=1e-14, atol=1e-14)  # stays looped


def test_matmat_errors_name_the_argument() -> None:
    fn, params = _mlp_case()
    H = HessianOperator(fn, params, mode="rev_rev_cached")
    with pytest.raises(ValueError, match=r"same leading block dimension"):
        H.matmat({k: torch.zeros(2 if i else 3, *t.shape, dtype=F64) for i, (k, t) in enumerate(params.items())})
    with pytest.raises(ValueError, match=r"`V\[0\]\['0.weight'\]` has shape \(5,\) but `params\['0.weight'\]`"):
        H.matmat({k: torch.zeros(2, *t.shape[1:], dtype=F64) for k, t in params.items()})
    with pytest.raises(TypeError, match=r"`V` must be a dict of tensors keyed like `params`, got a single Tensor"):
        H.matmat(torch.zeros(2, 3))


def test_block_cg_counts_every_column_product_of_an_operator() -> None:
    fn, params = _mlp_case()
    H = Damped(HessianOperator(fn, params, mode="rev_rev_cached"), 1.0)
    calls: list[int] = []

    def counting(V):
        calls.append(next(iter(V.values())).shape[0])
        return H.matmat(V)

    sol = BlockCG(max_steps=50, rtol=1e-9).solve_block(counting, _block(params, 5, seed=3))
    assert sol.converged and sol.num_matvecs == sum(calls) == sum(sol.stats["block_sizes"])


# ---------------------------------------------------------------------------------------------
# inverse_hvp against a dense Hessian by double backward
# ---------------------------------------------------------------------------------------------


def dense_hessian(fn, params: dict) -> tuple[torch.Tensor, list[str]]:
    h = double_backward_hessian(fn, params)
    return 0.5 * (h + h.T), list(params)


@pytest.mark.parametrize(
    "solver",
    [BlockCG(max_steps=200, rtol=1e-11), CG(max_steps=400, rtol=1e-11)],
    ids=["BlockCG", "CG"],
)
@pytest.mark.parametrize("case", [_mlp_case, _bn_conv_case], ids=["mlp", "bn_conv"])
def test_inverse_hvp_matches_dense_hessian(solver, case) -> None:
    fn, params = case()
    V = _block(params, 5, seed=4)
    Hd, keys = dense_hessian(fn, params)
    damping = max(0.5, 0.5 - float(torch.linalg.eigvalsh(Hd)[0]))  # the BN net's Hessian is indefinite
    A = Hd + damping * torch.eye(Hd.shape[0], dtype=F64)
    assert float(torch.linalg.eigvalsh(A)[0]) > 0  # SPD at this damping: CG-type solvers apply
    flat = torch.cat([V[k].reshape(5, -1) for k in keys], dim=1)
    exact = torch.linalg.solve(A, flat.T).T
    res = hypergrad.inverse_hvp(fn, params, V, damping=damping, solver=solver, on_failure="raise")
    got = torch.cat([res.x[k].reshape(5, -1) for k in keys], dim=1)
    assert res.solution.converged and all(res.x[k].shape == V[k].shape for k in keys)
    for j in range(5):
        assert rel(got[j], exact[j]) <= 1e-8
    assert len(res.solution.stats["residual_norms"]) == 5
    if isinstance(solver, CG):
        assert len(res.solution.stats["solutions"]) == 5
        assert res.solution.num_matvecs == sum(s.num_matvecs for s in res.solution.stats["solutions"])


def test_inverse_hvp_failure_policy_and_errors() -> None:
    A = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=F64))  # indefinite Hessian
    fn = lambda p: 0.5 * p["w"] @ A @ p["w"]
    params = {"w": torch.zeros(3, dtype=F64)}
    V = {"w": torch.ones(2, 3, dtype=F64)}
    for solver in (BlockCG(max_steps=10, rtol=1e-10), CG(max_steps=10, rtol=1e-10)):
        with pytest.raises(SolverError, match=r"failed with status 'negative_curvature'"):
            hypergrad.inverse_hvp(fn, params, V, solver=solver, on_failure="raise")
        with pytest.warns(hypergrad.SolveFailedWarning, match=r"negative_curvature"):
            res = hypergrad.inverse_hvp(fn, params, V, solver=solver)
        assert res.solution.status is Status.NEGATIVE_CURVATURE
        ok = hypergrad.inverse_hvp(fn, params, V, solver=solver, damping=1.5, on_failure="raise")
        expected = V["w"] / torch.tensor([3.5, 0.5, 4.5], dtype=F64)
        torch.testing.assert_close(ok.x["w"], expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"inverse_hvp: `damping` must be a finite number >= 0, got -1.0"):
        hypergrad.inverse_hvp(fn, params, V, damping=-1.0)
    with pytest.raises(ValueError, match=re.escape("`V[0]['w']` has shape (2,) but `params['w']` has shape (3,)")):
        hypergrad.inverse_hvp(fn, params, {"w": torch.ones(2, 2, dtype=F64)})
    with pytest.raises(TypeError, match=r"inverse_hvp: `solver` must be a solver instance, got the class BlockCG"):
        hypergrad.inverse_hvp(fn, params, V, solver=BlockCG)
    with pytest.raises(ValueError, match=r"`on_failure` must be one of"):
        hypergrad.inverse_hvp(fn, params, V, on_failure="ignore")


def test_inverse_hvp_chunk_size_gives_the_same_solution_in_smaller_batches(monkeypatch) -> None:
    fn, params = _bn_conv_case()
    V = _block(params, 5, seed=7)
    solver = BlockCG(max_steps=200, rtol=1e-11)
    Hd, _ = dense_hessian(fn, params)
    damping = max(0.5, 0.5 - float(torch.linalg.eigvalsh(Hd)[0]))  # the BN net's Hessian is indefinite
    whole = hypergrad.inverse_hvp(
        fn, params, V, damping=damping, solver=solver, on_failure="raise", hvp_mode="rev_rev_cached"
    )
    widths: list[int] = []
    matmat = hypergrad.HessianOperator.matmat

    def spy(self, block):
        widths.append(next(iter(block.values())).shape[0])
        return matmat(self, block)

    monkeypatch.setattr(hypergrad.HessianOperator, "matmat", spy)
    chunked = hypergrad.inverse_hvp(
        fn, params, V, damping=damping, solver=solver, on_failure="raise", hvp_mode="rev_rev_cached", chunk_size=2
    )
    assert widths and max(widths) <= 2
    assert sum(widths) == chunked.solution.num_matvecs == whole.solution.num_matvecs
    for k in params:
        torch.testing.assert_close(chunked.x[k], whole.x[k], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"inverse_hvp: `chunk_size` must be an integer >= 1, got 0"):
        hypergrad.inverse_hvp(fn, params, V, chunk_size=0)


def test_solve_block_refuses_a_matmat_whose_output_is_not_shaped_like_its_input() -> None:
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    B = torch.ones(2, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"BlockCG: .*matmat\(V\).*shape.*V @ M\.T"):
        BlockCG(max_steps=3).solve_block(lambda V: A @ V.T, B)  # (3, 2): the matrix applied the wrong way round
    with pytest.raises(TypeError, match=r"BlockCG: `matmat` must return a Tensor like `V`, got list"):
        BlockCG(max_steps=3).solve_block(lambda V: [V], B)
