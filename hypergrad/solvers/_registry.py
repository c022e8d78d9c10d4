r"""The solver registry: the one list that drives exports, contract tests, benchmarks and API docs.

Adding a solver is **one file and one entry**:

1. write ``hypergrad/solvers/<module>.py`` with a final frozen ``AbstractLinearSolver`` subclass
   (docstring with the math, Args and a doctest Example);
2. add one :class:`SolverSpec` line to :data:`_REGISTRY` below.

Every consumer reads this list: ``hypergrad.solvers.__all__`` and ``hypergrad.__all__`` (the class is
imported from its module and re-exported), ``tests/registry.py`` (the contract, reference and
error-message tests of ``tests/test_solvers.py``), ``benchmarks/solvers_registry.py`` (the
solvers x problems benchmark) and the "Linear solvers" section of ``docs/api.md`` (generated at
build time by ``docs/conf.py`` from :func:`api_markdown`). ``tests/test_registry.py`` proves it by
adding a dummy solver file and one line to a copy of the package.

Tags say which generic checks apply:

* ``"iterative"``: has ``max_steps``/``rtol``/``atol``; a fixed budget (``rtol = atol = 0``) runs
  exactly ``max_steps`` matvecs (plus one for ``x0``, plus ``stats["setup_matvecs"]`` spent once per
  operator on a preconditioner or a recycled basis); warm starts apply.
* ``"symmetric_only"``: assumes a symmetric operator (refused for fixed-point systems).
* ``"indefinite"``: also solves symmetric *indefinite* systems (MINRES).
* ``"approximate"``: makes no accuracy claim (Identity): contract tests only.
* ``"unit_step"``: Richardson with step 1 (FixedPoint): needs a spectrum in ``(0, 2)``.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

from ._base import AbstractLinearSolver

__all__ = ["SolverSpec", "SystemInfo", "registered_solvers", "api_markdown"]


@dataclass(frozen=True)
class SystemInfo:
    r"""What a solver factory may know about the system :math:`A x = b` it will be given.

    Used by the registry's factories (tests and benchmarks build every registered solver through
    them) to pick settings a user would pick by hand, e.g. Neumann's step :math:`1/\lambda_{\max}`.

    Attributes:
        lambda_min: a lower bound on the spectrum of :math:`A` (its smallest eigenvalue, > 0 for SPD).
        lambda_max: an upper bound on the spectrum (largest eigenvalue).
        size: the number of unknowns.
        rtol: the requested relative tolerance (0: a fixed budget of ``max_steps``).
        max_steps: the iteration budget; ``None`` lets the factory pick enough to reach ``rtol``.

    Example:
        >>> from hypergrad.solvers import SystemInfo, registered_solvers
        >>> spec = next(s for s in registered_solvers() if s.name == "CG")
        >>> spec.build(SystemInfo(lambda_min=1.0, lambda_max=10.0, size=5, rtol=1e-8)).max_steps
        25
    """

    lambda_min: float
    lambda_max: float
    size: int
    rtol: float = 1e-12
    max_steps: Optional[int] = None


def _krylov_steps(info: SystemInfo) -> int:
    return info.max_steps or 3 * info.size + 10


def _richardson_steps(info: SystemInfo, alpha: float) -> int:
    """Steps for Richardson with step ``alpha`` to shrink the residual by ``rtol`` (with margin)."""
    if info.max_steps:
        return info.max_steps
    q = max(abs(1 - alpha * info.lambda_min), abs(1 - alpha * info.lambda_max))
    target = info.rtol if info.rtol > 0 else 1e-12
    return int(math.ceil(math.log(target) / math.log(q))) + 20


def _iterative(cls: type, info: SystemInfo) -> AbstractLinearSolver:
    return cls(max_steps=_krylov_steps(info), rtol=info.rtol)


def _neumann(cls: type, info: SystemInfo) -> AbstractLinearSolver:
    alpha = 1.0 / info.lambda_max
    return cls(max_steps=_richardson_steps(info, alpha), alpha=alpha, rtol=info.rtol)


def _fixed_point(cls: type, info: SystemInfo) -> AbstractLinearSolver:
    return cls(max_steps=_richardson_steps(info, 1.0), rtol=info.rtol)


def _pcg(cls: type, info: SystemInfo) -> AbstractLinearSolver:
    from .preconditioners import Nystrom

    rank = max(1, min(10, info.size // 4))  # a low rank, as in real use (rank << size)
    return cls(preconditioner=Nystrom(rank=rank), max_steps=_krylov_steps(info), rtol=info.rtol)


def _recycled(cls: type, info: SystemInfo) -> AbstractLinearSolver:
    basis = max(1, min(8, info.size // 4))
    return cls(basis_size=basis, max_steps=_krylov_steps(info), rtol=info.rtol)


def _plain(cls: type, info: SystemInfo) -> AbstractLinearSolver:
    return cls()


@dataclass(frozen=True)
class SolverSpec:
    """One registered solver: where its class lives, its tags, how to configure it for a system.

    Attributes:
        name: the class name, exported as ``hypergrad.<name>`` and ``hypergrad.solvers.<name>``.
        module: the module in ``hypergrad/solvers/`` that defines it (file name without ``.py``).
        tags: which generic checks apply (see the module docstring: ``"iterative"``,
            ``"symmetric_only"``, ``"indefinite"``, ``"approximate"``, ``"unit_step"``).
        configure: ``configure(cls, info) -> solver`` building an instance for a
            :class:`SystemInfo`; the default builds ``cls(max_steps=..., rtol=info.rtol)`` for
            iterative solvers and ``cls()`` otherwise.

    Example:
        >>> import hypergrad
        >>> spec = hypergrad.solvers.SolverSpec("CG", "cg", frozenset({"iterative"}))
        >>> spec.load() is hypergrad.CG
        True
    """

    name: str
    module: str
    tags: frozenset[str] = field(default_factory=frozenset)
    configure: Optional[Callable[[type, SystemInfo], AbstractLinearSolver]] = None

    def load(self) -> type[AbstractLinearSolver]:
        """Import the class from ``hypergrad.solvers.<module>``.

        Returns:
            The solver class.

        Raises:
            TypeError: when the module's ``<name>`` is not an ``AbstractLinearSolver`` subclass.
        """
        mod = importlib.import_module(f"{__package__}.{self.module}")
        cls = getattr(mod, self.name, None)
        if not (isinstance(cls, type) and issubclass(cls, AbstractLinearSolver)):
            raise TypeError(
                f"solver registry entry {self.name!r}: hypergrad.solvers.{self.module} must define a class "
                f"{self.name} deriving from AbstractLinearSolver, got {cls!r}."
            )
        return cls

    def build(self, info: SystemInfo) -> AbstractLinearSolver:
        """An instance configured for ``info`` (what the tests and benchmarks run).

        Args:
            info: what is known about the system.

        Returns:
            A solver instance.
        """
        cls = self.load()
        configure = self.configure or (_iterative if "iterative" in self.tags else _plain)
        return configure(cls, info)


def _tags(*names: str) -> frozenset[str]:
    return frozenset(names)


# ONE LINE PER SOLVER. Order = order in __all__ and in the API docs.
_REGISTRY: tuple[SolverSpec, ...] = (
    SolverSpec("CG", "cg", _tags("symmetric_only", "iterative")),
    SolverSpec("Neumann", "neumann", _tags("iterative"), _neumann),
    SolverSpec("FixedPoint", "fixed_point", _tags("iterative", "unit_step"), _fixed_point),
    SolverSpec("Dense", "dense", _tags()),
    SolverSpec("Identity", "identity", _tags("approximate")),
    SolverSpec("MINRES", "minres", _tags("symmetric_only", "iterative", "indefinite")),
    SolverSpec("PCG", "pcg", _tags("symmetric_only", "iterative"), _pcg),
    SolverSpec("RecycledLanczos", "recycled", _tags("symmetric_only", "iterative"), _recycled),
    SolverSpec("BlockCG", "block_cg", _tags("symmetric_only", "iterative")),
)


def registered_solvers() -> tuple[SolverSpec, ...]:
    """The registered solvers, in export order.

    Returns:
        A tuple of :class:`SolverSpec`; ``spec.load()`` gives the class, ``spec.build(info)`` an
        instance configured for a system.

    Example:
        >>> from hypergrad.solvers import registered_solvers
        >>> [s.name for s in registered_solvers()][:2]
        ['CG', 'Neumann']
    """
    return _REGISTRY


def api_markdown() -> str:
    """The Markdown (MyST) autodoc blocks of every registered solver, for ``docs/api.md``.

    ``docs/conf.py`` substitutes it for the ``<!-- registered-solvers -->`` marker at build time.
    """
    return "".join(f"```{{autoclass}} hypergrad.{s.name}\n```\n\n" for s in _REGISTRY)
