r"""The :class:`BilevelProblem` class: construction and the public calls.

The work is done elsewhere in this package: ``_phases`` (inner step, hypergradient, outer step),
``_policy`` (non-finite values, failed solves), ``_transaction`` (undo of a skipped or raising
phase), ``reduction`` (combining processes), ``_state`` (state dict) and ``_validate`` (inputs).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, cast

from torch import nn

from .._checks import check_callable, check_choice
from ..fsdp.bilevel import _is_sharded, replicated_part, sharded_levels
from ..level import Level
from ..methods import AbstractHypergradMethod, MethodState
from ..modules import BUFFER_POLICIES, BufferPolicy, stateless
from ..records import NonFiniteError, StepCallback, StepRecord
from ..solvers import SolverError
from . import _phases
from ._linearisation import NO_BATCH, Linearisation
from ._phases import LossFn
from ._policy import NONFINITE_POLICIES, NonFinitePolicy, StepPolicy, method_failure_policy
from ._state import StateDict
from ._validate import check_batch, check_bool, check_inner_batches, check_modules, check_trainable
from .reduction import AbstractReduction, LocalReduction, reduction_for


class BilevelProblem(StateDict, Linearisation):
    r"""A bilevel problem over ``nn.Module`` s, trained with ``torch.optim`` optimisers in your loop.

    .. math::

        \theta \leftarrow \mathrm{opt}_{\text{inner}}\big(\theta, \nabla_\theta G(\theta, \lambda; b_k)\big),
        \ k = 1..K;\qquad
        \lambda \leftarrow \mathrm{opt}_{\text{outer}}\big(\lambda, \widehat{\nabla_\lambda F}\big)

    where :math:`\widehat{\nabla_\lambda F}` is the method's hypergradient (e.g. implicit:
    :math:`\partial_\lambda F - \partial^2_{\lambda\theta}G\,(\nabla^2_\theta G)^{-1}\nabla_\theta F`).

    **Buffers (BatchNorm).** Inner steps run the modules as they are (running statistics update as
    in any loop). Hypergradient passes run them through :func:`hypergrad.stateless` with the
    ``buffers`` policy: ``"batch_stats"`` (default) normalises with the batch's statistics and never
    reads or writes running statistics; ``"running_stats"`` uses the stored ones, read-only.

    **Nothing half-done.** A phase that is skipped or raises leaves parameters, buffers (BatchNorm
    statistics included), optimiser and scheduler state, counters and the warm-start vector as they
    were. Non-finite values: ``on_nonfinite="skip"`` skips the step and the record says why;
    ``"raise"`` raises :class:`~hypergrad.NonFiniteError`. Failed linear solves are acted on as the
    method's ``on_failure`` says (default: applied with a :class:`~hypergrad.SolveFailedWarning`);
    every one is counted in :attr:`failed_solves` and ``record.solve_failed``.

    **Every outer parameter must reach a loss.** On the first hypergradient the problem checks
    that each parameter of the outer optimiser reaches ``outer_loss`` or ``inner_loss`` (for
    :class:`~hypergrad.Proximal`: ``outer_loss`` or the coupling) and raises ``ValueError`` naming
    those that do not: their hypergradient is zero by construction, and the optimiser would still
    move them (weight decay, momentum), where plain autograd would leave their ``.grad`` at
    ``None``. Leave such parameters out of the outer optimiser. (Not checked under FSDP sharding.)

    **Operator reuse.** With ``reuse_operator=True`` on the method, hypergradients share one Hessian
    operator until the linearisation changes: an applied inner step, an applied outer step (when the
    method's Hessian depends on the outer parameters), :meth:`new_hessian_batch` or
    :meth:`load_state_dict`. A ``hessian_batch=`` passed to a call is used for that call only and
    never reused. If you change the Hessian batch's tensors or the parameters in place yourself,
    call :meth:`new_hessian_batch`.

    **Several processes.** Under ``torchrun`` pass plain modules, not ``DistributedDataParallel``:
    the ``reduction`` strategy (default :class:`~hypergrad.DataParallelMean` when a process group
    with more than one rank exists) averages every gradient and Hessian-vector product over ranks
    and broadcasts rank 0's parameters at construction.

    Args:
        inner: the lower level (:class:`~hypergrad.Level`: modules, optimiser, scheduler, clipping).
        outer: the upper level.
        inner_loss: :math:`G`, ``inner_loss(inner_module, outer_module, batch) -> scalar``.
            With :class:`~hypergrad.Proximal` return the loss without the proximal term.
        outer_loss: :math:`F`, ``outer_loss(inner_module, outer_module, batch) -> scalar``.
        method: :class:`~hypergrad.Implicit`, :class:`~hypergrad.Proximal` or
            :class:`~hypergrad.Unrolled` (any :class:`~hypergrad.AbstractHypergradMethod`).
        buffers: buffer policy of the hypergradient passes, ``"batch_stats"`` or ``"running_stats"``.
        on_nonfinite: ``"skip"`` or ``"raise"``.
        distributed: average over ``torch.distributed`` ranks; ``None`` (default) = when initialised
            with more than one rank. Ignored when ``reduction`` is given.
        callbacks: callables receiving every :class:`~hypergrad.StepRecord` (progress bars, loggers).
        reduction: an :class:`~hypergrad.AbstractReduction` (how processes are combined); default
            from ``distributed``.
        dense_inner: FSDP2 only (``docs/fsdp.md``): an unsharded twin of a ``fully_shard``-ed
            inner module (built on the meta device), which makes ``hvp_mode="auto"`` the exact
            route (double backward through DTensor) instead of finite differences.

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
        >>> round(lam.weight.item(), 3), record.solve.status, problem.failed_solves
        (2.0, 'fixed_budget', 0)
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
        on_nonfinite: NonFinitePolicy = "skip",
        distributed: Optional[bool] = None,
        callbacks: Iterable[StepCallback] = (),
        reduction: Optional[AbstractReduction] = None,
        dense_inner: Optional[nn.Module] = None,
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
        check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
        self.reduction = reduction_for(distributed, reduction)
        if callable(callbacks) or not isinstance(callbacks, Iterable):
            raise TypeError(
                f"`callbacks` must be a list of callables record -> None, got {type(callbacks).__name__}; "
                "for one callback pass callbacks=[fn]."
            )
        callbacks = list(callbacks)
        for cb in callbacks:
            if not callable(cb):
                raise TypeError(f"`callbacks` must hold callables record -> None, got {type(cb).__name__}.")
        inner_module, outer_module = (
            cast(nn.Module, inner.module),
            cast(nn.Module, outer.module),
        )  # Level made them modules
        shared = {id(p) for p in inner_module.parameters()} & {id(p) for p in outer_module.parameters()}
        if shared:
            raise ValueError(
                f"`inner` and `outer` share {len(shared)} parameter tensor(s); each parameter must belong to one level."
            )
        check_modules({"inner": inner_module, "outer": outer_module})
        self.inner, self.outer = inner, outer
        self.inner_loss, self.outer_loss = inner_loss, outer_loss
        self.method = method
        self.buffers: BufferPolicy = buffers
        self.on_nonfinite = on_nonfinite
        self.policy = StepPolicy(on_nonfinite, method_failure_policy(method))
        self.distributed = not isinstance(self.reduction, LocalReduction)
        self.callbacks: list[StepCallback] = callbacks
        self._inner_params = inner.trained_parameters()
        self._outer_params = outer.trained_parameters()
        method.check(self._inner_params, self._outer_params)
        #: the FSDP2 routes when a level is ``fully_shard``-ed (detected once, here), else ``None``
        self._sharded = sharded_levels(
            inner_module, outer_module, self._inner_params, self._outer_params, method, dense_inner
        )
        self._G = stateless(_phases.LossHost(inner_module, outer_module, inner_loss), buffers=buffers)
        self._F = stateless(_phases.LossHost(inner_module, outer_module, outer_loss), buffers=buffers)
        self.method_state = MethodState()
        #: Optimiser steps applied / skipped per level, and failed linear solves (applied or not).
        self.inner_steps = self.outer_steps = self.inner_skipped = self.outer_skipped = self.failed_solves = 0
        self._last_inner_batch: Any = NO_BATCH
        self._declared_batch: Any = None
        self._has_declared = False
        self._pending_skip: Optional[str] = None
        self._reach_checked = False  # every outer parameter reaches a loss (checked on the first hypergradient)
        self._linearisation = 0  # bumped whenever the Hessian operator's linearisation point changes
        # FSDP2 modules are sharded from identical initial values; broadcasting a shard would corrupt it:
        # levels with fully_shard-ed parts broadcast only their plain (replicated) parameters and buffers
        levels: list[nn.Module] = [inner_module, outer_module]
        if self._sharded is not None:
            levels = [m for m in levels if not _is_sharded(m)] + [replicated_part(levels)]
        self.reduction.broadcast(levels)

    # ------------------------------------------------------------------ public calls
    def step(self, inner_batches: Iterable[Any], outer_batch: Any, hessian_batch: Any = None) -> StepRecord:
        """Inner steps on each of ``inner_batches``, then the hypergradient and one outer step.

        Args:
            inner_batches: a list (or iterator) of batches, one inner optimiser step each.
            outer_batch: the batch of ``outer_loss``.
            hessian_batch: the batch of the inner loss used for the Hessian (and mixed) products
                of this call; default: the batch of :meth:`new_hessian_batch`, else the last inner
                batch.

        Returns:
            A :class:`~hypergrad.StepRecord` with phase ``"step"``. A skipped (non-finite) inner
            step does not stop the outer step; a skipped hypergradient skips the outer step. If a
            phase raises, the inner steps of this call before it stay applied (the error says so).

        Example:
            See the class docstring (a loop of ``step`` calls tuning :math:`\\lambda`).
        """
        batches = check_inner_batches(inner_batches)
        check_trainable("inner", self._inner_params)  # here, not per phase: nothing runs before the refusal
        check_trainable("outer", self._outer_params)
        check_batch("outer_batch", outer_batch)
        check_batch("hessian_batch", hessian_batch)
        record = StepRecord("step")
        done = 0
        try:
            for batch in batches:
                _phases.inner(self, batch, record)
                done += 1
            _phases.hypergradient(self, outer_batch, hessian_batch, record, accumulate=False)
            _phases.outer(self, record)
        except (NonFiniteError, SolverError) as err:
            if done and err.args and isinstance(err.args[0], str):
                err.args = (f"{err.args[0]} (step(): the {done} inner step(s) before it in this call were applied.)",)
            raise
        return self._emit(record)

    def inner_step(self, batch: Any) -> StepRecord:
        r"""One inner optimiser step on ``batch`` (plus the method's proximal term, if any).

        .. math:: \theta \leftarrow \mathrm{opt}_{\text{inner}}\big(\theta, \nabla_\theta G(\theta, \lambda; b)\big)

        Args:
            batch: the batch passed to ``inner_loss``.

        Returns:
            A :class:`~hypergrad.StepRecord` with phase ``"inner"`` and the loss in
            ``inner_losses``; a non-finite loss or gradient skips the step (``skipped``,
            ``reason``) or raises, as ``on_nonfinite`` says, leaving every state as it was.

        Example:
            See :meth:`hypergradient` (a hand-written loop of ``inner_step``, ``hypergradient``
            and ``outer_step``).
        """
        check_batch("batch", batch)
        check_trainable("inner", self._inner_params)
        record = StepRecord("inner")
        _phases.inner(self, batch, record)
        return self._emit(record)

    def hypergradient(self, outer_batch: Any, hessian_batch: Any = None, *, accumulate: bool = False) -> StepRecord:
        """Compute the hypergradient and write it into ``.grad`` of the outer parameters.

        Clip, inspect or add to the gradients afterwards, then call :meth:`outer_step`.

        Args:
            outer_batch: batch of ``outer_loss``.
            hessian_batch: batch of ``inner_loss`` for the Hessian of this call (never reused by
                a later call); default: the batch of :meth:`new_hessian_batch`, else the last
                inner batch (both share a cached operator when the method reuses operators).
            accumulate: add to existing ``.grad`` instead of overwriting it (e.g. summing over the
                tasks of a meta-batch). A skipped hypergradient (non-finite, or a failed solve
                under ``on_failure="skip"``) clears all outer ``.grad`` and makes the next
                :meth:`outer_step` a skip.

        Returns:
            A :class:`~hypergrad.StepRecord` with phase ``"hypergradient"``: ``outer_loss``,
            ``solve``, ``num_hvps``, ``hypergrad_norm``, ``solve_failed``.

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
        check_batch("outer_batch", outer_batch)
        check_batch("hessian_batch", hessian_batch)
        check_bool("accumulate", accumulate)
        record = StepRecord("hypergradient")
        _phases.hypergradient(self, outer_batch, hessian_batch, record, accumulate=accumulate)
        return self._emit(record)

    def outer_step(self, outer_batch: Any = None, hessian_batch: Any = None) -> StepRecord:
        """Step the outer optimiser (and scheduler) with the gradients in ``.grad``.

        With ``outer_batch`` the hypergradient is computed first (as :meth:`hypergradient`).

        Args:
            outer_batch: batch of ``outer_loss``; ``None`` uses the ``.grad`` already there.
            hessian_batch: as in :meth:`hypergradient` (only with ``outer_batch``).

        Returns:
            A :class:`~hypergrad.StepRecord` with phase ``"outer"``; ``skipped`` when the last
            hypergradient was skipped or the gradient is non-finite (the scheduler does not
            advance then).

        Example:
            See :meth:`hypergradient`.
        """
        if outer_batch is None and hessian_batch is not None:
            raise ValueError(
                "outer_step: `hessian_batch` is used only with `outer_batch` (to compute the hypergradient "
                "first); pass both, or call hypergradient(outer_batch, hessian_batch) before outer_step()."
            )
        check_batch("outer_batch", outer_batch)
        check_batch("hessian_batch", hessian_batch)
        check_trainable("outer", self._outer_params)  # before the hypergradient, not after it
        record = StepRecord("outer")
        if outer_batch is not None:
            _phases.hypergradient(self, outer_batch, hessian_batch, record, accumulate=False)
        _phases.outer(self, record)
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

    # ------------------------------------------------------------------ helpers
    def _emit(self, record: StepRecord) -> StepRecord:
        record.inner_steps, record.outer_steps = self.inner_steps, self.outer_steps
        record.failed_solves = self.failed_solves
        for cb in self.callbacks:
            cb(record)
        return record
