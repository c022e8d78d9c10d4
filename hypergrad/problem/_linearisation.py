"""Which Hessian a hypergradient uses, and when a cached operator may serve it again.

The problem keeps an integer *linearisation token*, passed to the method with every hypergradient
that uses the declared (or default) Hessian batch. A method with ``reuse_operator=True`` serves its
cached operator only for an equal token. The token changes whenever the linearisation may change:
:meth:`~hypergrad.BilevelProblem.new_hessian_batch` (the caller's word, the only way to report a
batch changed in place or parameters changed outside the problem), an applied inner step, an applied
outer step when the method's Hessian depends on the outer parameters, and ``load_state_dict``. A
``hessian_batch=`` passed to one call gets the token ``None``: never served from, nor stored as, a
cached operator. No object identity or tensor version counter is ever looked at.
"""

from __future__ import annotations

from typing import Any, Optional

from ._validate import check_batch

NO_BATCH: Any = object()  # no inner step applied yet (``None`` is a valid batch)


class Linearisation:
    """Mixin of :class:`~hypergrad.BilevelProblem`: the declared Hessian batch and the token."""

    method_state: Any
    _last_inner_batch: Any
    _declared_batch: Any
    _has_declared: bool
    _linearisation: int

    def new_hessian_batch(self, batch: Any) -> None:
        """Declare the Hessian batch of the following hypergradients; drops any cached operator.

        Call it whenever the linearisation changes in a way the problem cannot see: a new Hessian
        batch, the same batch object after changing its tensors in place, or parameters changed
        outside :meth:`inner_step` / :meth:`outer_step`. Until the next call, hypergradients
        without ``hessian_batch=`` use ``batch``, and with ``reuse_operator=True`` on the method
        they share one Hessian operator while no inner (or, for Hessians that depend on the outer
        parameters, outer) step is applied.

        Args:
            batch: the batch of ``inner_loss`` for the Hessian (and mixed) products.

        Example:
            >>> import torch, hypergrad
            >>> w, lam = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.ones(1))
            >>> level = lambda p, lr: hypergrad.Level({"p": p}, torch.optim.SGD([p], lr=lr))
            >>> problem = hypergrad.BilevelProblem(level(w, 0.5), level(lam, 0.1),
            ...     lambda i, o, b: b * (i.p**2).sum(), lambda i, o, b: ((i.p - 2.0) ** 2).sum(),
            ...     hypergrad.Proximal(lam=1.0, coupling={"p": "p"}, reuse_operator=True))
            >>> problem.new_hessian_batch(torch.tensor(1.0))
            >>> [problem.hypergradient(None).operator_reused for _ in range(2)]
            [False, True]
            >>> problem.new_hessian_batch(torch.tensor(2.0))    # a new linearisation: rebuilt
            >>> problem.hypergradient(None).operator_reused
            False
        """
        check_batch("batch", batch)
        self._declared_batch, self._has_declared = batch, True
        self._linearisation += 1
        _drop_operator(self.method_state)  # free the old graph now

    def _hessian_batch(self, skipped: Optional[str] = None) -> Any:
        """The default Hessian batch; ``skipped`` (why this call's inner steps were skipped) goes into the error."""
        if self._has_declared:
            return self._declared_batch
        if self._last_inner_batch is NO_BATCH:
            why = f" (this call's inner steps were skipped: {skipped})" if skipped else ""
            raise ValueError(
                f"no inner step has been applied yet{why}, so there is no default Hessian batch; pass "
                "`hessian_batch=` or call problem.new_hessian_batch(batch)."
            )
        return self._last_inner_batch

    def _operator_token(self) -> int:
        return self._linearisation

    def _linearisation_changed(self) -> None:
        """An applied step moved the linearisation point: a new token, and the cached operator freed now.

        Tokens only grow, so the old operator can never be served again; dropping it here (not at
        the next hypergradient) frees its graph for the steps in between (a BiSSL alternation's
        lower steps).
        """
        self._linearisation += 1
        _drop_operator(self.method_state)

    def _forget_linearisation(self) -> None:
        """After a load: no default or declared Hessian batch, no cached operator, a new token."""
        self._last_inner_batch, self._declared_batch, self._has_declared = NO_BATCH, None, False
        self._linearisation += 1
        _drop_operator(self.method_state)


def _drop_operator(state: Any) -> None:
    """Forget the cached operator *and* the solver's matvec kept around it (which holds it, graph included)."""
    if getattr(state, "operator", None) is not None:
        object.__setattr__(state, "operator", None)
        object.__setattr__(state, "operator_token", None)
    if getattr(state, "solver_memo", None):
        object.__setattr__(state, "solver_memo", {})
