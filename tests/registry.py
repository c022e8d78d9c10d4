"""What the generic tests run over: the solver registry and the bad-input registry.

Adding a solver to hypergrad is one file in ``hypergrad/solvers/`` and ONE entry in the library's
registry, ``hypergrad/solvers/_registry.py``; :data:`SOLVERS` below is built from it, so the
contract, reference and hypergradient tests then cover it (``tests/test_registry.py`` proves it).

Tags (set in the registry entry):

* ``"symmetric_only"``: assumes a symmetric operator (CG, PCG, MINRES, RecycledLanczos).
* ``"indefinite"``: also solves symmetric indefinite systems (MINRES).
* ``"approximate"``: makes no accuracy claim (Identity): only in the contract tests.
* ``"iterative"``: has ``max_steps`` and a tolerance; warm start and fixed budgets apply (the
  matvec counts exclude ``stats["setup_matvecs"]``, spent on a preconditioner or recycled basis).
* ``"unit_step"``: Richardson with step 1 (FixedPoint); converges only on operators with spectrum
  in ``(0, 2)``, such as ``I - d(phi)/d(theta)^T`` of a contraction. The accuracy tests give it
  such operators (fixed-point form, or a system scaled into ``(0, 2)``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import hypergrad
from hypergrad import CG, Damped, Dense, FixedPoint, Neumann

#: What a factory may know about the SPD (or contraction) system it will solve: the library's own
#: :class:`hypergrad.SystemInfo` (``lambda_min``/``lambda_max``, ``size``, ``rtol``, ``max_steps``).
ProblemInfo = hypergrad.SystemInfo


@dataclass(frozen=True)
class SolverEntry:
    """One solver under test: ``factory(info) -> solver`` plus its tags."""

    name: str
    factory: Callable[[ProblemInfo], hypergrad.AbstractLinearSolver]
    tags: frozenset[str] = field(default_factory=frozenset)

    def __repr__(self) -> str:  # pytest ids
        return self.name


# Every registered solver, from the library's single registry (hypergrad/solvers/_registry.py):
# adding a solver there puts it under every generic test below; nothing to add in this file.
SOLVERS: list[SolverEntry] = [SolverEntry(s.name, s.build, s.tags) for s in hypergrad.registered_solvers()]


def solvers_with(*, include: set[str] = frozenset(), exclude: set[str] = frozenset()) -> list[SolverEntry]:
    """Entries carrying every tag in ``include`` and none in ``exclude``."""
    return [e for e in SOLVERS if include <= e.tags and not (exclude & e.tags)]


# --------------------------------------------------------------------------------------------
# Bad inputs: (id, call that must raise, exception type, regex the message must match)
# --------------------------------------------------------------------------------------------


def _G(p: dict, h: dict) -> torch.Tensor:
    return 0.5 * ((p["w"] - h["lam"]) ** 2).sum()


def _F(p: dict, h: dict) -> torch.Tensor:
    return 0.5 * (p["w"] ** 2).sum()


def _P() -> dict:
    return {"w": torch.ones(3, dtype=torch.float64)}


def _H() -> dict:
    return {"lam": torch.ones(3, dtype=torch.float64)}


def _implicit(**overrides: Any) -> Callable[[], Any]:
    kwargs = {"inner_loss": _G, "outer_loss": _F, "params": _P(), "hparams": _H(), "solver": CG(max_steps=5)}
    kwargs.update(overrides)
    return lambda: hypergrad.implicit_grad(**kwargs)


def _fixed_point(phi: Callable, **overrides: Any) -> Callable[[], Any]:
    kwargs = {"solver": FixedPoint(max_steps=5)}
    kwargs.update(overrides)
    return lambda: hypergrad.fixed_point_grad(phi, _F, _P(), _H(), **kwargs)


def _proximal(outer_grad: Any, **overrides: Any) -> Callable[[], Any]:
    kwargs = {"lam": 1.0, "solver": CG(max_steps=5)}
    kwargs.update(overrides)
    return lambda: hypergrad.proximal_grad(lambda p: (p["w"] ** 2).sum(), _P(), outer_grad, **kwargs)


def _gd_step(p: dict, h: dict) -> dict:
    return {"w": p["w"] - 0.5 * (p["w"] - h["lam"])}


ERROR_INPUTS: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    # wrong types
    (
        "params_single_tensor",
        _implicit(params=torch.ones(3)),
        TypeError,
        r"`params` must be a dict of tensors, got a single Tensor; wrap it",
    ),
    (
        "params_module",
        _implicit(params=torch.nn.Linear(2, 2)),
        TypeError,
        r"`params` must be a dict of tensors, got Linear\. Use dict\(module\.named_parameters\(\)\)",
    ),
    (
        "params_int_dtype",
        _implicit(params={"w": torch.ones(3, dtype=torch.int64)}),
        TypeError,
        r"`params\['w'\]` has dtype torch\.int64; only floating-point tensors",
    ),
    (
        "hparams_value_not_tensor",
        _implicit(hparams={"lam": [1.0, 1.0, 1.0]}),
        TypeError,
        r"`hparams\['lam'\]` must be a Tensor, got list",
    ),
    (
        "inner_loss_not_callable",
        _implicit(inner_loss="G"),
        TypeError,
        r"`inner_loss` must be a callable \(params, hparams\) -> scalar, got str",
    ),
    ("solver_string", _implicit(solver="cg"), TypeError, r"not the string 'cg'"),
    ("solver_class", _implicit(solver=CG), TypeError, r"got the class CG; call it: solver=CG\(\)"),
    (
        "matvec_not_callable",
        lambda: CG()(torch.eye(2), torch.ones(2)),
        TypeError,
        r"CG: `matvec` must be a callable v -> A v .*lambda v: M @ v",
    ),
    (
        "b_is_list",
        lambda: Neumann()(lambda v: v, [1.0, 2.0]),
        TypeError,
        r"Neumann: `b` must be a Tensor or a dict of tensors, got list",
    ),
    (
        "loss_returns_float",
        _implicit(outer_loss=lambda p, h: 1.0),
        TypeError,
        r"`outer_loss` must return a scalar Tensor, got float",
    ),
    # key and shape mismatches
    (
        "x0_keys",
        _implicit(x0={"v": torch.zeros(3, dtype=torch.float64)}),
        ValueError,
        r"`x0` must have the same keys as `params`: missing \['w'\], unexpected \['v'\]",
    ),
    (
        "x0_shape",
        _implicit(x0={"w": torch.zeros(4, dtype=torch.float64)}),
        ValueError,
        r"`x0\['w'\]` has shape \(4,\) but `params\['w'\]` has shape \(3,\)",
    ),
    (
        "phi_output_keys",
        _fixed_point(lambda p, h: {"u": p["w"]}),
        ValueError,
        r"`phi\(params, hparams\)` must have the same keys as `params`: missing \['w'\], unexpected \['u'\]",
    ),
    (
        "phi_output_not_dict",
        _fixed_point(lambda p, h: p["w"]),
        TypeError,
        r"`phi` must return a dict of tensors keyed like `params`, got Tensor",
    ),
    (
        "outer_grad_keys",
        _proximal({"b": torch.ones(3, dtype=torch.float64)}),
        ValueError,
        r"`outer_grad` must have the same keys as `params`: missing \['w'\], unexpected \['b'\]",
    ),
    (
        "outer_grad_shape",
        _proximal({"w": torch.ones(2, 2, dtype=torch.float64)}),
        ValueError,
        r"`outer_grad\['w'\]` has shape \(2, 2\) but `params\['w'\]` has shape \(3,\)",
    ),
    (
        "inner_step_keys",
        lambda: hypergrad.unrolled_grad(lambda p, h: {"u": p["w"]}, _F, _P(), _H(), num_steps=2),
        ValueError,
        r"`inner_step\(params, hparams\)` must have the same keys as `params`",
    ),
    # losses
    (
        "inner_loss_not_scalar",
        _implicit(inner_loss=lambda p, h: (p["w"] - h["lam"]) ** 2),
        ValueError,
        r"`inner_loss` must return a scalar, got a tensor of shape \(3,\); reduce it with \.mean\(\) or \.sum\(\)",
    ),
    (
        "outer_loss_not_scalar",
        _implicit(outer_loss=lambda p, h: p["w"]),
        ValueError,
        r"`outer_loss` must return a scalar, got a tensor of shape \(3,\)",
    ),
    (
        "inner_loss_ignores_params",
        _implicit(inner_loss=lambda p, h: (h["lam"] ** 2).sum()),
        ValueError,
        r"`inner_loss` does not depend on `params`: its Hessian is zero",
    ),
    (
        "outer_loss_constant",
        _implicit(outer_loss=lambda p, h: torch.tensor(1.0, dtype=torch.float64)),
        ValueError,
        r"`outer_loss` depends on neither `params` nor `hparams`",
    ),
    (
        "unused_hparam",
        _implicit(hparams={**_H(), "extra": torch.ones(2, dtype=torch.float64)}),
        ValueError,
        r"hparams \['extra'\] affect neither `inner_loss` nor `outer_loss`",
    ),
    # non-finite values
    (
        "params_nan",
        _implicit(params={"w": torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64)}),
        ValueError,
        r"`params` has non-finite values \(NaN or Inf\) in \['w'\]",
    ),
    (
        "hparams_inf",
        _implicit(hparams={"lam": torch.tensor([1.0, float("inf"), 0.0], dtype=torch.float64)}),
        ValueError,
        r"`hparams` has non-finite values \(NaN or Inf\) in \['lam'\]",
    ),
    (
        "outer_loss_nan",
        _implicit(outer_loss=lambda p, h: p["w"].sum() * float("nan")),
        ValueError,
        r"`outer_loss` returned nan at the given point",
    ),
    # invalid solver / operator settings
    ("cg_negative_rtol", lambda: CG(rtol=-1e-3), ValueError, r"CG: `rtol` must be a finite number >= 0, got -0\.001"),
    ("cg_max_steps_zero", lambda: CG(max_steps=0), ValueError, r"CG: `max_steps` must be an integer >= 1, got 0"),
    (
        "neumann_float_max_steps",
        lambda: Neumann(max_steps=2.5),
        ValueError,
        r"Neumann: `max_steps` must be an integer >= 1, got 2\.5 \(a float\? pass an int\)",
    ),
    (
        "neumann_alpha_zero",
        lambda: Neumann(alpha=0.0),
        ValueError,
        r"Neumann: `alpha` must be > 0, got 0\. A typical choice is 1 / lambda_max",
    ),
    (
        "fixed_point_nan_rtol",
        lambda: FixedPoint(rtol=float("nan")),
        ValueError,
        r"FixedPoint: `rtol` must be a finite number >= 0, got nan",
    ),
    (
        "bad_hvp_mode",
        _implicit(hvp_mode="fast"),
        ValueError,
        r"`hvp_mode` must be one of \['auto', 'fwd_rev', 'rev_rev', 'rev_rev_cached', 'finite_diff'\], got 'fast'",
    ),
    ("negative_damping", _implicit(damping=-0.1), ValueError, r"`damping` must be a finite number >= 0, got -0\.1"),
    (
        "damped_negative_mu",
        lambda: Damped(lambda v: v, -1.0),
        ValueError,
        r"Damped: `mu` must be a finite number >= 0, got -1\.0",
    ),
    (
        "dense_too_large",
        lambda: Dense(max_size=4)(lambda v: v, torch.ones(10)),
        ValueError,
        r"Dense: the operator acts on 10 unknowns, more than `max_size`=4.*Use `hypergrad\.solvers\.CG`",
    ),
    (
        "cg_on_fixed_point",
        _fixed_point(_gd_step, solver=CG(max_steps=5)),
        ValueError,
        r"CG assumes a symmetric operator.*pass symmetric=True if phi is a gradient-descent step",
    ),
    ("proximal_lam_zero", _proximal(_P(), lam=0.0), ValueError, r"`lam` must be a finite number > 0, got 0\.0"),
    (
        "unrolled_zero_steps",
        lambda: hypergrad.unrolled_grad(_gd_step, _F, _P(), _H(), num_steps=0),
        ValueError,
        r"`num_steps` must be an integer >= 1, got 0",
    ),
    (
        "unrolled_truncate_too_long",
        lambda: hypergrad.unrolled_grad(_gd_step, _F, _P(), _H(), num_steps=3, truncate=5),
        ValueError,
        r"`truncate` must be None or an integer in \[1, num_steps=3\], got 5",
    ),
    (
        "stateless_bad_policy",
        lambda: hypergrad.stateless(torch.nn.Linear(2, 2), buffers="frozen"),
        ValueError,
        r"`buffers` must be 'batch_stats' or 'running_stats', got 'frozen'",
    ),
]

assert len({e[0] for e in ERROR_INPUTS}) == len(ERROR_INPUTS), "duplicate ERROR_INPUTS ids"
assert all(re.compile(e[3]) for e in ERROR_INPUTS)
