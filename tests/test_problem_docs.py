"""docs/guide/own_loop.md: every Python block runs, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

GUIDE = Path(__file__).parents[1] / "docs" / "guide" / "own_loop.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_guide_has_the_expected_examples() -> None:
    blocks = _blocks()
    assert len(blocks) >= 6
    assert sum("import lightning" in b for b in blocks) == 1


def test_guide_examples_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "own_loop_guide"}
    # lightning is installed by the [dev]/[all] extras, so every block runs, the Lightning one too.
    for i, block in enumerate(_blocks()):
        exec(compile(block, f"{GUIDE.name}[block {i}]", "exec"), namespace)
    assert namespace["problem"].outer_steps == 47
    assert namespace["module"].problem.outer_steps == 8
