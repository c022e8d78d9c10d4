"""Operator reuse in the methods is keyed by the caller's explicit token only (no id/_version keys)."""

from __future__ import annotations

import torch

import hypergrad
from hypergrad.methods import MethodState

F64 = torch.float64


def _problem() -> tuple:
    X = torch.randn(12, 3, dtype=F64)
    y = torch.randn(12, dtype=F64)
    G = lambda p, h: 0.5 * ((X @ p["w"] - y) ** 2).sum() + 0.5 * h["lam"].exp() * (p["w"] ** 2).sum()
    F = lambda p, h: 0.5 * (p["w"] ** 2).sum()
    return X, G, F, {"w": torch.randn(3, dtype=F64)}, {"lam": torch.tensor(0.3, dtype=F64)}


def _ident(t: dict) -> dict:
    return t


def test_reuse_follows_the_token_only() -> None:
    X, G, F, p, h = _problem()
    method = hypergrad.Implicit(solver=hypergrad.CG(max_steps=20, rtol=1e-13), reuse_operator=True)
    state = MethodState()
    first = method.hypergradient(G, F, p, h, state, _ident, "t1")
    again = method.hypergradient(G, F, p, h, state, _ident, "t1")
    assert not first.operator_reused and again.operator_reused and state.operator_token == "t1"
    torch.testing.assert_close(again.grad["lam"], first.grad["lam"], rtol=1e-12, atol=0)

    X.mul_(2.0)  # the caller mutates the data in place and announces it with a new token
    fresh = method.hypergradient(G, F, p, h, state, _ident, "t2")
    reference = hypergrad.Implicit(solver=hypergrad.CG(max_steps=20, rtol=1e-13)).hypergradient(
        G, F, p, h, MethodState(), _ident, None
    )
    assert not fresh.operator_reused
    torch.testing.assert_close(fresh.grad["lam"], reference.grad["lam"], rtol=1e-12, atol=0)
    assert not torch.allclose(fresh.grad["lam"], first.grad["lam"])  # the stale operator would be wrong


def test_none_token_never_reuses_nor_stores() -> None:
    _, G, F, p, h = _problem()
    method = hypergrad.Proximal(lam=1.0, coupling={"": ""}, reuse_operator=True)
    state = MethodState()
    hp = {"w": torch.zeros(3, dtype=F64)}
    for _ in range(2):
        out = method.hypergradient(lambda q, k: G(q, h), F, p, hp, state, _ident, None)
        assert not out.operator_reused and state.operator is None


def test_no_identity_or_version_keys_in_the_methods() -> None:
    from pathlib import Path

    root = Path(hypergrad.__file__).parent
    for path in [*(root / "methods").glob("*.py"), root / "_assembly.py", root / "custom_root.py"]:
        text = path.read_text()
        assert "_version" not in text and "id(" not in text, path
