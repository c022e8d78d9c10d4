"""The README's ridge example written with ``custom_root`` retraces the functional version."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_custom_root_example_equals_the_functional_one(capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README lost its custom_root example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    functional = namespace["h"]["log_lam"].clone()
    exec(compile(blocks[1], "README.md", "exec"), namespace)
    bridge = namespace["log_lam"].detach()
    torch.testing.assert_close(bridge, functional, rtol=1e-10, atol=1e-12)  # 30 identical outer steps
    assert namespace["ridge"].last_solution.converged
    assert "Status.SUCCESS" in capsys.readouterr().out
