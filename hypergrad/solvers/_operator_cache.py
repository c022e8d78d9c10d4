"""A one-slot cache tied to an operator *object* (weakly referenced), for per-operator setup work.

Solvers that spend matvecs once per matrix (a recycled Krylov basis, a preconditioner) keep what
they built here, keyed by the operator object they were called with and by the layout of the
right-hand side. The key is a weak reference to that object, never ``id()`` (an id can be reused by
a new object) and never the tensors' ``_version``; the cache does not keep the operator alive, and
drops its value when the operator is garbage collected. A solver object that is copied or pickled
starts with an empty cache.

Correctness never depends on the key: every solver using it checks the true residual of what it
returns, so a reused setup for a matrix that changed in place costs steps, never accuracy.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Optional

from torch import Tensor

from .._typing import TreeOrTensor

__all__ = ["OperatorCache", "layout"]


def layout(b: TreeOrTensor) -> tuple:
    """Keys, shapes, dtypes and devices of a tree: a cached setup only serves the same layout."""
    if isinstance(b, Tensor):
        return ((None, tuple(b.shape), b.dtype, b.device),)
    return tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in b.items())


def _identity(operator: Callable) -> Callable:
    """The caller's operator object behind the solver entry's checking proxy (see ``_base``)."""
    from ._base import _CheckedMatVec

    while isinstance(operator, _CheckedMatVec):
        operator = operator.wrapped
    return operator


def _forget(cache_ref: weakref.ref, ref: weakref.ref) -> None:
    """The operator behind ``ref`` died: clear the cache (if alive) that still holds ``ref``."""
    cache = cache_ref()
    if cache is not None and ref is cache._ref:
        cache.clear()


class OperatorCache:
    """One entry: ``(weakref(operator), layout) -> value``."""

    def __init__(self) -> None:
        self._ref: Optional[weakref.ref] = None
        self._layout: Optional[tuple] = None
        self._value: Any = None

    def get(self, operator: Callable, b: TreeOrTensor) -> Any:
        """The value stored for this operator object and ``b``'s layout, else ``None``."""
        if self._ref is None or self._ref() is not _identity(operator) or self._layout != layout(b):
            return None
        return self._value

    def put(self, operator: Callable, b: TreeOrTensor, value: Any) -> None:
        """Store ``value`` for ``operator`` (not cached when it cannot be weakly referenced)."""
        self.clear()
        try:
            # the callback reaches the cache by a weak reference: a bound ``self._dead`` would make
            # cache -> ref -> callback -> cache a reference cycle, and a solver dropped before its
            # operator would keep the stored tensors (a basis, a preconditioner) until Python's
            # cyclic garbage collector ran
            self._ref = weakref.ref(_identity(operator), functools.partial(_forget, weakref.ref(self)))
        except TypeError:  # e.g. a builtin: no weak references, no caching
            return
        self._layout, self._value = layout(b), value

    def clear(self) -> None:
        """Forget the stored value."""
        self._ref, self._layout, self._value = None, None, None

    def __reduce__(self) -> tuple:  # copies and pickles start empty
        return (OperatorCache, ())

    def __deepcopy__(self, memo: dict) -> "OperatorCache":
        return OperatorCache()

    def __repr__(self) -> str:
        return "OperatorCache(empty)" if self._value is None else "OperatorCache(filled)"
