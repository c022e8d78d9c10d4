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


def _solve(solver: Any, matvec: Callable, b: Any, x0: Any = None) -> Callable[[], Any]:
    return lambda: solver(matvec, b, x0)


_B3 = torch.ones(3, dtype=torch.float64)


def _load_bytes(data: bytes, **kwargs: Any) -> Callable[[], Any]:
    """Write ``data`` to a fresh file and load it as a checkpoint."""

    def call() -> Any:
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "ckpt.pt")
            with open(path, "wb") as f:
                f.write(data)
            return hypergrad.load_checkpoint(path, **kwargs)

    return call


def _load_saved(state: dict, mutate: Callable[[bytes], bytes] | None = None, **kwargs: Any) -> Callable[[], Any]:
    """Save ``state`` with save_checkpoint (``kind="stage-a"``), optionally damage the bytes, load with ``kwargs``."""

    def call() -> Any:
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = hypergrad.save_checkpoint(state, os.path.join(d, "ckpt.pt"), kind="stage-a")
            if mutate is not None:
                path.write_bytes(mutate(path.read_bytes()))
            return hypergrad.load_checkpoint(path, **kwargs)

    return call


def _flip_tensor_byte(data: bytes) -> bytes:
    marker = _MARKED.numpy().tobytes()
    i = data.index(marker) + 5
    return data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :]


def _save_plain(obj: Any) -> Callable[[], Any]:
    def call() -> Any:
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "plain.pt")
            torch.save(obj, path)
            return hypergrad.load_checkpoint(path, unverified="raise")

    return call


def _save_into(path_fn: Callable[[str], str], state: Any = None, **kwargs: Any) -> Callable[[], Any]:
    def call() -> Any:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            return hypergrad.save_checkpoint({"w": _B3} if state is None else state, path_fn(d), **kwargs)

    return call


_MARKED = torch.linspace(1.0, 2.0, 32, dtype=torch.float64)


def _tmp_path(name: str) -> str:
    import os
    import tempfile

    return os.path.join(tempfile.gettempdir(), name)


def _pickled(obj: Any) -> bytes:
    import pickle

    return pickle.dumps(obj)


def _problem(**overrides: Any) -> Any:
    w, lam = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    kwargs: dict[str, Any] = {
        "inner": hypergrad.Level(w, torch.optim.SGD(w.parameters(), lr=0.4)),
        "outer": hypergrad.Level(lam, torch.optim.SGD(lam.parameters(), lr=0.25)),
        "inner_loss": lambda i, o, x: ((i.weight - o.weight) ** 2).sum(),
        "outer_loss": lambda i, o, x: ((i.weight - 2.0) ** 2).sum(),
        "method": hypergrad.Implicit(solver=CG(max_steps=2)),
    }
    kwargs.update(overrides)
    return hypergrad.BilevelProblem(**kwargs)


def _sq(p: dict) -> torch.Tensor:
    return (p["w"] ** 2).sum()


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
        r"`hvp_mode` must be one of \['auto', 'fwd_rev', 'rev_rev', 'rev_rev_cached', 'finite_diff', 'fwd_rev_linearized'\], got 'fast'",
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
    # ---- linear-solver entry (AbstractLinearSolver.__call__): every solver, issue 9 ----
    (
        "cg_int_rhs_issue9",
        _solve(CG(max_steps=3), lambda v: 2 * v, torch.ones(3, dtype=torch.int64)),
        TypeError,
        r"CG: `b` has dtype torch\.int64; linear solves need a real floating-point right-hand side.*b\.double\(\)",
    ),
    (
        "neumann_bool_rhs_leaf",
        _solve(Neumann(), lambda v: v, {"m": torch.ones(2, dtype=torch.bool)}),
        TypeError,
        r"Neumann: `b\['m'\]` has dtype torch\.bool",
    ),
    (
        "dense_complex_rhs",
        _solve(Dense(), lambda v: v, torch.ones(2, dtype=torch.complex64)),
        TypeError,
        r"Dense: `b` has dtype torch\.complex64",
    ),
    ("fixed_point_empty_rhs", _solve(FixedPoint(), lambda v: v, {}), ValueError, r"FixedPoint: `b` is an empty dict"),
    (
        "cg_rhs_leaf_list",
        _solve(CG(), lambda v: v, {"w": [1.0]}),
        TypeError,
        r"CG: `b\['w'\]` must be a Tensor, got list",
    ),
    (
        "cg_rhs_meta",
        _solve(CG(), lambda v: v, torch.ones(3, device="meta")),
        ValueError,
        r"CG: `b` is on the meta device, which holds no data.*to_empty",
    ),
    (
        "identity_rhs_meta",
        _solve(hypergrad.Identity(), lambda v: v, {"w": torch.ones(3, device="meta")}),
        ValueError,
        r"Identity: `b\['w'\]` is on the meta device",
    ),
    (
        "cg_matvec_other_shape_issue9",
        _solve(CG(max_steps=3), lambda v: torch.ones(4, dtype=torch.float64), _B3),
        ValueError,
        r"CG: `matvec\(v\)` has shape \(4,\) but `b` has shape \(3,\).*A linear map v -> A v must return",
    ),
    (
        "cg_matvec_broadcast_shape",
        _solve(CG(max_steps=3), lambda v: v.sum().reshape(1), _B3),
        ValueError,
        r"CG: `matvec\(v\)` has shape \(1,\) but `b` has shape \(3,\)",
    ),
    (
        "neumann_matvec_other_keys_issue9",
        _solve(Neumann(), lambda v: {"u": v["w"]}, {"w": _B3}),
        ValueError,
        r"Neumann: `matvec\(v\)` must have the same keys as `b`: missing \['w'\], unexpected \['u'\]",
    ),
    (
        "dense_matvec_other_keys",
        _solve(Dense(), lambda v: {"u": v["w"]}, {"w": _B3}),
        ValueError,
        r"Dense: `matvec\(v\)` must have the same keys as `b`",
    ),
    (
        "cg_matvec_other_dtype",
        _solve(CG(), lambda v: v.float(), _B3),
        ValueError,
        r"CG: `matvec\(v\)` has dtype torch\.float32 but `b` has dtype torch\.float64",
    ),
    (
        "fixed_point_matvec_list",
        _solve(FixedPoint(), lambda v: v.tolist(), _B3),
        TypeError,
        r"FixedPoint: `matvec` must return a Tensor like `b`, got list",
    ),
    (
        "cg_matvec_none",
        _solve(CG(), lambda v: None, _B3),
        TypeError,
        r"CG: `matvec` must return a Tensor like `b`, got NoneType",
    ),
    (
        "cg_matvec_tensor_for_tree",
        _solve(CG(), lambda v: v["w"], {"w": _B3}),
        TypeError,
        r"CG: `matvec\(v\)` must be a dict of tensors keyed like `b`, got Tensor",
    ),
    (
        "cg_matvec_meta",
        _solve(CG(), lambda v: v.to("meta"), _B3),
        ValueError,
        r"CG: `matvec\(v\)` is on meta but `b` is on cpu",
    ),
    (
        "cg_x0_meta",
        _solve(CG(), lambda v: v, _B3, torch.zeros(3, dtype=torch.float64, device="meta")),
        ValueError,
        r"CG: `x0` is on meta but `b` is on cpu; move it with \.to\('cpu'\)",
    ),
    (
        "neumann_x0_keys",
        _solve(Neumann(), lambda v: v, {"w": _B3}, {"v": _B3}),
        ValueError,
        r"Neumann: `x0` must have the same keys as `b`: missing \['w'\], unexpected \['v'\]",
    ),
    (
        "cg_x0_shape",
        _solve(CG(), lambda v: v, _B3, torch.zeros(1, dtype=torch.float64)),
        ValueError,
        r"CG: `x0` has shape \(1,\) but `b` has shape \(3,\)",
    ),
    (
        "cg_x0_dtype",
        _solve(CG(), lambda v: v, _B3, torch.zeros(3)),
        ValueError,
        r"CG: `x0` has dtype torch\.float32 but `b` has dtype torch\.float64.*\.to\(torch\.float64\)",
    ),
    (
        "cg_x0_dict_for_tensor",
        _solve(CG(), lambda v: v, _B3, {"w": _B3}),
        TypeError,
        r"CG: `x0` must be a Tensor like `b`, got dict",
    ),
    (
        "cg_budget_rtol_negative",
        lambda: CG(budget_rtol=-1e-3),
        ValueError,
        r"CG: `budget_rtol` must be a finite number >= 0",
    ),
    (
        "identity_budget_rtol_nan",
        lambda: hypergrad.Identity(budget_rtol=float("nan")),
        ValueError,
        r"Identity: `budget_rtol` must be a finite number >= 0, got nan",
    ),
    (
        "dense_budget_rtol_string",
        lambda: Dense(budget_rtol="1e-3"),
        ValueError,
        r"Dense: `budget_rtol` must be a finite number >= 0, got '1e-3'",
    ),
    ("cg_atol_inf", lambda: CG(atol=float("inf")), ValueError, r"CG: `atol` must be a finite number >= 0, got inf"),
    ("cg_max_steps_bool", lambda: CG(max_steps=True), ValueError, r"CG: `max_steps` must be an integer >= 1, got True"),
    ("dense_max_size_zero", lambda: Dense(max_size=0), ValueError, r"Dense: `max_size` must be an integer >= 1, got 0"),
    (
        "neumann_alpha_negative",
        lambda: Neumann(alpha=-0.5),
        ValueError,
        r"Neumann: `alpha` must be a finite number >= 0",
    ),
    # ---- tree arithmetic: no silent broadcasting ----
    (
        "tree_axpy_shapes",
        lambda: hypergrad.tree_axpy(2.0, {"w": torch.ones(3)}, {"w": torch.ones(1)}),
        ValueError,
        r"tree_axpy: `y\['w'\]` has shape \(1,\) but `x\['w'\]` has shape \(3,\)",
    ),
    (
        "tree_add_keys",
        lambda: hypergrad.tree_add({"w": torch.ones(3)}, {"v": torch.ones(3)}),
        ValueError,
        r"tree_add: `b` must have the same keys as `a`: missing \['w'\], unexpected \['v'\]",
    ),
    (
        "tree_sub_dtype",
        lambda: hypergrad.tree_sub({"w": torch.ones(3)}, {"w": torch.ones(3, dtype=torch.float64)}),
        ValueError,
        r"tree_sub: `b\['w'\]` has dtype torch\.float64 but `a\['w'\]` has dtype torch\.float32",
    ),
    (
        "tree_sub_device",
        lambda: hypergrad.tree_sub({"w": torch.ones(3)}, {"w": torch.ones(3, device="meta")}),
        ValueError,
        r"tree_sub: `b\['w'\]` is on meta but `a\['w'\]` is on cpu",
    ),
    (
        "tree_vdot_shapes",
        lambda: hypergrad.tree_vdot({"w": torch.ones(3)}, {"w": torch.ones(3, 1)}),
        ValueError,
        r"tree_vdot: `b\['w'\]` has shape \(3, 1\) but `a\['w'\]` has shape \(3,\)",
    ),
    (
        "tree_vdot_tensor_vs_dict",
        lambda: hypergrad.tree_vdot(torch.ones(3), {"w": torch.ones(3)}),
        TypeError,
        r"tree_vdot: `b` must be a Tensor like `a`, got dict",
    ),
    (
        "tree_axpy_vector_alpha",
        lambda: hypergrad.tree_axpy(torch.ones(3), {"w": torch.ones(3)}, {"w": torch.ones(3)}),
        ValueError,
        r"tree_axpy: `alpha` must be a number or a one-element tensor, got a tensor of shape \(3,\)",
    ),
    (
        "tree_scale_string",
        lambda: hypergrad.tree_scale({"w": torch.ones(3)}, "2"),
        TypeError,
        r"tree_scale: `s` must be a number or a one-element tensor, got str",
    ),
    (
        "tree_zeros_like_list",
        lambda: hypergrad.tree_zeros_like([torch.ones(1)]),
        TypeError,
        r"tree_map: `tree` must be a Tensor or a dict of tensors, got list",
    ),
    (
        "tree_norm_empty",
        lambda: hypergrad.tree_norm({}),
        ValueError,
        r"tree_vdot got an empty tree `a`: pass at least one tensor",
    ),
    (
        "unravel_wrong_length",
        lambda: hypergrad.tree_ravel({"a": torch.ones(2)})[1](torch.ones(3)),
        ValueError,
        r"unravel: `v` must be a 1-D Tensor of length 2, got shape \(3,\)",
    ),
    (
        "materialize_like_list",
        lambda: hypergrad.materialize(lambda v: v, [1.0]),
        TypeError,
        r"tree_ravel: `a` must be a Tensor or a dict of tensors, got list",
    ),
    # ---- checkpoints: integrity, foreign files, kinds, issue 9 ----
    (
        "ckpt_flipped_tensor_byte_issue9",
        _load_saved({"w": _MARKED}, _flip_tensor_byte),
        hypergrad.CheckpointError,
        r"is corrupted: the SHA-256 of tensor /'w' differs .*Its values are not loaded",
    ),
    (
        "ckpt_changed_plain_value",
        _load_saved({"name": "run-abcdef"}, lambda d: d.replace(b"run-abcdef", b"run-abcdeg")),
        hypergrad.CheckpointError,
        r"is corrupted: its keys or non-tensor values differ",
    ),
    ("ckpt_empty_issue9", _load_bytes(b""), hypergrad.CheckpointError, r"is empty \(0 bytes\).*--no-resume"),
    (
        "ckpt_truncated_issue9",
        _load_saved({"w": torch.ones(500)}, lambda d: d[: len(d) // 2]),
        hypergrad.CheckpointError,
        r"is truncated \(\d+ bytes; a copy or a save was interrupted\)",
    ),
    (
        "ckpt_random_bytes",
        _load_bytes(bytes(range(256)) * 4),
        hypergrad.CheckpointError,
        r"is not a checkpoint \(1024 bytes starting with",
    ),
    (
        "ckpt_bare_pickle_issue9",
        _load_bytes(_pickled({"projector": [1, 2]})),
        hypergrad.CheckpointError,
        r"is a bare pickle or a legacy-format torch file",
    ),
    (
        "ckpt_holds_objects",
        _save_plain({"m": torch.nn.Identity()}),
        hypergrad.CheckpointError,
        r"holds Python objects that `weights_only=True` refuses to unpickle .*pass weights_only=False",
    ),
    (
        "ckpt_plain_torch_save_refused",
        _save_plain({"w": torch.ones(2)}),
        hypergrad.CheckpointError,
        r"has no integrity record .*cannot be verified and is refused",
    ),
    ("ckpt_plain_list", _save_plain([1, 2]), TypeError, r"holds a list, expected a dict"),
    (
        "ckpt_wrong_kind_issue9",
        _load_saved({"w": _B3}, expected_kind="stage-b"),
        hypergrad.CheckpointError,
        r"holds a 'stage-a' checkpoint, but a 'stage-b' one was expected: it was written by another stage",
    ),
    (
        "ckpt_load_directory",
        lambda: hypergrad.load_checkpoint(_tmp_path("")),
        hypergrad.CheckpointError,
        r"is a directory; pass the checkpoint file inside it",
    ),
    (
        "ckpt_load_missing",
        lambda: hypergrad.load_checkpoint(_tmp_path("no-such-hypergrad-ckpt.pt")),
        FileNotFoundError,
        r"no checkpoint at .*check the path",
    ),
    (
        "ckpt_unverified_policy",
        _load_saved({"w": _B3}, unverified="ignore"),
        ValueError,
        r"`unverified` must be one of \['warn', 'allow', 'raise'\], got 'ignore'",
    ),
    ("ckpt_save_kind_int", _save_into(lambda d: d + "/c.pt", kind=3), TypeError, r"`kind` must be None or a str"),
    (
        "ckpt_save_reserved_key",
        _save_into(lambda d: d + "/c.pt", state={"__hypergrad_checkpoint__": {}}),
        ValueError,
        r"`state` has the reserved key '__hypergrad_checkpoint__'",
    ),
    ("ckpt_save_into_directory", _save_into(lambda d: d), ValueError, r"is a directory; pass a file name"),
    ("ckpt_save_not_dict", _save_into(lambda d: d + "/c.pt", state=[1]), TypeError, r"`state` must be a dict"),
    # ---- functional API and modules (existing validation, kept from regressing) ----
    ("hparams_empty", _implicit(hparams={}), ValueError, r"`hparams` is empty: pass at least one tensor"),
    (
        "params_meta_issue9",
        _implicit(params={"w": torch.ones(3, dtype=torch.float64, device="meta")}),
        ValueError,
        r"`params\['w'\]` is on the meta device, which holds no data",
    ),
    (
        "params_int_key",
        _implicit(params={0: torch.ones(3, dtype=torch.float64)}),
        TypeError,
        r"`params` keys must be strings",
    ),
    ("damping_nan", _implicit(damping=float("nan")), ValueError, r"`damping` must be a finite number >= 0, got nan"),
    ("damping_string", _implicit(damping="0.1"), ValueError, r"`damping` must be a finite number >= 0, got '0\.1'"),
    ("solver_none", _implicit(solver=None), TypeError, r"`solver` must be a hypergrad solver, got NoneType"),
    (
        "x0_dtype_via_implicit",
        _implicit(x0={"w": torch.zeros(3)}),
        ValueError,
        r"`x0\['w'\]` has dtype torch\.float32 but `b\['w'\]` has dtype torch\.float64",
    ),
    (
        "x0_meta_via_implicit",
        _implicit(x0={"w": torch.zeros(3, dtype=torch.float64, device="meta")}),
        ValueError,
        r"`x0\['w'\]` is on meta but `params\['w'\]` is on cpu",
    ),
    ("proximal_lam_nan", _proximal(_P(), lam=float("nan")), ValueError, r"`lam` must be a finite number > 0, got nan"),
    ("proximal_lam_inf", _proximal(_P(), lam=float("inf")), ValueError, r"`lam` must be a finite number > 0, got inf"),
    (
        "outer_grad_list",
        _proximal([1.0]),
        TypeError,
        r"`outer_grad` must be a dict of tensors keyed like `params`, got list",
    ),
    (
        "outer_grad_int",
        _proximal({"w": torch.ones(3, dtype=torch.int64)}),
        TypeError,
        r"`outer_grad\['w'\]` has dtype torch\.int64",
    ),
    (
        "outer_grad_meta",
        _proximal({"w": torch.ones(3, dtype=torch.float64, device="meta")}),
        ValueError,
        r"`outer_grad\['w'\]` is on meta but `params\['w'\]` is on cpu",
    ),
    (
        "phi_not_callable",
        lambda: hypergrad.fixed_point_grad("phi", _F, _P(), _H(), solver=FixedPoint()),
        TypeError,
        r"`phi` must be a callable \(params, hparams\) -> params, got str",
    ),
    (
        "unrolled_float_steps",
        lambda: hypergrad.unrolled_grad(_gd_step, _F, _P(), _H(), num_steps=2.5),
        ValueError,
        r"`num_steps` must be an integer >= 1, got 2\.5 \(a float\? pass an int\)",
    ),
    (
        "unrolled_truncate_zero",
        lambda: hypergrad.unrolled_grad(_gd_step, _F, _P(), _H(), num_steps=3, truncate=0),
        ValueError,
        r"`truncate` must be None or an integer in \[1, num_steps=3\], got 0",
    ),
    (
        "hvp_fn_not_callable",
        lambda: hypergrad.hvp("f", _P(), _P()),
        TypeError,
        r"`fn` must be a callable params -> scalar",
    ),
    ("hvp_bad_mode", lambda: hypergrad.hvp(_sq, _P(), _P(), mode="x"), ValueError, r"`mode` must be one of \['auto'"),
    (
        "hessian_operator_mode",
        lambda: hypergrad.HessianOperator(_sq, _P(), mode="x"),
        ValueError,
        r"`mode` must be one of \['auto'",
    ),
    (
        "damped_nan_mu",
        lambda: Damped(lambda v: v, float("nan")),
        ValueError,
        r"Damped: `mu` must be a finite number >= 0, got nan",
    ),
    (
        "damped_not_callable",
        lambda: Damped("op", 1.0),
        TypeError,
        r"Damped: `operator` must be a callable v -> A v, got str",
    ),
    ("stateless_not_module", lambda: hypergrad.stateless("m"), TypeError, r"`module` must be an nn\.Module, got str"),
    (
        "level_tensor",
        lambda: hypergrad.Level(torch.ones(2), None),
        TypeError,
        r"Level: `module` must be an nn\.Module or a dict of modules/parameters, got Tensor",
    ),
    (
        "implicit_method_solver_string",
        lambda: hypergrad.Implicit(solver="cg"),
        TypeError,
        r"Implicit: `solver` must be a hypergrad solver",
    ),
    (
        "proximal_method_lam_zero",
        lambda: hypergrad.Proximal(lam=0.0),
        ValueError,
        r"Proximal: `lam` must be a finite number > 0",
    ),
    (
        "unrolled_method_lr_nan",
        lambda: hypergrad.Unrolled(lr=float("nan")),
        ValueError,
        r"Unrolled: `lr` must be a finite number > 0, got nan",
    ),
    (
        "problem_step_int",
        lambda: _problem().step(3, None),
        TypeError,
        r"`inner_batches` must be a list or iterator of batches, got int",
    ),
    ("problem_method_string", lambda: _problem(method="implicit"), TypeError, r"`method` must be a hypergrad method"),
    (
        "problem_inner_loss_not_callable",
        lambda: _problem(inner_loss="G"),
        TypeError,
        r"`inner_loss` must be a callable \(inner, outer, batch\) -> scalar tensor, got str",
    ),
    (
        "set_rng_state_bad",
        lambda: hypergrad.set_rng_state({"x": 1}),
        TypeError,
        r"`state` must be the dict returned by hypergrad\.get_rng_state\(\), got a dict with keys \['x'\]",
    ),
    # issue 9, second pass: hvp/operators, stateless/module_params, proximal_grad, MetricsLogger.
    (
        "hvp_direction_keys_issue9",
        lambda: hypergrad.hvp(_sq, _P(), {"v": torch.ones(3, dtype=torch.float64)}),
        ValueError,
        r"hvp: `v` must have the keys of `params`; missing \['w'\], unexpected \['v'\]",
    ),
    (
        "hvp_direction_shape_issue9",
        lambda: hypergrad.hvp(_sq, _P(), {"w": torch.ones(1, dtype=torch.float64)}),
        ValueError,
        r"hvp: `v\['w'\]` has shape \(1,\) but `params\['w'\]` has shape \(3,\)",
    ),
    (
        "hvp_direction_dtype",
        lambda: hypergrad.hvp(_sq, _P(), {"w": torch.ones(3)}),
        ValueError,
        r"hvp: `v\['w'\]` is torch\.float32 on cpu but `params\['w'\]` is torch\.float64",
    ),
    ("hvp_direction_list", lambda: hypergrad.hvp(_sq, _P(), [1.0]), TypeError, r"hvp: `v` must be a dict of tensors"),
    (
        "mixed_hvp_direction_keys",
        lambda: hypergrad.mixed_hvp(_G, _P(), _H(), {"v": torch.ones(3, dtype=torch.float64)}),
        ValueError,
        r"mixed_hvp: `v` must have the keys of `params`",
    ),
    (
        "problem_step_string_issue9",
        lambda: _problem().step("abc", None),
        TypeError,
        r"`inner_batches` must be a list or iterator of batches, got the string 'abc'",
    ),
    (
        "problem_load_state_list",
        lambda: _problem().load_state_dict([1]),
        TypeError,
        r"`state` must be a dict from BilevelProblem\.state_dict\(\), got list",
    ),
    # modules.py (CORE-A): hypergrad.stateless with a misspelt / extra key silently uses the module's own weight.
    (
        "stateless_misspelt_key_issue9",
        lambda: hypergrad.stateless(torch.nn.Linear(2, 2))(
            {"weigth": torch.zeros(2, 2), "bias": torch.zeros(2)}, torch.ones(1, 2)
        ),
        ValueError,
        r"(?s)(?=.*'weigth')(?=.*'weight')",
    ),
    (
        "stateless_extra_key",
        lambda: hypergrad.stateless(torch.nn.Linear(2, 2))(
            {"weight": torch.zeros(2, 2), "bias": torch.zeros(2), "scale": torch.ones(1)}, torch.ones(1, 2)
        ),
        ValueError,
        r"'scale'",
    ),
    (
        "stateless_wrong_shape",
        lambda: hypergrad.stateless(torch.nn.Linear(2, 2))(
            {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)}, torch.ones(1, 2)
        ),
        ValueError,
        r"'weight'.*\(3, 2\).*\(2, 2\)",
    ),
    (
        "stateless_params_list",
        lambda: hypergrad.stateless(torch.nn.Linear(2, 2))([torch.zeros(2, 2)], torch.ones(1, 2)),
        TypeError,
        r"`params` must be a dict",
    ),
    (
        "module_params_not_module",
        lambda: hypergrad.module_params({"w": torch.ones(1)}),
        TypeError,
        r"`module` must be an nn\.Module, got dict",
    ),
    # operators.py (CORE-A): raw KeyError / torch errors.
    ("hvp_params_empty", lambda: hypergrad.hvp(_sq, {}, {}), ValueError, r"`params` is empty"),
    (
        "hvp_params_int",
        lambda: hypergrad.hvp(_sq, {"w": torch.ones(3, dtype=torch.int64)}, {"w": torch.ones(3, dtype=torch.int64)}),
        TypeError,
        r"`params\['w'\]` has dtype torch\.int64",
    ),
    (
        "hvp_fn_not_scalar",
        lambda: hypergrad.hvp(lambda p: p["w"] ** 2, _P(), _P()),
        ValueError,
        r"`fn` must return a scalar",
    ),
    (
        "hessian_operator_direction_keys",
        lambda: hypergrad.HessianOperator(_sq, _P())({"v": torch.ones(3, dtype=torch.float64)}),
        ValueError,
        r"`v` must have the keys of `params`",
    ),
    (
        "fixed_point_operator_direction_keys",
        lambda: hypergrad.FixedPointOperator(_gd_step, _P(), _H())({"v": torch.ones(3, dtype=torch.float64)}),
        ValueError,
        r"`v` must have the keys of `params`",
    ),
    # hypergradient.py (CORE-A): misleading message / error not naming the argument.
    (
        "implicit_grad_inference_mode_issue9",
        lambda: _in_inference_mode(_implicit()),
        RuntimeError,
        r"inference_mode",
    ),
    (
        "outer_grad_dtype",
        _proximal({"w": torch.ones(3)}),
        ValueError,
        r"`outer_grad\['w'\]` has dtype torch\.float32 but `params\['w'\]` has dtype torch\.float64",
    ),
    # metrics.py: a log directory that is a file gives a raw FileExistsError.
    (
        "metrics_logger_dir_is_file",
        lambda: _logger_on_a_file(),
        ValueError,
        r"`log_dir` .* is a file",
    ),
]


def _in_inference_mode(call: Callable[[], Any]) -> Any:
    with torch.inference_mode():
        return call()


def _logger_on_a_file() -> Any:
    import tempfile

    with tempfile.NamedTemporaryFile() as f:
        return hypergrad.MetricsLogger(f.name)


_ALL_IDS = [e[0] for e in ERROR_INPUTS]
assert len(set(_ALL_IDS)) == len(_ALL_IDS), "duplicate ERROR_INPUTS ids"
assert all(re.compile(e[3]) for e in ERROR_INPUTS)
