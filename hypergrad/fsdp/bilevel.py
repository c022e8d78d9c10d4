r""":class:`~hypergrad.BilevelProblem` with ``fully_shard``-ed (FSDP2) levels.

The problem detects sharded levels once, at construction (:func:`sharded_levels`), and then routes
its three phases through :class:`ShardedLevels`:

* inner step: one ordinary ``backward()`` of the inner loss through the sharded modules (FSDP2
  averages the gradient over ranks with its reduce-scatter), plus the method's proximal term;
* hypergradient: :math:`\nabla_\theta \bar F` (and the direct outer gradient) by one ``backward()``,
  the Hessian products by :class:`~hypergrad.fsdp.ShardedHessianOperator`, the solve and the cross
  term by :func:`hypergrad._assembly.root_vjp` (the one assembly of every hypergradient);
* outer step: the optimiser steps the (sharded or replicated) outer parameters as usual.

Supported: the inner level sharded; the outer level replicated (plain parameters, identical on
every rank: :class:`~hypergrad.Implicit` or :class:`~hypergrad.Proximal`) or sharded on the same
mesh (:class:`~hypergrad.Proximal`, whose coupled pairs are then sharded alike). HVP route from the
method's ``hvp_mode``: ``"auto"`` is ``"exact"`` (double backward through DTensor) when the problem
has a ``dense_inner`` twin, else ``"finite_diff_cached"`` with ``reuse_operator=True`` and
``"finite_diff"`` without; ``"finite_diff"`` is always central differences; ``"rev_rev"`` and
``"rev_rev_cached"`` with a ``dense_inner`` twin are ``"exact_gathered"`` (reverse over reverse on the
gathered weights, each rank on its own batch).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.func import functional_call

from .._assembly import root_vjp
from ..distributed import all_reduce_mean
from ..operators import Damped
from ..solvers import Dense
from ..tree import tree_scale
from ._module import mesh_of, sharded_params
from .operator import ShardedHessianOperator

__all__ = ["ShardedLevels", "sharded_levels", "replicated_part"]


def _is_sharded(module: nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in module.modules()) or any(
        isinstance(p, DTensor) for p in module.parameters()
    )


def sharded_levels(
    inner: nn.Module,
    outer: nn.Module,
    inner_params: Mapping[str, Tensor],
    outer_params: Mapping[str, Tensor],
    method: Any,
    dense_inner: Optional[nn.Module],
) -> Optional["ShardedLevels"]:
    """``None`` for unsharded levels, else the checked :class:`ShardedLevels`; clear errors otherwise."""
    inner_sharded, outer_sharded = _is_sharded(inner), _is_sharded(outer)
    if not (inner_sharded or outer_sharded):
        if dense_inner is not None:
            raise ValueError(
                "BilevelProblem: `dense_inner` is only used when the inner level is wrapped with fully_shard "
                f"(FSDP2), but the inner module {type(inner).__name__} is not; remove `dense_inner`."
            )
        return None
    if not inner_sharded:
        raise ValueError(
            "BilevelProblem: the outer level holds fully_shard-ed (FSDP2) parameters but the inner level does not; "
            "hypergrad shards the inner level's Hessian. Wrap the inner module with fully_shard too (same mesh), "
            "or leave the outer module unsharded."
        )
    return ShardedLevels(inner, outer, inner_params, outer_params, method, dense_inner, outer_sharded)


class _Replicated(nn.Module):
    """The plain (replicated) parameters and buffers of sharded levels, for the problem's broadcast from rank 0."""

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__()
        self._tensors = [t for m in modules for t in [*m.parameters(), *m.buffers()] if not isinstance(t, DTensor)]

    def parameters(self, recurse: bool = True) -> Any:
        return iter(self._tensors)

    def buffers(self, recurse: bool = True) -> Any:
        return iter(())


def replicated_part(modules: Sequence[nn.Module]) -> nn.Module:
    """What :class:`~hypergrad.BilevelProblem` broadcasts from rank 0 for levels with ``fully_shard``-ed parts.

    The plain parameters (the replicated parts of a mixed level, e.g. a head beside a sharded
    backbone) and the buffers (FSDP2 does not shard them); never a ``DTensor`` shard.
    """
    return _Replicated([m for m in modules if _is_sharded(m)])


def _unpack(batch: Any) -> tuple:
    return tuple(batch) if type(batch) in (tuple, list) else (batch,)


def _repack(template: Any, parts: tuple) -> Any:
    return type(template)(parts) if type(template) in (tuple, list) else parts[0]


class _OuterHost(nn.Module):
    """``forward(inner, batch) = loss(inner, outer, batch)``: functional_call swaps the outer tensors."""

    def __init__(self, outer: nn.Module, loss: Any):
        super().__init__()
        self.outer = outer
        self._loss = loss

    def forward(self, inner: nn.Module, batch: Any) -> Tensor:
        return self._loss(inner, self.outer, batch)


class ShardedLevels:
    """The FSDP2 routes of a :class:`~hypergrad.BilevelProblem` (built by :func:`sharded_levels`).

    Args:
        inner, outer: the levels' modules (the inner one ``fully_shard``-ed).
        inner_params, outer_params: the levels' trained parameters.
        method: :class:`~hypergrad.Implicit` or :class:`~hypergrad.Proximal`.
        dense_inner: an unsharded twin of ``inner`` (the meta device is fine) for the exact route.
        outer_sharded: whether the outer level is ``fully_shard``-ed too.
    """

    def __init__(
        self,
        inner: nn.Module,
        outer: nn.Module,
        inner_params: Mapping[str, Tensor],
        outer_params: Mapping[str, Tensor],
        method: Any,
        dense_inner: Optional[nn.Module],
        outer_sharded: bool,
    ):
        from ..methods import Implicit, Proximal

        self.params = sharded_params(inner, list(inner_params), name="inner.module")
        self.inner, self.outer, self.dense_inner = inner, outer, dense_inner
        self.outer_sharded = outer_sharded
        mesh = mesh_of(sharded_params(inner, name="inner.module"))
        if outer_sharded:
            outs = sharded_params(outer, list(outer_params), name="outer.module")
            bad = [k for k, p in outs.items() if isinstance(p, DTensor) and p.device_mesh != mesh]
            if bad:
                raise ValueError(
                    f"BilevelProblem: outer parameters {bad[:3]} are sharded on another device mesh than the inner "
                    "level's; call fully_shard on both levels with the same mesh."
                )
        if not isinstance(method, (Implicit, Proximal)):
            raise TypeError(
                f"BilevelProblem: `method` {type(method).__name__} is not supported with fully_shard-ed (FSDP2) levels; "
                "use hypergrad.Implicit or hypergrad.Proximal (Unrolled differentiates through optimiser steps, "
                "which torch.func cannot do over sharded parameters)."
            )
        self.implicit = isinstance(method, Implicit)
        if isinstance(method.solver, Dense):
            raise ValueError(
                f"BilevelProblem: `solver` Dense of {type(method).__name__} materialises the whole Hessian on one "
                "rank, which defeats sharding and is not supported with fully_shard-ed (FSDP2) levels; use "
                "hypergrad.CG (or Neumann) instead."
            )
        if self.implicit and any(isinstance(p, DTensor) for p in outer_params.values()):
            raise ValueError(
                "BilevelProblem: hypergrad.Implicit under FSDP2 needs the outer level replicated (plain parameters, "
                "identical on every rank): its mixed product differentiates through them. Do not fully_shard the "
                "outer module, or couple the levels proximally with hypergrad.Proximal."
            )
        if isinstance(method, Proximal):
            for i, o in method.pairs(inner_params, outer_params).items():
                if not isinstance(inner_params[i], DTensor):
                    raise ValueError(
                        f"BilevelProblem: Proximal couples the replicated (plain) inner parameter {i!r} of a level with "
                        "fully_shard-ed parts; under FSDP2 the coupled parameters must be sharded on both levels. "
                        "fully_shard the coupled modules of both levels with the same mesh and per-block wrapping."
                    )
                if not isinstance(outer_params[o], DTensor):
                    raise ValueError(
                        f"BilevelProblem: Proximal couples the sharded inner parameter {i!r} to the plain outer "
                        f"parameter {o!r}; coupled parameters must be sharded alike. fully_shard the outer module "
                        "with the same mesh and the same per-block wrapping as the inner one."
                    )
                ip, op = inner_params[i], outer_params[o]
                assert isinstance(ip, DTensor) and isinstance(op, DTensor)
                if ip.placements != op.placements:
                    raise ValueError(
                        f"BilevelProblem: Proximal couples {i!r} (sharded as {ip.placements}) to {o!r} (sharded as "
                        f"{op.placements}); wrap both levels the same way with fully_shard."
                    )
        self.mode = self._mode(method)
        if dense_inner is not None and self.mode not in ("exact", "exact_gathered"):
            raise ValueError(
                f"BilevelProblem: `dense_inner` is given but the method's hvp_mode={method.hvp_mode!r} resolves to "
                f"{self.mode!r} under FSDP2, which does not use it; pass hvp_mode='auto' for the exact route or drop "
                "`dense_inner`."
            )

    def _mode(self, method: Any) -> str:
        if method.hvp_mode == "finite_diff":
            return "finite_diff"
        if method.hvp_mode == "auto":
            if self.dense_inner is not None:
                return "exact"
            return "finite_diff_cached" if method.reuse_operator else "finite_diff"
        if method.hvp_mode in ("rev_rev", "rev_rev_cached") and self.dense_inner is not None:
            return "exact_gathered"  # reverse over reverse on the gathered weights (graph built once per operator)
        raise ValueError(
            f"BilevelProblem: `hvp_mode` of {type(method).__name__} is {method.hvp_mode!r}, which is not supported "
            "with a fully_shard-ed (FSDP2) inner level: torch.func transforms cannot see through fully_shard. Use "
            "hvp_mode='auto' (exact double backward through DTensor when the problem has `dense_inner`, an unsharded "
            "twin of the inner module built on the meta device; finite differences otherwise), 'finite_diff', or "
            "'rev_rev' with `dense_inner` (exact double backward on the gathered weights, any loss)."
        )

    # ------------------------------------------------------------------ helpers
    def _all(self) -> list[Tensor]:
        return [*self.inner.parameters(), *self.outer.parameters()]

    @contextlib.contextmanager
    def _cleared_grads(self) -> Iterator[None]:
        """Both levels' ``.grad`` cleared for one backward pass, then the ones held before put back."""
        saved = [(p, p.grad) for p in self._all()]
        for p, _ in saved:
            p.grad = None
        try:
            yield
        finally:
            for p, old in saved:
                p.grad = old

    def _grads(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """``.grad`` of ``params``: sharded ones as FSDP2 averaged them, replicated (plain) ones averaged here."""
        out = {k: torch.zeros_like(p) if p.grad is None else p.grad.detach() for k, p in params.items()}
        plain = {k: g for k, g in out.items() if not isinstance(g, DTensor)}
        if plain:
            out.update(all_reduce_mean(plain))
        return out

    def _loss(self, user_loss: Any, batch: Any) -> Any:
        """``loss(module, hparams, *parts)`` for :class:`ShardedHessianOperator` from a problem loss."""
        host = _OuterHost(self.outer, user_loss)

        def loss(module: nn.Module, h: dict[str, Tensor], *parts: Any) -> Tensor:
            b = _repack(batch, parts)
            if not h:
                return user_loss(module, self.outer, b)
            return functional_call(host, {"outer." + k: v for k, v in h.items()}, (module, b), strict=False)

        return loss

    # ------------------------------------------------------------------ phases
    def inner_grads(self, problem: Any, batch: Any, check_loss: Any) -> tuple[float, dict[str, Tensor]]:
        """``(loss, grads)`` of the inner step: FSDP2-averaged gradient plus the method's penalty term."""
        params = problem._inner_params
        with self._cleared_grads(), torch.enable_grad():
            loss = check_loss("inner_loss", problem.inner_loss(self.inner, self.outer, batch))
            if not loss.requires_grad:
                raise ValueError(
                    "`inner_loss` does not depend on the inner level's trained parameters; compute it "
                    "with the `inner` module it receives."
                )
            loss.backward()
            grads = self._grads(params)  # sharded: FSDP2's reduce-scatter averaged them
            value = all_reduce_mean({"v": loss.detach().reshape(1).double()})["v"]
            penalty = problem.method.inner_penalty(params, problem._outer_params)
            if penalty is not None:
                pg = torch.autograd.grad(penalty, list(params.values()), allow_unused=True)
                for (k, _), g in zip(params.items(), pg):
                    if g is not None:
                        grads[k] = grads[k] + g
                pv = penalty.full_tensor() if isinstance(penalty, DTensor) else penalty
                value = value + pv.detach().double()
        return float(value), grads

    def _outer_grads(self, problem: Any, batch: Any, check_loss: Any) -> tuple[Tensor, dict, dict]:
        with self._cleared_grads():
            with torch.enable_grad():
                value = check_loss("outer_loss", problem.outer_loss(self.inner, self.outer, batch))
                value.backward()
            g_theta = self._grads(problem._inner_params)
            g_lam = self._grads(problem._outer_params)
            loss = all_reduce_mean({"v": value.detach().reshape(1).double()})["v"].reshape(())
        return loss, g_theta, g_lam

    def _operator(self, problem: Any, hb: Any, hparams: dict, keys: Sequence[str], token: Any) -> tuple[Any, bool]:
        """The sharded Hessian operator on the Hessian batch ``hb``, kept by the method's reuse rule."""

        def build() -> ShardedHessianOperator:
            return ShardedHessianOperator(
                self.inner,
                self._loss(problem.inner_loss, hb),
                _unpack(hb),
                hparams,
                mode=self.mode,  # type: ignore[arg-type]
                keys=list(keys),
                dense_module=self.dense_inner,
            )

        return problem.method._reused(build, problem.method_state, token)

    def hypergradient(self, problem: Any, outer_batch: Any, hb: Any, token: Any, check_loss: Any) -> Any:
        """The method's hypergradient as a :class:`~hypergrad.methods._base.MethodOutput`."""
        from ..methods._base import MethodOutput

        method, state = problem.method, problem.method_state
        buffers: list[tuple[Tensor, Tensor]] = [
            (b, b.detach().clone()) for b in [*self.inner.buffers(), *self.outer.buffers()]
        ]
        try:
            value, g_theta, g_lam = self._outer_grads(problem, outer_batch, check_loss)
            if self.implicit:
                hparams = {k: p.detach() for k, p in problem._outer_params.items()}
                op, reused = self._operator(problem, hb, hparams, list(g_theta), token)
                matvec: Any = Damped(op, method.damping) if method.damping > 0 else op
                rhs = g_theta

                def cross(v: Any) -> dict[str, Tensor]:
                    return dict(tree_scale(op.mixed(dict(v)), -1.0))

                what, extra = "implicit hypergradient", 1
            else:
                pairs = method.pairs(problem._inner_params, problem._outer_params)
                op, reused = self._operator(problem, hb, {}, list(pairs), token)
                matvec = Damped(op, 1.0, scale=1.0 / (method.lam + method.damping))
                rhs = {k: g_theta[k] for k in pairs}

                def cross(v: Any) -> dict[str, Tensor]:
                    return {pairs[k]: t for k, t in v.items()}

                what, extra = "proximal hypergradient", 0
            grad, solution = root_vjp(
                matvec,
                method.solver,
                rhs,
                cross,
                direct=g_lam,
                x0=method._x0(state, rhs),
                on_solution=method._on_solution(state, what),
            )
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        return MethodOutput(grad, value, solution, solution.num_matvecs + extra, reused)
