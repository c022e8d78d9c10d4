"""``BilevelProblem.state_dict`` / ``load_state_dict``: validate everything, then write.

A state dict holds the two modules, optimisers and schedulers, the warm-start vector and the
counters; no random-generator state (``torch.optim`` never captures it either: use
:func:`hypergrad.get_rng_state` / :func:`hypergrad.set_rng_state` next to it for a bit-exact
resume). :func:`validate` checks every entry against the live problem and raises one
``ValueError`` listing what mismatched before :func:`load` writes anything, so a half-valid
state dict leaves the problem untouched.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

FORMAT = "hypergrad.BilevelProblem/2"
OLD_FORMATS = ("hypergrad.BilevelProblem/1",)  # held the global RNG state, now ignored
COUNTERS = ("inner_steps", "outer_steps", "inner_skipped", "outer_skipped", "failed_solves")
_LEVEL_KEYS = ("module", "optimizer", "scheduler")
# Optimiser group keys that differ between torch versions or are added by schedulers.
_OPTIONAL_GROUP_KEYS = frozenset(
    {"foreach", "fused", "differentiable", "capturable", "maximize", "decoupled_weight_decay", "initial_lr"}
)
# Optimisers whose state is not elementwise (factored or history lists): tensor shapes not checked.
_NON_ELEMENTWISE = ("Adafactor", "LBFGS")


class StateDict:
    """Mixin of :class:`~hypergrad.BilevelProblem`: ``state_dict`` and ``load_state_dict``."""

    _pending_skip: Optional[str]
    _forget_linearisation: Callable[[], None]  # from Linearisation

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as a dict of tensors and plain types (no RNG state).

        Holds the modules, optimisers, schedulers, the warm-start vector and the counters. Like
        ``torch.optim``, it does not capture the random generators: for a bit-exact resume save
        :func:`hypergrad.get_rng_state` next to it and restore it with
        :func:`hypergrad.set_rng_state`. As with ``nn.Module.state_dict``, module tensors share
        memory with the live parameters: save it (:func:`hypergrad.save_checkpoint`) or
        ``copy.deepcopy`` it before training on.

        Returns:
            A dict with ``format``, ``{inner,outer}_{module,optimizer,scheduler}``, ``warm_start``
            and ``counters``.

        Example:
            See :meth:`load_state_dict`.
        """
        return build(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; everything is checked before anything is written.

        A state dict that does not fit (other keys, shapes or dtypes in a module, another
        optimiser or scheduler, group structure, warm-start vector, counters) raises one
        ``ValueError`` listing every mismatch and leaves the problem untouched. Cached operators
        are dropped; the default Hessian batch is forgotten (pass one or run an inner step).

        Args:
            state: a :meth:`state_dict` of a problem built the same way (same modules, optimisers
                and schedulers), e.g. from :func:`hypergrad.load_checkpoint`.

        Example:
            >>> import copy, torch, hypergrad
            >>> w, lam = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.ones(1))
            >>> level = lambda p, lr: hypergrad.Level({"p": p}, torch.optim.SGD([p], lr=lr))
            >>> problem = hypergrad.BilevelProblem(level(w, 0.5), level(lam, 0.1),  # G: w* = lam
            ...     lambda i, o, b: ((i.p - o.p) ** 2).sum(), lambda i, o, b: ((i.p - 2.0) ** 2).sum(),
            ...     hypergrad.Implicit(solver=hypergrad.Dense()))
            >>> saved = copy.deepcopy(problem.state_dict())
            >>> rng = hypergrad.get_rng_state()           # opt-in, next to the state dict
            >>> saved["counters"]["outer_steps"]
            0
            >>> _ = problem.step([None], None)
            >>> problem.load_state_dict(saved)
            >>> hypergrad.set_rng_state(rng)
            >>> problem.outer_steps, lam.item()
            (0, 1.0)
        """
        validate(self, state)
        load(self, state)
        self._pending_skip = None
        self._forget_linearisation()


def build(problem: Any) -> dict[str, Any]:
    sched = lambda s: None if s is None else s.state_dict()
    x0 = problem.method_state.x0
    return {
        "format": FORMAT,
        "inner_module": problem.inner.module.state_dict(),
        "outer_module": problem.outer.module.state_dict(),
        "inner_optimizer": problem.inner.optimizer.state_dict(),
        "outer_optimizer": problem.outer.optimizer.state_dict(),
        "inner_scheduler": sched(problem.inner.scheduler),
        "outer_scheduler": sched(problem.outer.scheduler),
        "warm_start": None if x0 is None else {k: v.detach().cpu() for k, v in x0.items()},
        "counters": {k: getattr(problem, k) for k in COUNTERS},
    }


def validate(problem: Any, state: Any) -> None:
    """Raise ``ValueError`` naming every mismatch between ``state`` and ``problem``; write nothing."""
    if not isinstance(state, Mapping):
        raise TypeError(f"`state` must be a dict from BilevelProblem.state_dict(), got {type(state).__name__}.")
    fmt = state.get("format")
    if fmt != FORMAT and fmt not in OLD_FORMATS:
        raise ValueError(
            f"`state` is not a BilevelProblem.state_dict() (its 'format' is {fmt!r}, expected {FORMAT!r}); "
            "pass the dict returned by problem.state_dict() (e.g. loaded with hypergrad.load_checkpoint)."
        )
    missing = [f"{w}_{k}" for w in ("inner", "outer") for k in _LEVEL_KEYS if f"{w}_{k}" not in state] + [
        k for k in ("warm_start", "counters") if k not in state
    ]
    if missing:
        raise ValueError(f"`state` lacks the entries {missing}; it is not a complete BilevelProblem.state_dict().")
    problems: list[str] = []
    for which in ("inner", "outer"):
        level = getattr(problem, which)
        problems += _module(which, level.module, state[f"{which}_module"])
        problems += _optimizer(which, level.optimizer, state[f"{which}_optimizer"])
        problems += _scheduler(which, level.scheduler, state[f"{which}_scheduler"])
    problems += _warm_start(problem, state["warm_start"])
    problems += _counters(state["counters"])
    if problems:
        lines = "\n  - ".join(problems)
        raise ValueError(
            f"`state` does not fit this BilevelProblem; nothing was loaded:\n  - {lines}\n"
            "Build the problem exactly as the one that was saved (same modules, dtypes, optimisers, schedulers "
            "and method), or load only the parts you need, e.g. problem.inner.module.load_state_dict(...)."
        )


def load(problem: Any, state: Mapping[str, Any]) -> None:
    """Write a validated ``state`` into ``problem``."""
    if state["format"] in OLD_FORMATS and "rng" in state:
        warnings.warn(
            "this state dict (format 1) holds random-generator states, which load_state_dict no longer "
            "restores; call hypergrad.set_rng_state(state['rng']) yourself for a bit-exact resume.",
            UserWarning,
            stacklevel=3,
        )
    for which in ("inner", "outer"):
        level = getattr(problem, which)
        level.module.load_state_dict(state[f"{which}_module"])
        level.optimizer.load_state_dict(state[f"{which}_optimizer"])
        if level.scheduler is not None:
            level.scheduler.load_state_dict(state[f"{which}_scheduler"])
    x0 = state["warm_start"]
    params = problem.inner.trained_parameters()
    problem.method_state.x0 = (
        None if x0 is None else {k: v.to(device=params[k].device, dtype=params[k].dtype) for k, v in x0.items()}
    )
    for k in COUNTERS:
        setattr(problem, k, int(state["counters"].get(k, 0)))


def _module(which: str, module: torch.nn.Module, saved: Any) -> list[str]:
    where = f"{which}_module"
    if not isinstance(saved, Mapping):
        return [f"{where} is a {type(saved).__name__}, expected a module state dict"]
    live = module.state_dict()
    out = []
    missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing:
        out.append(f"{where} lacks {len(missing)} entries of the module: {missing[:5]}")
    if unexpected:
        out.append(f"{where} has {len(unexpected)} entries the module does not: {unexpected[:5]}")
    for k in sorted(set(live) & set(saved)):
        a, b = live[k], saved[k]
        if not isinstance(a, Tensor):
            continue
        if not isinstance(b, Tensor):
            out.append(f"{where}[{k!r}] is a {type(b).__name__}, expected a tensor")
        elif a.shape != b.shape:
            out.append(f"{where}[{k!r}] has shape {tuple(b.shape)}, the module's has {tuple(a.shape)}")
        elif a.dtype != b.dtype:
            out.append(
                f"{where}[{k!r}] has dtype {b.dtype}, the module's has {a.dtype} (convert the module, "
                f"e.g. module.to({b.dtype}), or the checkpoint)"
            )
    return out


def _optimizer(which: str, opt: torch.optim.Optimizer, saved: Any) -> list[str]:
    where = f"{which}_optimizer"
    if not isinstance(saved, Mapping) or not isinstance(saved.get("param_groups"), list):
        return [f"{where} is not an optimizer state dict (no 'param_groups')"]
    groups, saved_groups = opt.param_groups, saved["param_groups"]
    if len(groups) != len(saved_groups):
        return [f"{where} has {len(saved_groups)} parameter group(s), this optimizer {len(groups)}"]
    out: list[str] = []
    params: dict[Any, Tensor] = {}
    for i, (g, s) in enumerate(zip(groups, saved_groups)):
        ids = s.get("params", []) if isinstance(s, Mapping) else []
        if len(ids) != len(g["params"]):
            out.append(f"{where} group {i} holds {len(ids)} parameters, this optimizer's {len(g['params'])}")
            continue
        params.update(zip(ids, g["params"]))
        diff = sorted((set(s) ^ set(g)) - _OPTIONAL_GROUP_KEYS)
        if diff:
            out.append(
                f"{where} group {i} has other settings ({diff}): it was saved from another optimizer class "
                f"than {type(opt).__name__}"
            )
    if out:
        return out
    state = saved.get("state", {})
    if not isinstance(state, Mapping):
        return [f"{where}['state'] is a {type(state).__name__}, expected a dict"]
    elementwise = type(opt).__name__ not in _NON_ELEMENTWISE
    for pid, entry in state.items():
        if pid not in params:
            out.append(f"{where}['state'] has an entry for parameter id {pid!r}, which no group lists")
            continue
        p = params[pid]
        for key, v in entry.items() if isinstance(entry, Mapping) else ():
            if elementwise and isinstance(v, Tensor) and v.ndim > 0 and v.shape != p.shape:
                out.append(
                    f"{where}['state'][{pid}][{key!r}] has shape {tuple(v.shape)}, its parameter {tuple(p.shape)}"
                )
    return out


def _scheduler(which: str, sched: Any, saved: Any) -> list[str]:
    where = f"{which}_scheduler"
    if (saved is None) != (sched is None):
        has, this = ("has no", "has one") if saved is None else ("has an", "has none")
        return [f"the checkpoint {has} {which} scheduler but this problem {this}; build the problem as it was saved"]
    if sched is None:
        return []
    if not isinstance(saved, Mapping):
        return [f"{where} is a {type(saved).__name__}, expected a scheduler state dict"]
    live = sched.state_dict()
    diff = sorted(set(saved) ^ set(live))
    if diff:
        return [
            f"{where} has other entries ({diff[:5]}): it was saved from another scheduler than {type(sched).__name__}"
        ]
    return []


def _warm_start(problem: Any, x0: Any) -> list[str]:
    if x0 is None:
        return []
    if not isinstance(x0, Mapping):
        return [f"warm_start is a {type(x0).__name__}, expected None or a dict of tensors"]
    params = problem.inner.trained_parameters()
    out = []
    for k, v in x0.items():
        if k not in params:
            out.append(f"warm_start[{k!r}] names no trained inner parameter")
        elif not isinstance(v, Tensor) or v.shape != params[k].shape:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            out.append(f"warm_start[{k!r}] has shape {shape}, the parameter {tuple(params[k].shape)}")
        elif not bool(torch.isfinite(v).all()):  # it would make every warm-started solve non-finite (skipped)
            out.append(f"warm_start[{k!r}] has non-finite values (NaN or Inf)")
    return out


def _counters(counters: Any) -> list[str]:
    if not isinstance(counters, Mapping):
        return [f"counters is a {type(counters).__name__}, expected a dict"]
    out = []
    for k, v in counters.items():
        if k not in COUNTERS:
            out.append(f"counters[{k!r}] is not a counter of BilevelProblem {list(COUNTERS)}")
        elif isinstance(v, bool) or not isinstance(v, int) or v < 0:
            out.append(f"counters[{k!r}] = {v!r}, expected an integer >= 0")
    missing = [k for k in COUNTERS[:4] if k not in counters]
    if missing:
        out.append(f"counters lack {missing}")
    return out
