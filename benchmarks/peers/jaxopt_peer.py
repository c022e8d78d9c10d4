"""JAXopt: implicit differentiation with ``jaxopt.implicit_diff.custom_root``.

JAX runs on its own default backend (``jax.default_backend()``: its GPU where jaxlib has CUDA,
else the CPU), whatever device the torch problem lives on. The same data is copied to JAX float64 arrays and the losses are re-written in ``jax.numpy``
(quadratic and ridge problems only); the values are checked against the torch losses when the run
is built. The decorated solver returns the precomputed :math:`\\theta^*`; ``jax.grad`` of the outer
objective through it is jit-compiled once per problem and solver with the iteration budget as a traced argument
(compiled when the first run is built, never inside the timer) and the timed
call waits with ``block_until_ready``. Solvers: ``solve_cg`` and ``solve_normal_cg`` (JAXopt's
default), ``tol=0``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from jaxopt import implicit_diff, linear_solve  # noqa: E402

from applications.toy import QuadraticProblem, RidgeProblem  # noqa: E402

from ..problems import ProblemCase  # noqa: E402
from . import PeerRun  # noqa: E402

LIBRARY = "jaxopt"


def _np(t: torch.Tensor) -> Any:
    return jnp.asarray(t.detach().cpu().numpy())


def _losses(case: ProblemCase) -> tuple[Any, Any]:
    prob = case.problem
    if isinstance(prob, QuadraticProblem):
        a, b, t, reg = _np(prob.A), _np(prob.B), _np(prob.target), prob.reg

        def inner(p: dict, h: dict) -> Any:
            return 0.5 * p["theta"] @ (a @ p["theta"]) - p["theta"] @ (b @ h["lam"])

        def outer(p: dict, h: dict) -> Any:
            return 0.5 * jnp.sum((p["theta"] - t) ** 2) + 0.5 * reg * jnp.sum(h["lam"] ** 2)

        return inner, outer
    if isinstance(prob, RidgeProblem):
        x, y, xv, yv = _np(prob.X), _np(prob.y), _np(prob.X_val), _np(prob.y_val)

        def inner(p: dict, h: dict) -> Any:
            w = p["w"]
            return 0.5 * jnp.sum((x @ w - y) ** 2) + 0.5 * jnp.exp(h["log_lam"]) * jnp.sum(w**2)

        def outer(p: dict, h: dict) -> Any:
            return jnp.mean((xv @ p["w"] - yv) ** 2)

        return inner, outer
    raise NotImplementedError(f"jaxopt adapter: no JAX version of {type(prob).__name__}")


_COMPILED: dict[tuple[int, str], Any] = {}


def _compiled(case: ProblemCase, solver_name: str) -> tuple[Any, dict]:
    """``(jitted hypergradient fn(h, maxiter), hparams)``, compiled once per case and solver."""
    key = (id(case), solver_name)
    if key in _COMPILED:
        return _COMPILED[key]
    if case.kind != "implicit":
        raise NotImplementedError(f"jaxopt adapter: implicit toy problems only, not {case.kind!r} ones")
    inner, outer = _losses(case)
    theta = {k: _np(v) for k, v in case.params.items()}
    hp = {k: _np(v) for k, v in case.hparams.items()}
    for name, jfn, tfn in (("inner", inner, case.problem.inner_loss), ("outer", outer, case.problem.outer_loss)):
        jv, tv = float(jfn(theta, hp)), float(tfn(case.params, case.hparams))
        if abs(jv - tv) > 1e-9 * (1 + abs(tv)):
            raise RuntimeError(f"jaxopt adapter: the JAX {name} loss {jv} differs from the torch one {tv}")
    optimality = jax.grad(inner)
    base = getattr(linear_solve, solver_name)

    def hypergradient(h: dict, maxiter: Any) -> dict:
        # maxiter is traced (jax's CG loop bound), so one compilation serves every budget.
        @implicit_diff.custom_root(optimality, solve=partial(base, maxiter=maxiter, tol=0.0))
        def solver(init: dict, hh: dict) -> dict:
            return jax.tree_util.tree_map(jax.lax.stop_gradient, theta)

        return jax.grad(lambda hh: outer(solver(theta, hh), hh))(h)

    _COMPILED[key] = (jax.jit(hypergradient), hp)
    return _COMPILED[key]


def _build(case: ProblemCase, solver_name: str, k: int, num_hvps: int) -> PeerRun:
    fn, hp = _compiled(case, solver_name)
    maxiter = jnp.asarray(k)
    jax.block_until_ready(fn(hp, maxiter))  # compile (first time) and warm up outside the timed call

    def run() -> Any:
        return jax.block_until_ready(fn(hp, maxiter))

    def to_grad(out: dict) -> dict:
        return {key: torch.tensor(np.array(v), dtype=torch.float64, device=case.device) for key, v in out.items()}

    return PeerRun(run, to_grad, num_hvps)


def _cg(case: ProblemCase, k: int) -> PeerRun:
    return _build(case, "solve_cg", k, k)


def _normal_cg(case: ProblemCase, k: int) -> PeerRun:
    return _build(case, "solve_normal_cg", k, 2 * k + 1)


METHODS = {"jaxopt_cg": _cg, "jaxopt_normal_cg": _normal_cg}
