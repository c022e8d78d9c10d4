"""``BilevelProblem``: bilevel training inside your own loop, with your modules and optimisers.

You write :math:`G` = ``inner_loss(inner, outer, batch)`` and :math:`F` =
``outer_loss(inner, outer, batch)`` and choose a method object (:class:`~hypergrad.Implicit`,
:class:`~hypergrad.Proximal`, :class:`~hypergrad.Unrolled`); the guide "Use hypergrad in your own
loop" walks through it. One concept per file:

* ``_problem``: the class, its construction and public calls;
* ``_phases``: inner step, hypergradient, outer step;
* ``_policy``: what happens on non-finite values and failed linear solves;
* ``_transaction``: the undo of a skipped or raising phase;
* ``reduction``: how several processes are combined (:class:`~hypergrad.AbstractReduction`);
* ``_state``: the validated state dict;
* ``_validate``: checks of the batches and losses a call receives.
"""

from ._problem import BilevelProblem
from .reduction import AbstractReduction, DataParallelMean, LocalReduction

__all__ = ["BilevelProblem", "AbstractReduction", "DataParallelMean", "LocalReduction"]
