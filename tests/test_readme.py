"""The README's code example runs and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_tunes_lambda(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    sol, h, w = namespace["sol"], namespace["h"], namespace["w"]
    assert sol.converged and sol.residual_norm <= 1e-6
    assert float(h["log_lam"]) < 1.0  # the outer loop cut the over-strong penalty (it started at 5)
    final = float(namespace["outer_loss"]({"w": w}, h))
    assert final < 0.2, final  # the README comment claims 4.2 -> 0.15
    assert "Status.SUCCESS" in capsys.readouterr().out
