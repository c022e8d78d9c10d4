"""docs/guide/many_rhs.md: every Python block runs, in order, in one namespace (its asserts are the checks)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

GUIDE = Path(__file__).parents[1] / "docs" / "guide" / "many_rhs.md"


def test_guide_examples_run() -> None:
    torch.set_num_threads(1)
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) == 3
    namespace: dict = {"__name__": "many_rhs_guide"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{GUIDE.name}[block {i}]", "exec"), namespace)
    # the block solve needs fewer products than the separate solves on this ill-conditioned Hessian
    assert namespace["res"].solution.num_matvecs < namespace["cg"].solution.num_matvecs
