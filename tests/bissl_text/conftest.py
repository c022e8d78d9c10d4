"""Text BiSSL tests run on one CPU thread (tiny models: thread start-up costs more than it saves)."""

from __future__ import annotations

import pytest

from tests.bissl.conftest import one_thread  # noqa: F401  (registers the fixture for this folder)


@pytest.fixture(autouse=True)
def _one_thread(request: pytest.FixtureRequest) -> None:
    """Every text test runs under the shared :func:`tests.bissl.conftest.one_thread`."""
    request.getfixturevalue("one_thread")
