"""One solver registry drives everything: adding a solver is one file and one registry line.

The proof: copy the package, the test registry, the contract tests and the benchmark registry into
a temporary folder, add a dummy solver file and ONE ``SolverSpec`` line to the copy's
``hypergrad/solvers/_registry.py``, and check in a fresh interpreter that the dummy appears in
``hypergrad.__all__`` and ``hypergrad.solvers.__all__``, in the contract tests' parametrisation
(and passes them), in the benchmarks' parametrisation and in the generated API docs. Nothing is
written outside pytest's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import hypergrad
from hypergrad.solvers._registry import api_markdown
from tests.registry import SOLVERS

ROOT = Path(__file__).resolve().parents[1]

DUMMY = '''
"""A dummy solver: Jacobi iteration on the diagonal probed with ones (only for the registry test)."""

from __future__ import annotations

from dataclasses import dataclass

from .._typing import MatVec, TreeOrTensor
from ._base import AbstractLinearSolver, Solution, Status
from .cg import CG


@dataclass(frozen=True)
class DummySolver(AbstractLinearSolver):
    """Delegates to CG (so that it passes the contract tests).

    Example:
        >>> import torch
        >>> from hypergrad import DummySolver
        >>> DummySolver()(lambda v: 2 * v, torch.ones(1)).x
        tensor([0.5000])
    """

    max_steps: int = 10
    rtol: float = 0.0
    atol: float = 0.0

    symmetric_only = True

    def _solve(self, matvec: MatVec, b: TreeOrTensor, x0: TreeOrTensor | None) -> Solution:
        return CG(max_steps=self.max_steps, rtol=self.rtol, atol=self.atol)(matvec, b, x0)
'''

LINE = '    SolverSpec("DummySolver", "dummy_solver", _tags("symmetric_only", "iterative")),\n'

CHECK = textwrap.dedent(
    """
    import contextlib, io, sys
    import pytest
    import hypergrad
    assert hypergrad.__file__.startswith(sys.argv[1]), hypergrad.__file__
    assert "DummySolver" in hypergrad.__all__ and "DummySolver" in hypergrad.solvers.__all__
    assert hypergrad.DummySolver is hypergrad.solvers.DummySolver
    from tests.registry import SOLVERS
    assert "DummySolver" in [e.name for e in SOLVERS]
    from benchmarks.solvers_registry import METHODS
    assert METHODS["dummy_solver"].solver_class is hypergrad.DummySolver
    from hypergrad.solvers._registry import api_markdown
    from pathlib import Path
    api = Path("docs/api.md").read_text().replace("<!-- registered-solvers -->", api_markdown())
    assert "```{autoclass} hypergrad.DummySolver" in api
    # the contract tests run it (and it passes them)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = pytest.main(["-p", "no:cacheprovider", "-q", "-o", "addopts=", "tests/test_solvers.py",
                            "-k", "DummySolver and contract"])
    assert code == 0 and " passed" in out.getvalue(), out.getvalue()[-3000:]
    # the benchmarks parametrise over it
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = pytest.main(["-p", "no:cacheprovider", "-q", "-o", "addopts=", "benchmarks/bench_solvers.py",
                            "--collect-only", "--preset", "small"])
    assert code == 0 and "ridge-dummy_solver-K4" in out.getvalue(), out.getvalue()[-3000:]
    print("CONSUMERS OK")
    """
)


def _copy_tree(tmp: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.png", "results")
    for folder in ("hypergrad", "benchmarks"):
        shutil.copytree(ROOT / folder, tmp / folder, ignore=ignore)
    (tmp / "tests").mkdir()
    for name in ("__init__.py", "conftest.py", "registry.py", "test_solvers.py"):
        shutil.copy(ROOT / "tests" / name, tmp / "tests" / name)
    (tmp / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "api.md", tmp / "docs" / "api.md")
    shutil.copy(ROOT / "setup.cfg", tmp / "setup.cfg")


def test_dummy_solver_file_plus_one_registry_line_reaches_every_consumer(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    (tmp_path / "hypergrad" / "solvers" / "dummy_solver.py").write_text(DUMMY)
    registry = tmp_path / "hypergrad" / "solvers" / "_registry.py"
    text = registry.read_text()
    anchor = "_REGISTRY: tuple[SolverSpec, ...] = (\n"
    assert text.count(anchor) == 1
    registry.write_text(text.replace(anchor, anchor + LINE))  # the ONE line

    # the copy first; applications/ (used by the benchmark problems) from the repository
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    run = subprocess.run(
        [sys.executable, "-c", CHECK, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0 and "CONSUMERS OK" in run.stdout, run.stderr[-3000:]


def test_consumers_agree_with_the_registry_here() -> None:
    names = [s.name for s in hypergrad.registered_solvers()]
    assert [e.name for e in SOLVERS] == names
    for name in names:
        assert name in hypergrad.__all__ and name in hypergrad.solvers.__all__
        assert f"```{{autoclass}} hypergrad.{name}\n```" in api_markdown()
    assert "<!-- registered-solvers -->" in (ROOT / "docs" / "api.md").read_text()
    from benchmarks.solvers_registry import METHODS

    covered = {m.solver_class for m in METHODS.values()}
    assert {s.load() for s in hypergrad.registered_solvers()} <= covered


def test_registry_entry_errors_name_the_fix() -> None:
    import pytest

    with pytest.raises(TypeError, match=r"hypergrad\.solvers\.cg must define a class Nope deriving from"):
        hypergrad.SolverSpec("Nope", "cg").load()
