"""Undo for the state a phase of :class:`~hypergrad.BilevelProblem` touches before it can fail.

A phase either commits (parameters stepped, counters advanced) or leaves everything as it was.
Parameters and optimiser state need no copies: every phase checks its gradients for non-finite
values *before* the optimiser (and scheduler) step, the only thing that writes them. What a phase
writes before that check is copied here and put back when it is skipped or raises:

* module buffers (a training-mode forward updates BatchNorm's ``running_mean``/``running_var``
  and ``num_batches_tracked``): cheap, buffers are small next to parameters;
* the ``.grad`` tensors the phase replaces (references only, no copies);
* the method state (warm-start vector, cached operator: references only);
* the problem's counters and bookkeeping (plain Python values).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
from torch import Tensor, nn


class Snapshot:
    """Copies taken before a phase; :meth:`restore` puts them back (idempotent).

    Args:
        owner: the object whose ``attrs`` (plain values or references) are saved.
        attrs: attribute names of ``owner``.
        modules: modules whose buffers are copied (``()``: none).
        grads: parameters whose ``.grad`` references are saved.
        method_state: a dataclass whose fields are saved by reference (the method state).
    """

    def __init__(
        self,
        owner: Any,
        attrs: Iterable[str],
        *,
        modules: Iterable[nn.Module] = (),
        grads: Iterable[Tensor] = (),
        method_state: Any = None,
    ):
        self._owner = owner
        self._attrs = {name: getattr(owner, name) for name in attrs}
        self._buffers: list[tuple[nn.Module, str, Tensor, Tensor]] = []
        seen: set[int] = set()
        with torch.no_grad():
            for module in modules:
                for sub in module.modules():
                    for name, buf in sub._buffers.items():
                        if buf is not None and id(buf) not in seen:
                            seen.add(id(buf))
                            self._buffers.append((sub, name, buf, buf.detach().clone()))
        self._grads = [(p, p.grad) for p in grads]
        self._state = method_state
        self._state_fields = None if method_state is None else _fields(method_state)

    def restore(self) -> None:
        """Put every saved value back (buffers copied in place, so references stay valid)."""
        for name, value in self._attrs.items():
            setattr(self._owner, name, value)
        with torch.no_grad():
            for sub, name, buf, saved in self._buffers:
                sub._buffers[name] = buf  # in case the forward replaced the tensor instead of updating it
                buf.copy_(saved)
        for p, g in self._grads:
            p.grad = g
        if self._state is not None and self._state_fields is not None:
            for name, value in self._state_fields.items():
                object.__setattr__(self._state, name, value)


def _fields(state: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(state):
        return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return dict(vars(state))
