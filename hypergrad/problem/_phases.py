r"""The three phases of :class:`~hypergrad.BilevelProblem`: inner step, hypergradient, outer step.

Each phase is transactional: it takes a :class:`~hypergrad.problem._transaction.Snapshot` of what
it writes before its checks, and restores it when it is skipped or raises. Gradients are checked
for non-finite values *before* the optimiser step, so parameters and optimiser state are written
only by a step that is applied.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..fsdp.clip import grad_norm64, sharded_clip_grad_norm_
from ..fsdp.operator import _norm64
from ..level import Level
from ..methods._base import _wide
from ..records import NonFiniteError, SolveInfo, StepRecord
from ..solvers import SolverError
from ..tree import tree_norm
from ._policy import mark_skipped
from ._transaction import Snapshot
from ._validate import check_loss, clear_batchnorm_errors

LossFn = Callable[[nn.Module, nn.Module, Any], Tensor]


class LossHost(nn.Module):
    """Holds both levels so one ``functional_call`` swaps the parameters of both for a whole loss."""

    def __init__(self, inner: nn.Module, outer: nn.Module, loss: LossFn):
        super().__init__()
        self.inner, self.outer = inner, outer
        self._loss = loss

    def forward(self, batch: Any) -> Tensor:
        return self._loss(self.inner, self.outer, batch)


#: Problem attributes a phase may change (restored on skip/raise).
BOOKKEEPING = (
    "inner_steps",
    "outer_steps",
    "inner_skipped",
    "outer_skipped",
    "failed_solves",
    "_last_inner_batch",
    "_pending_skip",
    "_linearisation",
)


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def inner(problem: Any, batch: Any, record: StepRecord) -> None:
    """One inner optimiser step on ``batch``; on a non-finite loss or gradient nothing is kept."""
    start = time.perf_counter()
    params = problem._inner_params
    snap = Snapshot(
        problem,
        BOOKKEEPING,
        modules=(problem.inner.module, problem.outer.module),
        grads=params.values(),
    )
    try:
        if problem._sharded is not None:
            with clear_batchnorm_errors("inner_batch"):
                value, tree = problem._sharded.inner_grads(problem, batch, check_loss)
        else:
            value, tree = _inner_grads(problem, params, batch)
        for k, p in params.items():
            p.grad = tree[k].to(p.dtype)
        reason = None if _finite(value) else f"the inner loss is {value}"
        record.inner_losses.append(value)
        reason = apply(problem.inner, "inner", reason)
        if reason is not None:
            snap.restore()  # BatchNorm statistics, .grad, counters; the default Hessian batch stays
            problem.inner_skipped += 1
            problem.policy.nonfinite(record, reason, "inner step")
        else:
            problem.inner_steps += 1
            problem._last_inner_batch = batch
            problem._linearisation_changed()  # new inner parameters: a cached operator is stale (freed)
    except BaseException:
        snap.restore()
        raise
    finally:
        record.times["inner"] = record.times.get("inner", 0.0) + time.perf_counter() - start


def _inner_grads(problem: Any, params: dict, batch: Any) -> tuple[float, dict]:
    """The rank-averaged inner loss (with the method's penalty) and its gradient."""
    with torch.enable_grad(), clear_batchnorm_errors("inner_batch"):
        loss = check_loss("inner_loss", problem.inner_loss(problem.inner.module, problem.outer.module, batch))
        penalty = problem.method.inner_penalty(params, problem._outer_params)
        total = loss if penalty is None else loss + penalty
        if not total.requires_grad:
            raise ValueError(
                "`inner_loss` does not depend on the inner level's trained parameters; compute it "
                "with the `inner` module it receives (and check that the optimizer holds its parameters)."
            )
        grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    tree = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}
    tree["__loss__"] = _wide(total).reshape(1)
    tree = problem.reduction.reduce(tree)
    value = float(tree.pop("__loss__"))
    return value, tree


def hypergradient(problem: Any, outer_batch: Any, hessian_batch: Any, record: StepRecord, *, accumulate: bool) -> None:
    """The method's hypergradient into the outer ``.grad``; a skip clears them and skips the next outer step."""
    start = time.perf_counter()
    explicit = hessian_batch is not None
    hb = hessian_batch if explicit else problem._hessian_batch(record.reason)
    theta = {k: p.detach() for k, p in problem._inner_params.items()}
    lam = {k: p.detach() for k, p in problem._outer_params.items()}
    # an explicit batch is a linearisation of its own: never served from, nor stored as, a reusable operator
    token = None if explicit else problem._operator_token()
    snap = Snapshot(problem, BOOKKEEPING, grads=problem._outer_params.values(), method_state=problem.method_state)
    problem._pending_skip = None
    try:
        try:
            if problem._sharded is not None:
                out = problem._sharded.hypergradient(problem, outer_batch, hb, token, check_loss)
            else:
                inner_fn = _pure(problem._G, hb, "inner_loss", "hessian_batch")
                outer_fn = _pure(problem._F, outer_batch, "outer_loss", "outer_batch")
                if not problem._reach_checked:
                    _refuse_unreached_outer(problem, inner_fn, outer_fn, theta, lam)
                    problem._reach_checked = True
                out = problem.method.hypergradient(
                    inner_fn,
                    outer_fn,
                    theta,
                    lam,
                    problem.method_state,
                    problem.reduction.reduce,
                    token,
                )
            norm = float(tree_norm(out.grad))
            if not _finite(norm):
                raise NonFiniteError(f"the hypergradient is non-finite (norm {norm})")
        except NonFiniteError as err:
            snap.restore()
            problem.policy.nonfinite(record, str(err), "hypergradient")  # raises under "raise"
            _skip_outer(problem, str(err))
            return
        record.solve = None if out.solution is None else SolveInfo.from_solution(out.solution)
        if out.solution is not None and out.solution.failed:
            problem.failed_solves += 1
            if problem.policy.failed_solve(record, out.solution, problem.method):
                kept = problem.failed_solves
                snap.restore()
                problem.failed_solves = kept
                _skip_outer(problem, str(record.reason))
                return
        for k, p in problem._outer_params.items():
            g = out.grad[k].to(p.dtype)
            p.grad = g if (not accumulate or p.grad is None) else p.grad + g
        record.outer_loss = float(out.outer_loss)
        record.num_hvps += out.num_hvps
        record.operator_reused = out.operator_reused
        record.hypergrad_norm = norm
    except SolverError:
        kept = problem.failed_solves + (0 if record.solve_failed else 1)
        snap.restore()
        problem.failed_solves = kept  # the failure is counted even when it raises
        raise
    except BaseException:
        snap.restore()
        raise
    finally:
        record.times["hypergradient"] = record.times.get("hypergradient", 0.0) + time.perf_counter() - start


def _refuse_unreached_outer(problem: Any, inner_fn: Callable, outer_fn: Callable, theta: dict, lam: dict) -> None:
    """Refuse outer parameters that no loss reaches (checked once, with the random state left as it was)."""
    devices = sorted({p.device.index or 0 for p in [*theta.values(), *lam.values()] if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # dropout in a loss: the runs with and without the check agree
        unreached = problem.method.unreached(inner_fn, outer_fn, theta, lam)
    if unreached:
        raise ValueError(
            f"the outer parameters {unreached[:8]}{' ...' if len(unreached) > 8 else ''} reach neither `outer_loss` nor "
            f"`inner_loss` (through {type(problem.method).__name__}): their hypergradient is zero by construction, "
            "and the outer optimiser would still move them (weight decay, momentum). Leave them out of the outer "
            "optimiser (or set requires_grad=False before building the problem), or use them in a loss."
        )


def _skip_outer(problem: Any, reason: str) -> None:
    """A skipped hypergradient poisons the outer gradients (e.g. of a meta-batch): clear them."""
    for p in problem._outer_params.values():
        p.grad = None
    problem._pending_skip = reason


def outer(problem: Any, record: StepRecord) -> None:
    """One outer optimiser (and scheduler) step with ``.grad``; skipped after a skipped hypergradient."""
    start = time.perf_counter()
    snap = Snapshot(problem, BOOKKEEPING, grads=problem._outer_params.values())
    try:
        if problem._pending_skip is not None:
            reason, problem._pending_skip = problem._pending_skip, None
            problem.outer.optimizer.zero_grad(set_to_none=True)
            problem.outer_skipped += 1
            mark_skipped(record, reason)
            return
        if all(p.grad is None for p in problem._outer_params.values()):
            raise RuntimeError(
                "outer_step: no outer gradients; call hypergradient(outer_batch) first or pass outer_batch."
            )
        reason = apply(problem.outer, "outer", None)
        if reason is None:
            problem.outer_steps += 1
            if problem.method.hessian_depends_on_outer:
                problem._linearisation_changed()
            return
        problem.outer_skipped += 1
        if problem.policy.on_nonfinite == "raise":
            snap.restore()  # the .grad stay for inspection; nothing else was written
        problem.policy.nonfinite(record, reason, "outer step")
    except BaseException:
        snap.restore()
        raise
    finally:
        record.times["outer"] = record.times.get("outer", 0.0) + time.perf_counter() - start


def apply(level: Level, which: str, reason: str | None) -> str | None:
    """Check, clip and apply the gradients in ``.grad`` (then clear them); returns a skip reason.

    The optimiser and the scheduler are stepped only when the gradient is finite. A step that
    turns finite parameters non-finite (it overflowed: e.g. an infinite learning rate) cannot be
    undone without a copy of every parameter and optimiser state, so it raises
    :class:`~hypergrad.NonFiniteError` at once instead of leaving later steps to skip silently.
    """
    params = [p for p in level.trained_parameters().values() if p.grad is not None]
    norm = float("nan")
    if reason is None and params:
        norm = grad_norm64(params)
        if not _finite(norm):
            reason = f"the {which} gradient is non-finite (norm {norm})"
    if reason is None:
        if level.max_grad_norm is not None:
            # torch.nn.utils.clip_grad_norm_ itself unless a gradient is sharded (FSDP2)
            sharded_clip_grad_norm_(params, level.max_grad_norm)
        level.optimizer.step()
        if level.scheduler is not None:
            level.scheduler.step()
        after = _norm64({str(i): p.detach() for i, p in enumerate(params)})  # one all_reduce under FSDP2
        if not _finite(after):
            level.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"the {which} optimiser step made the {which} parameters non-finite (their norm is {after}) although "
                f"the gradient was finite (norm {norm}): the step overflowed (a learning rate or step size too large, "
                "or an optimiser state that overflowed). The parameters cannot be restored: reload the last "
                f"checkpoint and lower the {which} learning rate."
            )
    level.optimizer.zero_grad(set_to_none=True)
    return reason


def _pure(fn: Callable[..., Tensor], batch: Any, name: str, batch_name: str) -> Callable[[dict, dict], Tensor]:
    """``loss(theta, lam)`` on ``batch`` through the functional (stateless) view of both modules."""

    def loss(theta: dict, lam: dict) -> Tensor:
        params = {**{"inner." + k: v for k, v in theta.items()}, **{"outer." + k: v for k, v in lam.items()}}
        with clear_batchnorm_errors(batch_name):
            return check_loss(name, fn(params, batch))

    return loss
