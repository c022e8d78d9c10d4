"""The lead's decisions on the audits' open points (items 1-5; item 6 is in tests/umm/test_app.py).

1. a relative tolerance must be in [0, 1): ``rtol >= 1`` is met by x = 0 without a product;
2. a hyper-parameter that reaches neither function is refused by every functional API, as
   :func:`hypergrad.implicit_grad` already did;
3. ``Proximal(coupling=<not a dict>)`` is a ``TypeError``;
4. ``lam`` whose reciprocal overflows is refused up front, naming ``lam``;
5. ``map_location`` naming a missing non-CUDA device is an argument error, not a damaged file.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable

import pytest
import torch

import hypergrad
from hypergrad import CheckpointError

F64 = torch.float64

RTOL_SOLVERS: list[tuple[str, Callable[[float], Any]]] = [
    ("CG", lambda r: hypergrad.CG(rtol=r)),
    ("PCG", lambda r: hypergrad.PCG(preconditioner=hypergrad.Nystrom(rank=2, sketch="random"), rtol=r)),
    ("MINRES", lambda r: hypergrad.MINRES(rtol=r)),
    ("Neumann", lambda r: hypergrad.Neumann(rtol=r)),
    ("FixedPoint", lambda r: hypergrad.FixedPoint(rtol=r)),
    ("RecycledLanczos", lambda r: hypergrad.RecycledLanczos(rtol=r)),
]
BUDGET_SOLVERS: list[tuple[str, Callable[[float], Any]]] = [
    ("CG", lambda r: hypergrad.CG(budget_rtol=r)),
    ("Identity", lambda r: hypergrad.Identity(budget_rtol=r)),
    ("Dense", lambda r: hypergrad.Dense(budget_rtol=r)),
    ("Neumann", lambda r: hypergrad.Neumann(budget_rtol=r)),
    ("CompiledCG", lambda r: hypergrad.CompiledCG(backend="eager", budget_rtol=r)),
]


@pytest.mark.parametrize("value", [1.0, 1, 2.5, 1e6])
@pytest.mark.parametrize(("name", "make"), RTOL_SOLVERS, ids=[n for n, _ in RTOL_SOLVERS])
def test_rtol_of_one_or_more_is_refused(name: str, make: Callable[[float], Any], value: float) -> None:
    with pytest.raises(ValueError, match=rf"^{name}: `rtol` must be in \[0, 1\), got {re.escape(repr(value))}: .*"
                       r"met by x = 0 without a single product.*rtol=1e-4"):  # fmt: skip
        make(value)
    assert make(0.99).rtol == 0.99 and make(0.0).rtol == 0.0  # the range's ends that stay valid


@pytest.mark.parametrize(("name", "make"), BUDGET_SOLVERS, ids=[n for n, _ in BUDGET_SOLVERS])
def test_budget_rtol_of_one_or_more_is_refused(name: str, make: Callable[[float], Any]) -> None:
    with pytest.raises(ValueError, match=rf"^{name}: `budget_rtol` must be in \[0, 1\), got 1\.0: .*x = 0"):
        make(1.0)
    assert make(0.5).budget_rtol == 0.5


def test_rtol_just_below_one_still_rejects_a_zero_solution() -> None:
    """Below 1, x = 0 (residual ratio exactly 1) is never a success: the first step must do work."""
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    sol = hypergrad.CG(max_steps=3, rtol=0.99)(lambda v: a @ v, torch.ones(3, dtype=F64))
    assert sol.num_matvecs >= 1 and bool(sol.x.abs().sum() > 0)


def _step(p: dict, h: dict) -> dict:
    return {"w": p["w"] - 0.5 * (p["w"] - h["lam"])}


def _outer(p: dict, h: dict) -> torch.Tensor:
    return 0.5 * ((p["w"] - 1.0) ** 2).sum()


def _trees(extra: bool) -> tuple[dict, dict]:
    params = {"w": torch.zeros(2, dtype=F64)}
    hparams = {"lam": torch.full((2,), 3.0, dtype=F64)}
    if extra:
        hparams["extra"] = torch.ones(3, dtype=F64)
    return params, hparams


def test_unrolled_grad_refuses_an_unused_hparam_like_implicit_grad() -> None:
    params, hparams = _trees(extra=True)
    with pytest.raises(ValueError, match=r"hparams \['extra'\] affect neither `inner_step` nor `outer_loss`"):
        hypergrad.unrolled_grad(_step, _outer, params, hparams, num_steps=3)
    inner = lambda p, h: 0.5 * ((p["w"] - h["lam"]) ** 2).sum()
    with pytest.raises(ValueError, match=r"hparams \['extra'\] affect neither `inner_loss` nor `outer_loss`"):
        hypergrad.implicit_grad(inner, _outer, params, hparams, solver=hypergrad.Dense())


def test_fixed_point_grad_refuses_an_unused_hparam() -> None:
    params, hparams = _trees(extra=True)
    params = {"w": hparams["lam"].clone()}  # the fixed point
    with pytest.raises(ValueError, match=r"hparams \['extra'\] affect neither `phi` nor `outer_loss`"):
        hypergrad.fixed_point_grad(_step, _outer, params, hparams, solver=hypergrad.Dense())


def test_a_used_hparam_with_a_zero_hypergradient_is_not_refused() -> None:
    """lam = 2 makes w_1 = 1, the outer minimum: the hypergradient is 0 but lam is used."""
    params = {"w": torch.zeros(2, dtype=F64)}
    hparams = {"lam": torch.full((2,), 2.0, dtype=F64), "b": torch.ones(2, dtype=F64)}
    outer = lambda p, h: _outer(p, h) + (h["b"] ** 2).sum()  # "b" reaches only the outer loss
    g, _ = hypergrad.unrolled_grad(_step, outer, params, hparams, num_steps=1)
    assert torch.equal(g["lam"], torch.zeros(2, dtype=F64)) and torch.allclose(g["b"], 2 * hparams["b"])
    fp, _ = hypergrad.fixed_point_grad(_step, outer, {"w": hparams["lam"].clone()}, hparams, solver=hypergrad.Dense())
    # at w* = lam: F = 1/2 |lam - 1|^2 + |b|^2 -> dF/dlam = lam - 1, dF/db = 2 b
    assert torch.allclose(fp["lam"], hparams["lam"] - 1) and torch.allclose(fp["b"], 2 * hparams["b"])


@pytest.mark.parametrize("coupling", [[("backbone", "backbone")], "backbone", ("backbone",)])
def test_proximal_coupling_of_another_type_is_a_type_error(coupling: Any) -> None:
    with pytest.raises(TypeError, match=rf"`coupling` must be a dict .*got {type(coupling).__name__} .*backbone"):
        hypergrad.Proximal(coupling=coupling)
    with pytest.raises(ValueError, match="`coupling` must be a non-empty dict"):
        hypergrad.Proximal(coupling={})


@pytest.mark.parametrize("lam", [1e-320, 5e-324])
def test_proximal_lam_whose_inverse_overflows_is_refused_naming_lam(lam: float) -> None:
    inner = lambda p: 0.5 * (p["w"] ** 2).sum()
    w = {"w": torch.zeros(2, dtype=F64)}
    with pytest.raises(ValueError, match=rf"^`lam` must be a finite number > 0 and not so small that 1/lam overflows.*got "
                       rf"{re.escape(repr(lam))}") as info:  # fmt: skip
        hypergrad.proximal_grad(inner, w, {"w": torch.ones(2, dtype=F64)}, lam=lam, solver=hypergrad.Dense())
    assert "scale" not in str(info.value) and "Damped" not in str(info.value)
    with pytest.raises(
        ValueError, match=r"^Proximal: `lam` must be a finite number > 0 and not so small that 1/lam overflows"
    ):
        hypergrad.Proximal(lam=lam, coupling={"": ""})


def test_proximal_lam_small_but_invertible_still_solves() -> None:
    """lam = 1e-300: 1/lam = 1e300 is finite; with H = 3 I the result is lam / (3 + lam) * g."""
    inner = lambda p: 1.5 * (p["w"] ** 2).sum()
    g, _ = hypergrad.proximal_grad(
        inner, {"w": torch.zeros(2, dtype=F64)}, {"w": torch.ones(2, dtype=F64)}, lam=1e-300, solver=hypergrad.Dense()
    )
    expected = torch.full((2,), 1e-300 / (3.0 + 1e-300), dtype=F64)
    assert torch.allclose(g["w"], expected, rtol=1e-12, atol=0.0)
    assert hypergrad.Proximal(lam=1e-300, coupling={"": ""}).lam == 1e-300


@pytest.fixture
def saved(tmp_path) -> str:
    path = str(tmp_path / "ck.pt")
    hypergrad.save_checkpoint({"w": torch.arange(4.0)}, path)
    return path


@pytest.mark.parametrize("map_location", ["mps", "xpu", "xpu:1", torch.device("mps"), "mtia", "hpu"])
def test_missing_non_cuda_device_is_an_argument_error(saved: str, map_location: Any) -> None:
    kind = torch.device(map_location).type
    backend = getattr(torch, kind, None)
    if backend is not None and getattr(backend, "is_available", lambda: False)():
        pytest.skip(f"this machine has {kind}")
    before = hashlib.sha256(open(saved, "rb").read()).hexdigest()
    with pytest.raises(ValueError, match=rf"`map_location` '{kind}(:1)?' names a .* device this process does not "
                       r"have.*map_location='cpu'.*file itself was not read") as info:  # fmt: skip
        hypergrad.load_checkpoint(saved, map_location=map_location)
    assert not isinstance(info.value, CheckpointError) and "damaged" not in str(info.value)
    assert hashlib.sha256(open(saved, "rb").read()).hexdigest() == before
    assert torch.equal(hypergrad.load_checkpoint(saved)["w"], torch.arange(4.0))  # and it still loads
