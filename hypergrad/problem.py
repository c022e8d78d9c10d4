r"""``BilevelProblem``: bilevel training inside your own loop, with your modules and optimisers.

You write :math:`G` = ``inner_loss(inner, outer, batch)`` and :math:`F` =
``outer_loss(inner, outer, batch)`` and choose a method object (:class:`~hypergrad.Implicit`,
:class:`~hypergrad.Proximal`, :class:`~hypergrad.Unrolled`); the guide "Use hypergrad in your own
loop" walks through it.

**Buffers (BatchNorm).** Ordinary inner steps run the modules as they are (running statistics
update as in any loop). Hypergradient passes run them through :func:`hypergrad.stateless` with the
``buffers`` policy: ``"batch_stats"`` (default) normalises with the batch's statistics and never
reads or writes running statistics; ``"running_stats"`` uses the stored ones, read-only.

**Non-finite values** never reach the parameters or the optimiser state: ``on_nonfinite="skip"``
skips the step and the record says why; ``"raise"`` raises :class:`~hypergrad.NonFiniteError`.

**Data parallelism.** Under ``torchrun`` pass plain modules, not ``DistributedDataParallel``: the
problem averages every gradient and Hessian-vector product over ranks
(:mod:`hypergrad.distributed`) and broadcasts rank 0's parameters at construction.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Literal, Optional

import torch
from torch import Tensor, nn

from ._checks import check_callable, check_choice
from .checkpoint import get_rng_state, set_rng_state
from .distributed import all_reduce_mean, broadcast_module, world_size
from .level import Level
from .methods import AbstractHypergradMethod, MethodState, _wide
from .modules import BUFFER_POLICIES, BufferPolicy, stateless
from .records import NonFiniteError, SolveInfo, StepCallback, StepRecord
from .tree import tree_norm

__all__ = ["BilevelProblem"]

LossFn = Callable[[nn.Module, nn.Module, Any], Tensor]
_FORMAT = "hypergrad.BilevelProblem/1"


class _LossHost(nn.Module):
    """Holds both levels so one ``functional_call`` swaps the parameters of both for a whole loss."""

    def __init__(self, inner: nn.Module, outer: nn.Module, loss: LossFn):
        super().__init__()
        self.inner, self.outer = inner, outer
        self._loss = loss

    def forward(self, batch: Any) -> Tensor:
        return self._loss(self.inner, self.outer, batch)


def _check_loss(name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1 or not value.is_floating_point():
        got = (
            f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            if isinstance(value, Tensor)
            else type(value).__name__
        )
        raise TypeError(f"`{name}` must return a floating-point scalar tensor, got {got}; reduce it with .mean().")
    return value.reshape(())


class BilevelProblem:
    r"""A bilevel problem over ``nn.Module`` s, trained with ``torch.optim`` optimisers in your loop.

    .. math::

        \theta \leftarrow \mathrm{opt}_{\text{inner}}\big(\theta, \nabla_\theta G(\theta, \lambda; b_k)\big),
        \ k = 1..K;\qquad
        \lambda \leftarrow \mathrm{opt}_{\text{outer}}\big(\lambda, \widehat{\nabla_\lambda F}\big)

    where :math:`\widehat{\nabla_\lambda F}` is the method's hypergradient (e.g. implicit:
    :math:`\partial_\lambda F - \partial^2_{\lambda\theta}G\,(\nabla^2_\theta G)^{-1}\nabla_\theta F`).

    Args:
        inner: the lower level (:class:`~hypergrad.Level`: modules, optimiser, scheduler, clipping).
        outer: the upper level.
        inner_loss: :math:`G`, ``inner_loss(inner_module, outer_module, batch) -> scalar``.
            With :class:`~hypergrad.Proximal` return the loss without the proximal term.
        outer_loss: :math:`F`, ``outer_loss(inner_module, outer_module, batch) -> scalar``.
        method: :class:`~hypergrad.Implicit`, :class:`~hypergrad.Proximal` or
            :class:`~hypergrad.Unrolled` (any :class:`~hypergrad.AbstractHypergradMethod`).
        buffers: buffer policy of the hypergradient passes, ``"batch_stats"`` or ``"running_stats"``.
        on_nonfinite: ``"skip"`` or ``"raise"`` (see the module docstring).
        distributed: average over ``torch.distributed`` ranks; ``None`` (default) = when initialised
            with more than one rank.
        callbacks: callables receiving every :class:`~hypergrad.StepRecord` (progress bars, loggers).

    Example:
        >>> import torch, hypergrad
        >>> w, lam = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        >>> G = lambda i, o, x: ((i.weight - o.weight) ** 2).sum()   # w* = lam
        >>> F = lambda i, o, x: ((i.weight - 2.0) ** 2).sum()         # best lam = 2
        >>> problem = hypergrad.BilevelProblem(
        ...     inner=hypergrad.Level(w, torch.optim.SGD(w.parameters(), lr=0.4)),
        ...     outer=hypergrad.Level(lam, torch.optim.SGD(lam.parameters(), lr=0.25)),
        ...     inner_loss=G, outer_loss=F, method=hypergrad.Implicit(solver=hypergrad.CG(max_steps=2)))
        >>> for _ in range(30):
        ...     record = problem.step([None] * 5, None)
        >>> round(lam.weight.item(), 3), record.solve.status
        (2.0, 'fixed_budget')
    """

    def __init__(
        self,
        inner: Level,
        outer: Level,
        inner_loss: LossFn,
        outer_loss: LossFn,
        method: AbstractHypergradMethod,
        *,
        buffers: BufferPolicy = "batch_stats",
        on_nonfinite: Literal["skip", "raise"] = "skip",
        distributed: Optional[bool] = None,
        callbacks: Iterable[StepCallback] = (),
    ):
        for name, level in (("inner", inner), ("outer", outer)):
            if not isinstance(level, Level):
                raise TypeError(f"`{name}` must be a hypergrad.Level(module, optimizer), got {type(level).__name__}.")
        check_callable("inner_loss", inner_loss, "(inner, outer, batch) -> scalar tensor")
        check_callable("outer_loss", outer_loss, "(inner, outer, batch) -> scalar tensor")
        if not isinstance(method, AbstractHypergradMethod):
            hint = " Pass an object, e.g. method=hypergrad.Implicit(solver=hypergrad.CG(max_steps=10))."
            raise TypeError(
                f"`method` must be a hypergrad method (Implicit, Proximal, Unrolled), got {method!r}.{hint}"
            )
        check_choice("buffers", buffers, BUFFER_POLICIES)
        check_choice("on_nonfinite", on_nonfinite, ("skip", "raise"))
        if distributed not in (None, True, False):
            raise TypeError(f"`distributed` must be None, True or False, got {distributed!r}.")
        if distributed and world_size() == 1:
            raise ValueError(
                "`distributed=True` but torch.distributed is not initialised with more than one rank; "
                "call torch.distributed.init_process_group first (e.g. under torchrun) or pass distributed=None."
            )
        callbacks = list(callbacks)
        for cb in callbacks:
            if not callable(cb):
                raise TypeError(f"`callbacks` must hold callables record -> None, got {type(cb).__name__}.")
        shared = {id(p) for p in inner.module.parameters()} & {id(p) for p in outer.module.parameters()}
        if shared:
            raise ValueError(
                f"`inner` and `outer` share {len(shared)} parameter tensor(s); each parameter must belong to one level."
            )
        self.inner, self.outer = inner, outer
        self.inner_loss, self.outer_loss = inner_loss, outer_loss
        self.method = method
        self.buffers: BufferPolicy = buffers
        self.on_nonfinite = on_nonfinite
        self.distributed = world_size() > 1 if distributed is None else distributed
        self.callbacks: list[StepCallback] = callbacks
        self._inner_params = inner.trained_parameters()
        self._outer_params = outer.trained_parameters()
        method.check(self._inner_params, self._outer_params)
        self._G = stateless(_LossHost(inner.module, outer.module, inner_loss), buffers=buffers)
        self._F = stateless(_LossHost(inner.module, outer.module, outer_loss), buffers=buffers)
        self.method_state = MethodState()
        self.inner_steps = self.outer_steps = self.inner_skipped = self.outer_skipped = 0
        self._last_inner_batch: Any = None
        self._operator_batch: Any = None
        self._pending_skip: Optional[str] = None
        if self.distributed:
            broadcast_module([inner.module, outer.module])

    # ------------------------------------------------------------------ public calls
    def step(self, inner_batches: Iterable[Any], outer_batch: Any, hessian_batch: Any = None) -> StepRecord:
        """Inner steps on each of ``inner_batches``, then the hypergradient and one outer step.

        Args:
            inner_batches: a list (or iterator) of batches, one inner optimiser step each.
            outer_batch: the batch of ``outer_loss``.
            hessian_batch: the batch of the inner loss used for the Hessian (and mixed) products;
                default: the last inner batch.

        Returns:
            A :class:`~hypergrad.StepRecord` with phase ``"step"``. A skipped (non-finite) inner
            step does not stop the outer step; a skipped hypergradient skips the outer step.

        Example:
            See the class docstring (a loop of ``step`` calls tuning :math:`\\lambda`).
        """
        if isinstance(inner_batches, (Tensor, tuple, dict)) or not isinstance(inner_batches, Iterable):
            raise TypeError(
                f"`inner_batches` must be a list or iterator of batches, got {type(inner_batches).__name__}; "
                "for a single batch pass [batch]."
            )
        record = StepRecord("step")
        for batch in inner_batches:
            self._inner(batch, record)
        self._hypergradient(outer_batch, hessian_batch, record, accumulate=False)
        self._outer(record)
        return self._emit(record)

    def inner_step(self, batch: Any) -> StepRecord:
        r"""One inner optimiser step on ``batch`` (plus the method's proximal term, if any).

        .. math:: \theta \leftarrow \mathrm{opt}_{\text{inner}}\big(\theta, \nabla_\theta G(\theta, \lambda; b)\big)

        Args:
            batch: the batch passed to ``inner_loss``.

        Returns:
            A :class:`~hypergrad.StepRecord` with phase ``"inner"`` and the loss in
            ``inner_losses``; a non-finite loss or gradient skips the step (``skipped``,
            ``reason``) or raises, as ``on_nonfinite`` says.

        Example:
            See :meth:`hypergradient` (a hand-written loop of ``inner_step``, ``hypergradient``
            and ``outer_step``).
        """
        record = StepRecord("inner")
        self._inner(batch, record)
        return self._emit(record)

    def hypergradient(self, outer_batch: Any, hessian_batch: Any = None, *, accumulate: bool = False) -> StepRecord:
        """Compute the hypergradient and write it into ``.grad`` of the outer parameters.

        Clip, inspect or add to the gradients afterwards, then call :meth:`outer_step`.

        Args:
            outer_batch: batch of ``outer_loss``.
            hessian_batch: batch of ``inner_loss`` for the Hessian; default: the last inner batch.
            accumulate: add to existing ``.grad`` instead of overwriting it (e.g. summing over the
                tasks of a meta-batch). A non-finite hypergradient clears all outer ``.grad`` and
                makes the next :meth:`outer_step` a skip.

        Returns:
            A :class:`~hypergrad.StepRecord` with phase ``"hypergradient"``: ``outer_loss``,
            ``solve``, ``num_hvps``, ``hypergrad_norm``.

        Example:
            A hand-written loop, with a callback (what :meth:`step` does in one call):

            >>> import torch, hypergrad
            >>> w, lam = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.ones(1))
            >>> level = lambda p, lr: hypergrad.Level({"p": p}, torch.optim.SGD([p], lr=lr))
            >>> problem = hypergrad.BilevelProblem(level(w, 0.5), level(lam, 0.1),  # G: w* = lam
            ...     lambda i, o, b: ((i.p - o.p) ** 2).sum(), lambda i, o, b: ((i.p - 2.0) ** 2).sum(),
            ...     hypergrad.Implicit(solver=hypergrad.Dense()))
            >>> problem.add_callback(lambda record: print(record.phase, record.inner_steps))
            >>> problem.inner_step(None).inner_losses, w.item()   # w <- w - 0.5 * 2 (w - lam)
            inner 1
            ([1.0], 1.0)
            >>> record = problem.hypergradient(None)             # dF/dlam = 2 (w - 2) = -2
            hypergradient 1
            >>> lam.grad, record.outer_loss, record.solve.status
            (tensor([-2.]), 1.0, 'success')
            >>> record = problem.outer_step()                   # lam <- 1 - 0.1 * (-2)
            outer 1
            >>> record.outer_steps, round(lam.item(), 4)
            (1, 1.2)
        """
        record = StepRecord("hypergradient")
        self._hypergradient(outer_batch, hessian_batch, record, accumulate=accumulate)
        return self._emit(record)

    def outer_step(self, outer_batch: Any = None, hessian_batch: Any = None) -> StepRecord:
        """Step the outer optimiser (and scheduler) with the gradients in ``.grad``.

        With ``outer_batch`` the hypergradient is computed first (as :meth:`hypergradient`).

        Args:
            outer_batch: batch of ``outer_loss``; ``None`` uses the ``.grad`` already there.
            hessian_batch: as in :meth:`hypergradient` (only with ``outer_batch``).

        Returns:
            A :class:`~hypergrad.StepRecord` with phase ``"outer"``; ``skipped`` when the last
            hypergradient was non-finite.

        Example:
            See :meth:`hypergradient`.
        """
        record = StepRecord("outer")
        if outer_batch is not None:
            self._hypergradient(outer_batch, hessian_batch, record, accumulate=False)
        self._outer(record)
        return self._emit(record)

    def add_callback(self, callback: StepCallback) -> None:
        """Register ``callback(record)``, called after every public call.

        Args:
            callback: a callable taking a :class:`~hypergrad.StepRecord` (e.g. a
                :class:`~hypergrad.MetricsLogger` or :class:`~hypergrad.ProgressHook`).

        Example:
            See :meth:`hypergradient`.
        """
        if not callable(callback):
            raise TypeError(f"`callback` must be callable record -> None, got {type(callback).__name__}.")
        self.callbacks.append(callback)

    # ------------------------------------------------------------------ phases
    def _inner(self, batch: Any, record: StepRecord) -> None:
        start = time.perf_counter()
        params = self._inner_params
        with torch.enable_grad():
            loss = _check_loss("inner_loss", self.inner_loss(self.inner.module, self.outer.module, batch))
            penalty = self.method.inner_penalty(params, self._outer_params)
            total = loss if penalty is None else loss + penalty
            if not total.requires_grad:
                raise ValueError(
                    "`inner_loss` does not depend on the inner level's trained parameters; compute it "
                    "with the `inner` module it receives (and check that the optimizer holds its parameters)."
                )
            grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
        tree = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}
        tree["__loss__"] = _wide(total).reshape(1)
        tree = self._reduce(tree)
        value = float(tree.pop("__loss__"))
        for k, p in params.items():
            p.grad = tree[k].to(p.dtype)
        reason = None if value == value and abs(value) != float("inf") else f"the inner loss is {value}"
        reason = self._apply(self.inner, "inner", reason)
        record.inner_losses.append(value)
        self._last_inner_batch = batch
        if reason is None:
            self.inner_steps += 1
        else:
            self.inner_skipped += 1
            self._skip(record, reason)
        record.times["inner"] = record.times.get("inner", 0.0) + time.perf_counter() - start

    def _hypergradient(self, outer_batch: Any, hessian_batch: Any, record: StepRecord, *, accumulate: bool) -> None:
        start = time.perf_counter()
        hb = self._last_inner_batch if hessian_batch is None else hessian_batch
        if hb is None and self.inner_steps + self.inner_skipped == 0:
            raise ValueError("no inner step has run yet, so there is no default Hessian batch; pass `hessian_batch=`.")
        theta = {k: p.detach() for k, p in self._inner_params.items()}
        lam = {k: p.detach() for k, p in self._outer_params.items()}
        key = self._operator_key(hb)
        self._pending_skip = None
        try:
            out = self.method.hypergradient(
                self._pure(self._G, hb, "inner_loss"),
                self._pure(self._F, outer_batch, "outer_loss"),
                theta,
                lam,
                self.method_state,
                self._reduce,
                key,
            )
            norm = float(tree_norm(out.grad))
            if norm != norm or norm == float("inf"):
                raise NonFiniteError(f"the hypergradient is non-finite (norm {norm})")
        except NonFiniteError as err:
            for p in self._outer_params.values():
                p.grad = None
            self._pending_skip = str(err)
            record.times["hypergradient"] = time.perf_counter() - start
            self._skip(record, str(err))
            return
        for k, p in self._outer_params.items():
            g = out.grad[k].to(p.dtype)
            p.grad = g if (not accumulate or p.grad is None) else p.grad + g
        record.outer_loss = float(out.outer_loss)
        record.solve = None if out.solution is None else SolveInfo.from_solution(out.solution)
        record.num_hvps += out.num_hvps
        record.operator_reused = out.operator_reused
        record.hypergrad_norm = norm
        record.times["hypergradient"] = time.perf_counter() - start

    def _outer(self, record: StepRecord) -> None:
        start = time.perf_counter()
        if self._pending_skip is not None:
            reason, self._pending_skip = self._pending_skip, None
            self.outer.optimizer.zero_grad(set_to_none=True)
            self.outer_skipped += 1
            if not (record.reason and reason in record.reason):  # not yet reported in this record
                self._skip(record, reason)
        else:
            if all(p.grad is None for p in self._outer_params.values()):
                raise RuntimeError(
                    "outer_step: no outer gradients; call hypergradient(outer_batch) first or pass outer_batch."
                )
            reason = self._apply(self.outer, "outer", None)
            if reason is None:
                self.outer_steps += 1
            else:
                self.outer_skipped += 1
                self._skip(record, reason)
        record.times["outer"] = time.perf_counter() - start

    def _apply(self, level: Level, which: str, reason: Optional[str]) -> Optional[str]:
        """Check, clip and apply the gradients in ``.grad``; clears them. Returns a skip reason."""
        params = [p for p in level.trained_parameters().values() if p.grad is not None]
        if reason is None and params:
            norm = float(
                torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(p.grad, dtype=torch.float64) for p in params])
                )
            )
            if norm != norm or norm == float("inf"):
                reason = f"the {which} gradient is non-finite (norm {norm})"
        if reason is None:
            if level.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, level.max_grad_norm)
            level.optimizer.step()
            if level.scheduler is not None:
                level.scheduler.step()
        level.optimizer.zero_grad(set_to_none=True)
        return reason

    def _skip(self, record: StepRecord, reason: str) -> None:
        if self.on_nonfinite == "raise":
            raise NonFiniteError(f"{reason}; the step was not applied (parameters and optimiser state are unchanged).")
        record.skipped = True
        record.reason = reason if record.reason is None else f"{record.reason}; {reason}"

    def _emit(self, record: StepRecord) -> StepRecord:
        record.inner_steps, record.outer_steps = self.inner_steps, self.outer_steps
        for cb in self.callbacks:
            cb(record)
        return record

    # ------------------------------------------------------------------ helpers
    def _reduce(self, tree: dict[str, Tensor]) -> dict[str, Tensor]:
        return all_reduce_mean(tree) if self.distributed else tree

    @staticmethod
    def _pure(fn: Callable[..., Tensor], batch: Any, name: str) -> Callable[[dict, dict], Tensor]:
        def loss(theta: dict, lam: dict) -> Tensor:
            params = {**{"inner." + k: v for k, v in theta.items()}, **{"outer." + k: v for k, v in lam.items()}}
            return _check_loss(name, fn(params, batch))

        return loss

    def _operator_key(self, hessian_batch: Any) -> tuple:
        """Identifies the linearisation point: parameter versions and the Hessian batch object."""
        if hessian_batch is not self._operator_batch:
            self._operator_batch = hessian_batch  # keep it alive so its id cannot be recycled
        versions = tuple(p._version for p in self._inner_params.values())
        if self.method.hessian_depends_on_outer:
            versions += tuple(p._version for p in self._outer_params.values())
        return (
            id(self._operator_batch),
            versions,
            self.inner_steps,
            self.outer_steps if self.method.hessian_depends_on_outer else 0,
        )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly, as a dict of tensors and plain types.

        Holds the modules, optimisers, schedulers, the warm-start vector, the step counters and
        the RNG states (torch, CUDA, Python, NumPy). As with ``nn.Module.state_dict``, module
        tensors share memory with the live parameters: save it (:func:`hypergrad.save_checkpoint`)
        or ``copy.deepcopy`` it before training on.

        Returns:
            A dict with ``format``, ``{inner,outer}_{module,optimizer,scheduler}``, ``warm_start``,
            ``counters`` and ``rng``.

        Example:
            See :meth:`load_state_dict`.
        """
        sched = lambda s: None if s is None else s.state_dict()
        x0 = self.method_state.x0
        return {
            "format": _FORMAT,
            "inner_module": self.inner.module.state_dict(),
            "outer_module": self.outer.module.state_dict(),
            "inner_optimizer": self.inner.optimizer.state_dict(),
            "outer_optimizer": self.outer.optimizer.state_dict(),
            "inner_scheduler": sched(self.inner.scheduler),
            "outer_scheduler": sched(self.outer.scheduler),
            "warm_start": None if x0 is None else {k: v.detach().cpu() for k, v in x0.items()},
            "counters": {
                "inner_steps": self.inner_steps,
                "outer_steps": self.outer_steps,
                "inner_skipped": self.inner_skipped,
                "outer_skipped": self.outer_skipped,
            },
            "rng": get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any], *, restore_rng: bool = True) -> None:
        """Restore from :meth:`state_dict` (cached operators are dropped and rebuilt on demand).

        Args:
            state: a :meth:`state_dict` of a problem built the same way (same modules, optimisers
                and schedulers), e.g. from :func:`hypergrad.load_checkpoint`.
            restore_rng: also restore the random generators (needed for a bit-exact resume).

        Example:
            >>> import torch, hypergrad
            >>> w, lam = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.ones(1))
            >>> level = lambda p, lr: hypergrad.Level({"p": p}, torch.optim.SGD([p], lr=lr))
            >>> problem = hypergrad.BilevelProblem(level(w, 0.5), level(lam, 0.1),  # G: w* = lam
            ...     lambda i, o, b: ((i.p - o.p) ** 2).sum(), lambda i, o, b: ((i.p - 2.0) ** 2).sum(),
            ...     hypergrad.Implicit(solver=hypergrad.Dense()))
            >>> import copy
            >>> saved = copy.deepcopy(problem.state_dict())
            >>> saved["counters"]
            {'inner_steps': 0, 'outer_steps': 0, 'inner_skipped': 0, 'outer_skipped': 0}
            >>> _ = problem.step([None], None)
            >>> problem.load_state_dict(saved)
            >>> problem.outer_steps, lam.item()
            (0, 1.0)
        """
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"`state` is not a BilevelProblem.state_dict() (expected format {_FORMAT!r}).")
        for which, level in (("inner", self.inner), ("outer", self.outer)):
            level.module.load_state_dict(state[f"{which}_module"])
            level.optimizer.load_state_dict(state[f"{which}_optimizer"])
            saved = state[f"{which}_scheduler"]
            if (saved is None) != (level.scheduler is None):
                raise ValueError(
                    f"the checkpoint {'has no' if saved is None else 'has an'} {which} scheduler but this problem "
                    f"{'has one' if saved is None else 'has none'}; build the problem as it was saved."
                )
            if saved is not None:
                level.scheduler.load_state_dict(saved)
        device = next(iter(self._inner_params.values())).device
        x0 = state["warm_start"]
        self.method_state = MethodState(x0=None if x0 is None else {k: v.to(device) for k, v in x0.items()})
        for k, v in state["counters"].items():
            setattr(self, k, int(v))
        self._last_inner_batch = None
        if restore_rng:
            set_rng_state(state["rng"])
