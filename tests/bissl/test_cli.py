"""The CLI: --help is true to the code, flags reach the configuration, bad values fail clearly."""

from __future__ import annotations

import pytest

from applications.bissl.cli import build_parser, config_from_args, main
from hypergrad import CG, Neumann


def test_help_lists_the_four_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("pretrain", "bissl", "finetune", "run"):
        assert cmd in out
    import applications.bissl.__main__ as entry  # the `python -m applications.bissl` module

    assert entry.main is main


@pytest.mark.parametrize("cmd", ["pretrain", "bissl", "finetune", "run"])
def test_every_help_flag_parses(cmd):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[cmd]
    text = sub.format_help()
    assert "--preset" in text
    # Every documented option is accepted by the parser (help and code agree).
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.option_strings[0] in text


def test_official_flag_names_reach_the_config():
    p = build_parser()
    args = p.parse_args(
        [
            "bissl",
            "--preset",
            "tiny",
            "--d-dset",
            "fashion_mnist@20",
            "--p-pretext-type",
            "byol",
            "--lam",
            "0.01",
            "--damping",
            "5",
            "--solver-steps",
            "7",
            "--warm-start",
            "--reuse-operator",
            "--alternations",
            "3",
            "--device",
            "cpu",
            "--data-root",
            "/x",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.bissl.downstream == "fashion_mnist@20" and cfg.pretrain.pretext_type == "byol"
    assert cfg.bissl.lam == 0.01 and cfg.bissl.damping == 5.0 and cfg.bissl.alternations == 3
    assert cfg.bissl.solver == CG(max_steps=7) and cfg.bissl.warm_start and cfg.bissl.reuse_operator
    assert cfg.data_root == "/x" and cfg.name == "tiny"
    args = p.parse_args(
        [
            "finetune",
            "--preset",
            "mini",
            "--dset",
            "digits",
            "--backbone-origin",
            "pretext",
            "--num-runs",
            "4",
            "--use-hpo",
            "0",
            "--lr",
            "0.1",
            "--wd",
            "1e-4",
            "--epochs",
            "3",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.finetune.num_runs, cfg.finetune.lr, cfg.finetune.weight_decay, cfg.finetune.epochs) == (4, 0.1, 1e-4, 3)
    args = p.parse_args(
        [
            "run",
            "--preset",
            "demo",
            "--solver",
            "neumann",
            "--tasks",
            "digits, fashion_mnist@5",
            "--pretrain-epochs",
            "2",
            "--ft-epochs",
            "2",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.bissl.solver == Neumann(max_steps=5) and cfg.downstream == ("digits", "fashion_mnist@5")
    assert cfg.pretrain.epochs == 2 and cfg.finetune.epochs == 2


def test_bad_values_fail_with_the_field_name():
    p = build_parser()
    with pytest.raises(ValueError, match="lam"):
        config_from_args(p.parse_args(["bissl", "--preset", "tiny", "--lam", "-1"]))
    with pytest.raises(ValueError, match="pretext_type"):
        config_from_args(p.parse_args(["bissl", "--preset", "tiny", "--p-pretext-type", "mocov3"]))
    with pytest.raises(SystemExit):
        p.parse_args(["finetune", "--preset", "tiny", "--dset", "digits", "--backbone-origin", "scratch"])


def test_missing_pretrained_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="(?i)run the `pretrain` stage first"):
        main(["bissl", "--preset", "tiny", "--out-dir", str(tmp_path)])
