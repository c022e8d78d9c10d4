"""Hypergradient methods for :class:`~hypergrad.BilevelProblem`, one file each (see ``_base``)."""

from ._base import AbstractHypergradMethod as AbstractHypergradMethod
from ._base import MethodOutput as MethodOutput
from ._base import MethodState as MethodState
from ._base import _wide as _wide
from .implicit import Implicit as Implicit
from .proximal import Proximal as Proximal
from .unrolled import Unrolled as Unrolled

__all__ = ["AbstractHypergradMethod", "Implicit", "Proximal", "Unrolled"]
