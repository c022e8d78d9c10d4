"""Property layer over the public API: random bad (and good) inputs get a clear error or a correct result.

Every property has the same shape: draw an input, possibly damaged in one way (another dtype, shape,
key, device, type, a flipped byte ...), call the public function, and accept exactly two outcomes:

* a ``TypeError``/``ValueError`` (or :class:`hypergrad.CheckpointError`) whose message names an
  argument (a name in backticks, or the checkpoint's path), or
* a result that is correct, checked against a float64 dense reference (``torch.linalg.solve``,
  the closed-form Hessian, the saved tensors) - and only when nothing was damaged.

A damaged input that returns a result is a silent wrong result and fails the test. The example
budget is fixed and derandomised (``max_examples`` per test, ``derandomize=True``), so CI runs the
same examples every time and the whole file stays well under 30 s.

No property is marked ``xfail``: every fault they found is fixed, so each runs as a strict check.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hypergrad
from tests.registry import SOLVERS, ProblemInfo

F64 = torch.float64
NAMED = re.compile(r"`[^`]+`|checkpoint '")
_BASE = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


def fuzz(max_examples: int) -> settings:
    """The fixed, derandomised example budget of one property."""
    return settings(_BASE, max_examples=max_examples)


def assert_clear(err: BaseException) -> None:
    """A clear error: TypeError/ValueError whose message names the argument."""
    assert isinstance(err, (TypeError, ValueError)), f"raw {type(err).__name__}: {err}"
    assert NAMED.search(str(err)), f"message names no argument: {err}"


def outcome(call: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return call(), None
    except Exception as err:
        return None, err


def spd(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    eig = torch.linspace(0.3, 1.4, n, dtype=F64)  # inside (0, 2): every registered solver converges
    return (q * eig) @ q.T


# ---------------------------------------------------------------------------------------------
# Linear solvers (AbstractLinearSolver.__call__), every registered solver
# ---------------------------------------------------------------------------------------------

DTYPES = [F64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.complex64]
MATVEC_DAMAGE = ["none", "shape", "drop_key", "extra_key", "dtype", "list", "none_out", "meta", "broadcast"]
X0_DAMAGE = ["absent", "good", "shape", "dtype", "keys", "meta", "type"]


def _layout(sizes: list[int]) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [(s,) if i % 2 == 0 else (1, s) for i, s in enumerate(sizes)]
    return [(f"p{i}", shape) for i, shape in enumerate(shapes)]


def _to_tree(v: torch.Tensor, layout, as_tensor: bool, dtype: torch.dtype) -> Any:
    if as_tensor:
        return v.to(dtype)
    out, i = {}, 0
    for k, shape in layout:
        n = math.prod(shape)
        out[k] = v[i : i + n].reshape(shape).to(dtype)
        i += n
    return out


def _flat(t: Any) -> torch.Tensor:
    return (
        t.reshape(-1).to(F64) if isinstance(t, torch.Tensor) else torch.cat([x.reshape(-1).to(F64) for x in t.values()])
    )


def _damage_tree(t: Any, how: str) -> Any:
    if how == "shape":
        return (
            t[:-1]
            if isinstance(t, torch.Tensor)
            else {k: (v[..., :-1] if i == 0 else v) for i, (k, v) in enumerate(t.items())}
        )
    if how == "drop_key":
        return t[:-1] if isinstance(t, torch.Tensor) else dict(list(t.items())[1:])
    if how == "extra_key":
        return t.reshape(1, -1) if isinstance(t, torch.Tensor) else {**t, "extra": torch.zeros(1, dtype=F64)}
    if how == "dtype":
        other = torch.float32 if _first(t).dtype != torch.float32 else F64
        return _real(t).to(other) if isinstance(t, torch.Tensor) else {k: _real(v).to(other) for k, v in t.items()}
    if how == "list":
        return _flat(t).tolist()
    if how == "none_out":
        return None
    if how == "meta":
        return t.to("meta") if isinstance(t, torch.Tensor) else {k: v.to("meta") for k, v in t.items()}
    if how == "broadcast":
        return t.sum().reshape(1) if isinstance(t, torch.Tensor) else {k: v.sum().reshape(1) for k, v in t.items()}
    if how == "keys":
        return {"zz": _first(t)} if not isinstance(t, torch.Tensor) else {"zz": t}
    if how == "type":
        return tuple(_flat(t).tolist())
    raise AssertionError(how)


def _real(t: torch.Tensor) -> torch.Tensor:
    return t.real if t.is_complex() else t


def _first(t: Any) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else next(iter(t.values()))


def _entry_and_dtype() -> st.SearchStrategy:
    """Every solver with every dtype, except the half-precision Dense case (see test_dense_half_precision)."""
    return st.tuples(st.sampled_from(SOLVERS), st.sampled_from(DTYPES)).filter(
        lambda pair: not (pair[0].name == "Dense" and pair[1] in (torch.float16, torch.bfloat16))
    )


@fuzz(60)
@given(
    entry_dtype=_entry_and_dtype(),
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    as_tensor=st.booleans(),
    matvec_damage=st.sampled_from(MATVEC_DAMAGE),
    x0_damage=st.sampled_from(X0_DAMAGE),
    seed=st.integers(0, 2**16),
)
def test_solver_inputs(entry_dtype, sizes, as_tensor, matvec_damage, x0_damage, seed) -> None:
    entry, dtype = entry_dtype
    layout = _layout(sizes)
    n = sum(math.prod(s) for _, s in layout)
    a = spd(n, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    b64 = torch.randn(n, generator=gen, dtype=F64)
    b = _to_tree(b64, layout, as_tensor, dtype)

    def matvec(v: Any) -> Any:
        out = _to_tree(a @ _flat(v), layout, as_tensor, _first(v).dtype)
        return out if matvec_damage == "none" else _damage_tree(out, matvec_damage)

    x0 = None if x0_damage == "absent" else _to_tree(torch.zeros(n, dtype=F64), layout, as_tensor, dtype)
    if x0_damage not in ("absent", "good"):
        x0 = _damage_tree(x0, x0_damage)
    solver = entry.factory(ProblemInfo(lambda_min=0.3, lambda_max=1.4, size=n, rtol=1e-10))
    sol, err = outcome(lambda: solver(matvec, b, x0))
    bad_b = dtype in (torch.int64, torch.int32, torch.bool, torch.complex64)
    bad_x0 = x0_damage not in ("absent", "good")
    uses_matvec = "approximate" not in entry.tags  # Identity never calls matvec (and claims nothing)
    if err is not None:
        assert_clear(err)
        assert bad_b or bad_x0 or (uses_matvec and matvec_damage != "none"), f"a good input was refused: {err}"
        return
    assert not bad_b and not bad_x0, "a bad b or x0 gave a result"
    if not uses_matvec:
        assert sol.x is b and sol.num_matvecs == 0
        return
    assert matvec_damage == "none", f"a matvec returning {matvec_damage!r} output gave a result"
    assert isinstance(sol, hypergrad.Solution)
    if sol.failed:
        return  # reported, not silent
    x = _flat(sol.x)
    exact = torch.linalg.solve(a, _flat(b))
    tol = {F64: 1e-7, torch.float32: 1e-3}.get(dtype, 5e-2)
    assert float(torch.linalg.vector_norm(x - exact)) <= tol * (1 + float(torch.linalg.vector_norm(exact)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_half_precision(dtype: torch.dtype) -> None:
    """Dense on a float16/bfloat16 system: solved in float32, cast back, accurate to the dtype (float64 reference)."""
    seen: list[torch.dtype] = []

    def matvec(v: torch.Tensor) -> torch.Tensor:
        seen.append(v.dtype)
        return (a @ v.to(F64)).to(dtype)

    a = spd(3, 0)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    sol = hypergrad.Dense()(matvec, b.to(dtype))
    assert sol.status == hypergrad.Status.SUCCESS and sol.x.dtype == dtype
    assert set(seen) == {dtype}, "the matvec must see vectors of its own dtype"
    exact = torch.linalg.solve(a, b)
    # the operator itself is rounded to `dtype` (unit roundoff u), so the error is O(cond(A) u)
    u = torch.finfo(dtype).eps
    bound = 4 * float(torch.linalg.cond(a)) * u * float(torch.linalg.vector_norm(exact))
    assert float(torch.linalg.vector_norm(sol.x.to(F64) - exact)) <= bound
    # the trivial case of the report: 2 x = 1 exactly representable
    x = hypergrad.Dense()(lambda v: 2 * v, torch.ones(2, dtype=dtype)).x
    assert x.dtype == dtype and torch.equal(x, torch.full((2,), 0.5, dtype=dtype))


# ---------------------------------------------------------------------------------------------
# Tree arithmetic
# ---------------------------------------------------------------------------------------------

TREE_DAMAGE = ["none", "shape", "drop_key", "extra_key", "dtype", "type", "broadcast"]


@fuzz(60)
@given(
    op=st.sampled_from(["add", "sub", "axpy", "axpy_t", "vdot"]),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    as_tensor=st.booleans(),
    damage=st.sampled_from(TREE_DAMAGE),
    alpha=st.one_of(st.floats(-3, 3), st.just("2"), st.just(None)),
    seed=st.integers(0, 2**16),
)
def test_tree_inputs(op, sizes, as_tensor, damage, alpha, seed) -> None:
    layout = _layout(sizes)
    n = sum(math.prod(s) for _, s in layout)
    gen = torch.Generator().manual_seed(seed)
    u, w = torch.randn(n, generator=gen, dtype=F64), torch.randn(n, generator=gen, dtype=F64)
    x, y = _to_tree(u, layout, as_tensor, F64), _to_tree(w, layout, as_tensor, F64)
    if damage != "none":
        y = _damage_tree(y, damage)
    scalar: Any = torch.tensor(alpha, dtype=F64) if op == "axpy_t" and isinstance(alpha, float) else alpha
    calls = {
        "add": lambda: hypergrad.tree_add(x, y),
        "sub": lambda: hypergrad.tree_sub(x, y),
        "axpy": lambda: hypergrad.tree_axpy(scalar, x, y),
        "axpy_t": lambda: hypergrad.tree_axpy(scalar, x, y),
        "vdot": lambda: hypergrad.tree_vdot(x, y),
    }
    result, err = outcome(calls[op])
    bad_scalar = op.startswith("axpy") and not isinstance(alpha, float)
    tolerated = damage == "dtype" and op == "vdot"  # vdot promotes dtypes by design
    if err is not None:
        assert_clear(err)
        assert bad_scalar or (damage != "none" and not tolerated), f"good trees were refused: {err}"
        return
    assert not bad_scalar and (damage == "none" or tolerated), f"damage {damage!r} gave a result"
    y64 = _flat(y)
    if op == "vdot":
        torch.testing.assert_close(result.to(F64), u @ y64, rtol=1e-6, atol=1e-6)
        return
    expected = u + y64 if op == "add" else u - y64 if op == "sub" else alpha * u + y64
    assert type(result) is type(x) and (isinstance(result, torch.Tensor) or list(result) == list(x))
    torch.testing.assert_close(_flat(result), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# hvp, implicit_grad, proximal_grad: closed forms of quadratics
# ---------------------------------------------------------------------------------------------


PARAM_DAMAGE = ["none", "shape", "drop_key", "extra_key", "dtype", "type", "int", "meta", "nan"]


def _damage_params(t: dict, how: str) -> Any:
    if how == "int":
        return {k: v.to(torch.int64) for k, v in t.items()}
    if how == "nan":
        return {k: torch.full_like(v, float("nan")) if i == 0 else v for i, (k, v) in enumerate(t.items())}
    if how == "drop_key" and len(t) == 1:
        return {}
    return _damage_tree(t, how)


@fuzz(20)
@given(
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    damage=st.sampled_from(["none", "shape", "drop_key", "extra_key", "dtype", "type", "meta"]),
    seed=st.integers(0, 2**16),
)
def test_hvp_direction(sizes, damage, seed) -> None:
    layout = _layout(sizes)
    n = sum(math.prod(s) for _, s in layout)
    a = spd(n, seed)
    params = _to_tree(torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(seed)), layout, False, F64)
    v = _to_tree(torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(seed + 1)), layout, False, F64)
    direction = v if damage == "none" else _damage_tree(v, damage)
    result, err = outcome(lambda: hypergrad.hvp(lambda p: 0.5 * _flat(p) @ (a @ _flat(p)), params, direction))
    if err is not None:
        assert_clear(err)
        assert damage != "none", f"a good direction was refused: {err}"
        return
    assert damage == "none", f"a direction with damage {damage!r} gave a result"
    torch.testing.assert_close(_flat(result), a @ _flat(v), rtol=1e-10, atol=1e-10)


# Damage a user's loss could not survive (another shape or dtype than its own constants) is the
# loss's error, not hypergrad's; for params/hparams only damage hypergrad itself must catch is drawn.
_DAMAGE_BY_TARGET = {
    "params": ["none", "drop_key", "extra_key", "type", "int", "meta", "nan"],
    "hparams": ["none", "drop_key", "extra_key", "type", "int", "meta", "nan"],
    "x0": ["none", "shape", "drop_key", "extra_key", "dtype", "type", "int", "meta"],
}


@fuzz(20)
@given(
    n=st.integers(1, 4),
    m=st.integers(1, 3),
    target_damage=st.sampled_from([(t, d) for t, ds in _DAMAGE_BY_TARGET.items() for d in ds]),
    solver_name=st.sampled_from(["CG", "Dense"]),
    seed=st.integers(0, 2**16),
)
def test_implicit_grad_inputs(n, m, target_damage, solver_name, seed) -> None:
    """G = 1/2 w^T A w - w^T B lam, F = 1/2 ||w - c||^2: grad_lam = B^T A^{-1} (w - c) at any w."""
    target, damage = target_damage
    gen = torch.Generator().manual_seed(seed)
    a = spd(n, seed)
    bmat = torch.randn(n, m, generator=gen, dtype=F64)
    c = torch.randn(n, generator=gen, dtype=F64)
    params = {"w": torch.randn(n, generator=gen, dtype=F64)}
    hparams = {"lam": torch.randn(m, generator=gen, dtype=F64)}
    x0 = {"w": torch.zeros(n, dtype=F64)}
    inputs = {"params": params, "hparams": hparams, "x0": x0}
    if damage != "none":
        inputs[target] = _damage_params(inputs[target], damage)
    solver = hypergrad.CG(max_steps=4 * n + 10, rtol=1e-13) if solver_name == "CG" else hypergrad.Dense()

    def inner(p, h):
        return 0.5 * p["w"] @ (a @ p["w"]) - p["w"] @ (bmat @ h["lam"])

    def outer(p, h):
        return 0.5 * ((p["w"] - c) ** 2).sum()

    result, err = outcome(
        lambda: hypergrad.implicit_grad(
            inner, outer, inputs["params"], inputs["hparams"], solver=solver, x0=inputs["x0"]
        )
    )
    if err is not None:
        assert_clear(err)
        assert damage != "none", f"good inputs were refused: {err}"
        return
    assert damage == "none", f"{target} with damage {damage!r} gave a result"
    expected = bmat.T @ torch.linalg.solve(a, params["w"] - c)
    torch.testing.assert_close(result.grad["lam"], expected, rtol=1e-8, atol=1e-10)


@fuzz(20)
@given(
    n=st.integers(1, 4),
    damage=st.sampled_from(["none", "shape", "drop_key", "extra_key", "type", "int", "meta"]),
    lam=st.one_of(st.floats(0.1, 10.0), st.sampled_from([0.0, -1.0, float("nan"), float("inf")])),
    seed=st.integers(0, 2**16),
)
def test_proximal_grad_inputs(n, damage, lam, seed) -> None:
    """grad = lam (H + lam I)^{-1} g for L(w) = 1/2 w^T H w."""
    a = spd(n, seed)
    gen = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(n, generator=gen, dtype=F64)}
    g = {"w": torch.randn(n, generator=gen, dtype=F64)}
    outer_grad = g if damage == "none" else _damage_params(g, damage)
    result, err = outcome(
        lambda: hypergrad.proximal_grad(
            lambda p: 0.5 * p["w"] @ (a @ p["w"]), params, outer_grad, lam=lam, solver=hypergrad.Dense()
        )
    )
    bad_lam = not (math.isfinite(lam) and lam > 0)
    if err is not None:
        assert_clear(err)
        assert damage != "none" or bad_lam, f"good inputs were refused: {err}"
        return
    assert damage == "none" and not bad_lam, f"damage {damage!r} / lam {lam!r} gave a result"
    expected = lam * torch.linalg.solve(a + lam * torch.eye(n, dtype=F64), g["w"])
    torch.testing.assert_close(result.grad["w"], expected, rtol=1e-10, atol=1e-12)


@fuzz(15)
@given(
    damage=st.sampled_from(["none", "subset", "misspelt", "extra", "shape", "type"]),
    seed=st.integers(0, 2**16),
)
def test_stateless_params(damage, seed) -> None:
    torch.manual_seed(seed)
    module = torch.nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=F64)
    w, bias = torch.randn(2, 3, dtype=F64), torch.randn(2, dtype=F64)
    params: Any = {
        "none": {"weight": w, "bias": bias},
        "subset": {"weight": w},
        "misspelt": {"weigth": w, "bias": bias},
        "extra": {"weight": w, "bias": bias, "scale": torch.ones(1, dtype=F64)},
        "shape": {"weight": w[:, :2], "bias": bias},
        "type": [w, bias],
    }[damage]
    result, err = outcome(lambda: hypergrad.stateless(module)(params, x))
    if err is not None:
        assert_clear(err)
        assert damage not in ("none", "subset"), f"good params were refused: {err}"
        return
    assert damage in ("none", "subset"), f"params with damage {damage!r} gave a result"
    expected = x @ w.T + (bias if damage == "none" else module.bias.detach())
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Checkpoints: random bytes, and every byte of a real checkpoint flipped in turn
# ---------------------------------------------------------------------------------------------


@fuzz(30)
@given(data=st.binary(min_size=0, max_size=600))
def test_load_random_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.pt"
        path.write_bytes(data)
        result, err = outcome(lambda: hypergrad.load_checkpoint(path))
    assert result is None and err is not None, "random bytes loaded as a checkpoint"
    assert isinstance(err, hypergrad.CheckpointError) and str(path) in str(err), f"{type(err).__name__}: {err}"


_STATE = {"w": torch.linspace(-1.0, 1.0, 24, dtype=F64).reshape(4, 6), "meta": {"step": 12, "name": "fuzz"}}


@pytest.fixture(scope="module")
def saved_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return hypergrad.save_checkpoint(_STATE, os.path.join(d, "c.pt"), kind="fuzz").read_bytes()


@fuzz(60)
@given(position=st.floats(0.0, 1.0, exclude_max=True), bit=st.integers(0, 7))
def test_flipped_bit_is_refused_or_harmless(saved_bytes: bytes, position: float, bit: int) -> None:
    """Any single flipped bit: the load fails clearly, or returns exactly what was saved."""
    data = bytearray(saved_bytes)
    i = int(position * len(data))
    data[i] ^= 1 << bit
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.pt"
        path.write_bytes(bytes(data))
        result, err = outcome(lambda: hypergrad.load_checkpoint(path, expected_kind="fuzz"))
    if err is not None:
        assert isinstance(err, (hypergrad.CheckpointError, TypeError)), f"byte {i}: {type(err).__name__}: {err}"
        assert str(path) in str(err)
        return
    assert set(result) == {"w", "meta"} and result["meta"] == _STATE["meta"], f"byte {i} changed the state"
    assert result["w"].dtype == F64 and torch.equal(result["w"], _STATE["w"]), f"byte {i} changed a tensor silently"
