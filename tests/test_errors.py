"""Every bad input in ``tests/registry.py:ERROR_INPUTS`` raises the documented exception and message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.registry import ERROR_INPUTS

#: ERROR_INPUTS held 39 entries before issue 9, which asked for at least twice as many.
_BEFORE_ISSUE_9 = 39


def test_registry_is_large_enough() -> None:
    assert len(ERROR_INPUTS) >= 2 * _BEFORE_ISSUE_9


@pytest.mark.parametrize(("call", "exc_type", "regex"), [e[1:] for e in ERROR_INPUTS], ids=[e[0] for e in ERROR_INPUTS])
def test_error_input(call, exc_type: type[Exception], regex: str) -> None:
    with pytest.raises(exc_type, match=regex):
        call()


def test_messages_name_an_argument() -> None:
    """The convention: the message quotes what was wrong in backticks (`b`, `matvec(v)`, `x0['w']`) or names the file."""
    unnamed = []
    for name, call, exc_type, _ in ERROR_INPUTS:
        with pytest.raises(exc_type) as info:
            call()
        message = str(info.value)
        if not (re.search(r"`[^`]+`", message) or re.search(r"\b[a-z_]+=", message) or "checkpoint '" in message):
            unnamed.append((name, message))
    assert not unnamed


def test_entries_are_well_formed() -> None:
    """Every entry: unique id, a callable, an exception class, a compiling regex."""
    ids = [e[0] for e in ERROR_INPUTS]
    assert len(set(ids)) == len(ids)
    for _, call, exc_type, regex in ERROR_INPUTS:
        assert callable(call) and issubclass(exc_type, Exception)
        re.compile(regex)


def test_guide_page_examples_run(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/guide/errors_and_checkpoints.md: every Python block runs, in order, in one namespace."""
    page = Path(__file__).parents[1] / "docs" / "guide" / "errors_and_checkpoints.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "errors_guide"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page.name}[block {i}]", "exec"), namespace)


@pytest.mark.parametrize("case", ["fn_not_scalar", "direction_keys"])
def test_auto_mode_reports_user_errors_without_falling_back(case: str) -> None:
    """``mode="auto"`` must not take a user error for a missing forward-mode rule (no fallback warning, mode unresolved)."""
    import warnings

    import torch

    import hypergrad

    params = {"w": torch.ones(3, dtype=torch.float64)}
    fn = (lambda p: p["w"] ** 2) if case == "fn_not_scalar" else (lambda p: (p["w"] ** 2).sum())
    v = params if case == "fn_not_scalar" else {"v": torch.ones(3, dtype=torch.float64)}
    op = hypergrad.HessianOperator(fn, params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"`fn` must return a scalar|`v` must have the keys of `params`"):
            op(v)
    assert not [w for w in caught if issubclass(w.category, hypergrad.HVPFallbackWarning)]
    if case == "direction_keys":
        assert op.mode == "auto"  # the bad direction did not resolve the mode
