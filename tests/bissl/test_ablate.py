"""The ablation command: grid parsing, one change per variant, CG steps 0 = hypergrad.Identity."""

from __future__ import annotations

import pytest

from applications.bissl.ablate import DEFAULT_GRID, parse_grid, variants
from applications.bissl.cli import build_parser
from applications.bissl.config import get_preset
from hypergrad import CG, Identity


def test_variants_change_one_setting_each():
    cfg = get_preset("demo")
    vs = dict(variants(cfg, parse_grid(DEFAULT_GRID)))
    assert set(vs) == {"preset", "lam=1e-3", "lam=1e-2", "damping=10", "damping=100", "cg_steps=0", "cg_steps=5",
                       "steps=8/4", "steps=4/8"}  # fmt: skip
    assert vs["preset"] is cfg
    assert isinstance(vs["cg_steps=0"].bissl.method.solver, Identity)
    assert vs["cg_steps=5"].bissl.method.solver == CG(max_steps=5)
    assert vs["lam=1e-2"].bissl.method.lam == 1e-2 and vs["lam=1e-2"].bissl.method.damping == cfg.bissl.method.damping
    assert (vs["steps=4/8"].bissl.lower_steps, vs["steps=4/8"].bissl.upper_steps) == (4, 8)


@pytest.mark.parametrize("bad", ["alpha=1", "lam=", "steps=4", "lam=abc"])
def test_bad_grids_are_refused(bad):
    with pytest.raises(ValueError, match="--grid"):
        variants(get_preset("tiny"), parse_grid(bad))


def test_ablate_command_parses():
    args = build_parser().parse_args(["ablate", "--preset", "tiny", "--grid", "cg_steps=0", "--num-runs", "2"])
    assert args.grid == "cg_steps=0" and args.finetune__num_runs == 2
