"""The public API: explicit re-exports, documented, and the only thing applications may import."""

from __future__ import annotations

import ast
import importlib
import inspect
import typing
from pathlib import Path

import pytest

import hypergrad
import hypergrad.solvers

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = [hypergrad, hypergrad.solvers, hypergrad.tree]


def is_alias_or_constant(obj: object) -> bool:
    """Type aliases (``Mapping[str, Tensor]``, ``Literal[...]``) and constants carry no docstring of
    their own; they are documented where they are defined and must at least exist."""
    return typing.get_origin(obj) is not None or isinstance(obj, (tuple, str, int, float, frozenset))


def public_names() -> list[tuple[str, str]]:
    return [(m.__name__, name) for m in PUBLIC_MODULES for name in m.__all__]


@pytest.mark.parametrize(("module", "name"), public_names(), ids=lambda x: x)
def test_exported_name_exists_and_is_documented(module: str, name: str) -> None:
    mod = importlib.import_module(module)
    assert hasattr(mod, name), f"{module}.__all__ lists {name!r} but it does not exist"
    assert not name.startswith("_"), f"{module}.__all__ exports the private name {name!r}"
    obj = getattr(mod, name)
    if is_alias_or_constant(obj):
        return
    doc = inspect.getdoc(obj)
    assert doc and len(doc.strip()) >= 10, f"{module}.{name} has no docstring"


def test_all_lists_are_unique_and_complete() -> None:
    for mod in PUBLIC_MODULES:
        assert len(mod.__all__) == len(set(mod.__all__)), f"duplicates in {mod.__name__}.__all__"
    # every solver class the solvers package exports is re-exported at the top level
    for name in hypergrad.solvers.__all__:
        assert name in hypergrad.__all__, f"hypergrad.solvers.{name} is not re-exported from hypergrad"


def test_core_callables_have_examples() -> None:
    """The docstring template asks for a runnable Example: checked here for the hypergradient
    functions, the operators and every solver (the core of the API)."""
    core = [
        hypergrad.implicit_grad,
        hypergrad.proximal_grad,
        hypergrad.fixed_point_grad,
        hypergrad.unrolled_grad,
        hypergrad.hvp,
        hypergrad.mixed_hvp,
        hypergrad.HessianOperator,
        hypergrad.Damped,
        hypergrad.FixedPointOperator,
        hypergrad.materialize,
        hypergrad.stateless,
    ]
    core += [
        getattr(hypergrad.solvers, n)
        for n in hypergrad.solvers.__all__
        if inspect.isclass(getattr(hypergrad.solvers, n))
        and issubclass(getattr(hypergrad.solvers, n), hypergrad.AbstractLinearSolver)
        and getattr(hypergrad.solvers, n) is not hypergrad.AbstractLinearSolver
    ]
    missing = [obj.__name__ for obj in core if ">>>" not in (inspect.getdoc(obj) or "")]
    assert not missing, f"core callables without a doctest Example: {missing}"


def _private_hypergrad_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        private = [
            m for m in modules if m.split(".")[0] == "hypergrad" and any(p.startswith("_") for p in m.split(".")[1:])
        ]
        if private:
            bad.append(f"{path}:{node.lineno}: {private[0]}")
    return bad


def test_scanner_catches_private_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import hypergrad._checks\nfrom hypergrad.solvers._base import Status\nfrom hypergrad import _typing\n"
        "from hypergrad import CG\nimport hypergrad\nfrom hypergrad.solvers import Neumann\n"
    )
    assert [hit.split(":")[-2] for hit in _private_hypergrad_imports(sample)] == ["1", "2", "3"]


@pytest.mark.parametrize("folder", ["applications", "benchmarks"])
def test_applications_and_benchmarks_import_only_public_names(folder: str) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    if folder == "applications":
        assert files, "applications/ has no Python files"
    bad = [hit for f in files for hit in _private_hypergrad_imports(f)]
    assert not bad, "private hypergrad imports:\n" + "\n".join(bad)
