"""The suite's own hygiene: a test that changes torch globals does not leak them to the next one."""

from __future__ import annotations

import torch

_SEEN: dict[str, object] = {}


def test_a_changes_globals():
    _SEEN["threads"] = torch.get_num_threads()
    _SEEN["dtype"] = torch.get_default_dtype()
    torch.set_num_threads(1 if torch.get_num_threads() != 1 else 2)
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)


def test_b_sees_them_restored():
    # Runs after test_a (pytest keeps file order); the autouse fixture in conftest.py restored them.
    assert _SEEN, "test_a_changes_globals must run first"
    assert torch.get_num_threads() == _SEEN["threads"]
    assert torch.get_default_dtype() == _SEEN["dtype"]
    assert torch.is_grad_enabled()
