"""Every bad input in ``tests/registry.py:ERROR_INPUTS`` raises the documented exception and message."""

from __future__ import annotations

import pytest

from tests.registry import ERROR_INPUTS


def test_registry_is_large_enough() -> None:
    assert len(ERROR_INPUTS) >= 15


@pytest.mark.parametrize(("call", "exc_type", "regex"), [e[1:] for e in ERROR_INPUTS], ids=[e[0] for e in ERROR_INPUTS])
def test_error_input(call, exc_type: type[Exception], regex: str) -> None:
    with pytest.raises(exc_type, match=regex):
        call()
