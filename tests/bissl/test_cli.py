"""The CLI: --help is true to the code, flags reach the configuration, bad values fail clearly."""

from __future__ import annotations

import pytest
import torch

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
    assert cfg.bissl.method.lam == 0.01 and cfg.bissl.method.damping == 5.0 and cfg.bissl.alternations == 3
    m = cfg.bissl.method
    assert m.solver == CG(max_steps=7) and m.warm_start and m.reuse_operator
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
    assert cfg.bissl.method.solver == Neumann(max_steps=5) and cfg.downstream == ("digits", "fashion_mnist@5")
    assert cfg.pretrain.epochs == 2 and cfg.finetune.epochs == 2


def test_bad_values_fail_with_the_field_name():
    p = build_parser()
    with pytest.raises(ValueError, match="lam"):
        config_from_args(p.parse_args(["bissl", "--preset", "tiny", "--lam", "-1"]))
    with pytest.raises(ValueError, match="pretext_type"):
        config_from_args(p.parse_args(["bissl", "--preset", "tiny", "--p-pretext-type", "mocov3"]))
    with pytest.raises(SystemExit):
        p.parse_args(["finetune", "--preset", "tiny", "--dset", "digits", "--backbone-origin", "scratch"])


def test_missing_pretrained_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["bissl", "--preset", "tiny", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "Run the `pretrain` stage first" in err
    with pytest.raises(FileNotFoundError, match="(?i)run the `pretrain` stage first"):  # --debug: the real error
        main(["--debug", "bissl", "--preset", "tiny", "--out-dir", str(tmp_path)])


@pytest.mark.parametrize(
    "flags",
    [
        ["--gamma", "nan"],
        ["--gamma", "inf"],
        ["--upper-lr", "nan"],
        ["--upper-wd", "nan"],
        ["--lam", "-inf"],
        ["--threads", "0"],
        ["--alternations", "0"],
        ["--damping-mode", "sometimes"],
        ["--device", "cuda:0"] if not __import__("torch").cuda.is_available() else ["--threads", "-1"],
    ],
)
def test_bad_flags_give_one_line_and_exit_2(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as exc:  # argparse errors exit by themselves ...
        code = main(["bissl", "--preset", "tiny", "--out-dir", str(tmp_path), *flags])
        raise SystemExit(code)  # ... checks after parsing return the code
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("python -m applications.bissl bissl") and "error:" in err[-1]
    assert not any("Traceback" in line for line in err)


def _pretrained(tmp_path, **model):
    import dataclasses

    from applications.bissl.config import get_preset
    from applications.bissl.pretrain import build_pretrain_model

    cfg = get_preset("tiny")
    cfg.model = dataclasses.replace(cfg.model, **model)
    path = tmp_path / "pre.pt"
    torch.save(build_pretrain_model(cfg).checkpoint_state(), path)
    return path


def _one_line_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_checkpoint_files_give_one_line(tmp_path, capsys):
    base = ["bissl", "--preset", "tiny", "--out-dir", str(tmp_path / "out"), "--pretrained"]
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "is empty" in _one_line_error(capsys, [*base, str(empty)])
    good = _pretrained(tmp_path)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "not a readable checkpoint" in _one_line_error(capsys, [*base, str(trunc)])
    foreign = tmp_path / "foreign.pt"
    foreign.write_text("hello, not a checkpoint")
    assert "not a readable checkpoint" in _one_line_error(capsys, [*base, str(foreign)])
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    assert "not a pretext checkpoint" in _one_line_error(capsys, [*base, str(other)])
    bissl_out = tmp_path / "lower_backbone.pt"
    state = torch.load(good, weights_only=True)
    torch.save({"backbone": state["backbone"], "upper_backbone": state["backbone"], "head": {}}, bissl_out)
    assert "BiSSL stage's output" in _one_line_error(capsys, [*base, str(bissl_out)])
    wide = _pretrained(tmp_path, width=8)
    msg = _one_line_error(capsys, [*base, str(wide)])
    assert "does not fit the configured model" in msg and "--width" in msg


def test_stale_stage_checkpoint_hints_no_resume(tmp_path, capsys):
    good = _pretrained(tmp_path)
    stale = tmp_path / "out" / "tiny" / "bissl" / "digits"
    stale.mkdir(parents=True)
    torch.save({"alternation": 1, "problem": {"nonsense": 1}}, stale / "checkpoint.pt")
    msg = _one_line_error(
        capsys, ["bissl", "--preset", "tiny", "--out-dir", str(tmp_path / "out"), "--pretrained", str(good)]
    )
    assert "--no-resume" in msg


def test_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in _one_line_error(capsys, ["bissl", "--preset", "tiny", "--out-dir", str(f)])


def test_solver_flag_builds_the_core_solvers() -> None:
    import hypergrad

    p = build_parser()
    for name, expected in (
        ("minres", hypergrad.MINRES(max_steps=4)),
        ("recycled", hypergrad.RecycledLanczos(basis_size=4, max_steps=4)),
        ("cg", hypergrad.CG(max_steps=4)),
    ):
        args = p.parse_args(["bissl", "--preset", "tiny", "--solver", name, "--solver-steps", "4"])
        assert config_from_args(args).bissl.method.solver == expected, name
