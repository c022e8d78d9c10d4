"""Audit of the applications' command lines: stale outputs are refused or redone, user mistakes are one line + exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from applications.bissl.cli import main as bissl_main
from tests.bissl.test_cli import _pretrained


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _one_line(capsys, code: int, expected: int = 2) -> str:
    err = capsys.readouterr().err.strip()
    assert code == expected and "\n" not in err and "Traceback" not in err, err
    return err


def test_bissl_stage_refuses_to_resume_with_other_settings(tmp_path, capsys):
    pre = _pretrained(tmp_path)
    base = ["bissl", "--preset", "tiny", "--out-dir", str(tmp_path / "out"), "--pretrained", str(pre)]
    assert bissl_main(base) == 0
    done = (tmp_path / "out" / "tiny" / "bissl" / "digits" / "lower_backbone.pt").read_bytes()
    assert bissl_main(base) == 0  # same settings: resumes (nothing left to do), same backbone
    assert (tmp_path / "out" / "tiny" / "bissl" / "digits" / "lower_backbone.pt").read_bytes() == done
    capsys.readouterr()
    # was: the finished checkpoint was loaded and its backbone returned as the --lam 0.5 result
    msg = _one_line(capsys, bissl_main([*base, "--lam", "0.5"]))
    assert "bissl.method.lam: 0.001 -> 0.5" in msg and "--no-resume" in msg
    # another pretext checkpoint (same shapes) is refused as well
    other = tmp_path / "other.pt"
    sd = torch.load(pre, weights_only=True)
    sd["backbone"] = {k: v + 1 if v.is_floating_point() else v for k, v in sd["backbone"].items()}
    torch.save(sd, other)
    msg = _one_line(capsys, bissl_main([*base[:-1], str(other)]))
    assert "pretrained:" in msg
    assert bissl_main([*base, "--lam", "0.5", "--no-resume"]) == 0


def _finetune(tmp_path, *flags: str) -> int:
    pre = tmp_path / "pre.pt"
    if not pre.exists():
        pre = _pretrained(tmp_path)
    argv = ["finetune", "--preset", "tiny", "--out-dir", str(tmp_path / "out"), "--dset", "digits"]
    return bissl_main([*argv, "--backbone-origin", "pretext", "--backbone", str(pre), *flags])


def test_finetune_refuses_stale_state_and_no_resume_redoes_it(tmp_path, capsys):
    assert _finetune(tmp_path) == 0
    state_path = tmp_path / "out" / "tiny" / "finetune" / "digits" / "pretext" / "state.json"
    state = json.loads(state_path.read_text())
    assert len(state["runs"]) == 2
    capsys.readouterr()
    # was: the two runs trained with batch size 32 were reported as the batch-size-8 result
    msg = _one_line(capsys, _finetune(tmp_path, "--ft-batch-size", "8"))
    assert "finetune.batch_size: 32 -> 8" in msg and "--no-resume" in msg
    # fewer runs than saved: the result holds that many (was: all saved runs)
    assert _finetune(tmp_path, "--num-runs", "1") == 0
    assert "over 1 runs" in capsys.readouterr().out
    state["runs"] = [123.0, 123.0]  # a marker: --no-resume must not report saved runs
    state_path.write_text(json.dumps(state))
    assert _finetune(tmp_path, "--no-resume") == 0
    assert 123.0 not in json.loads(state_path.read_text())["runs"]
    capsys.readouterr()
    # a folder as --backbone: the checkpoint reader's message (not an OS error from hashing it)
    assert "is a directory, not a checkpoint file" in _one_line(capsys, _finetune(tmp_path, "--backbone", "/"))
    # was: torch's "Invalid learning rate: -1.0" after the output folder was made
    msg = _one_line(capsys, _finetune(tmp_path, "--use-hpo", "0", "--lr", "-1"))
    assert "FinetuneConfig: `lr` must be a finite number > 0, got -1.0" in msg


def test_run_no_resume_redoes_fine_tuning(tmp_path, capsys):
    argv = ["run", "--preset", "tiny", "--out-dir", str(tmp_path), "--no-progress", "--arms", "pretext"]
    assert bissl_main(argv) == 0
    state_path = tmp_path / "tiny" / "finetune" / "digits" / "pretext" / "state.json"
    state = json.loads(state_path.read_text())
    state["runs"] = [123.0, 123.0]
    state_path.write_text(json.dumps(state))
    # was: `run --no-resume` ("start every stage afresh") reported the saved fine-tuning runs
    assert bissl_main([*argv, "--no-resume"]) == 0
    results = json.loads((tmp_path / "tiny" / "results.json").read_text())["results"]
    assert 123.0 not in results[0]["test_top1"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lam", "nan"], "`lam` must be a number > 0, got nan"),
        (["--seeds", "0"], "`seeds` must be a positive int"),
        (["--device", "nonsense"], "--device 'nonsense' is not a device"),
    ],
)
def test_umm_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, flags, message):
    from applications.umm.cli import main as umm_main

    # was: a ValueError traceback and exit code 1
    argv = ["pretrain", "--preset", "tiny", "--run-dir", str(tmp_path), "--no-progress", *flags]
    msg = _one_line(capsys, umm_main(argv))
    assert msg.startswith("python -m applications.umm pretrain: error:") and message in msg
    with pytest.raises(ValueError):
        umm_main(["--debug", *argv])


def test_umm_foreign_checkpoint_is_one_line(tmp_path, capsys):
    from applications.umm.cli import main as umm_main

    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    # was: an UnpicklingError traceback from torch.load
    argv = ["finetune", "--preset", "tiny", "--run-dir", str(tmp_path), "--checkpoint", str(bad), "--no-progress"]
    assert "is not a readable checkpoint" in _one_line(capsys, umm_main(argv))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ridge-lr", "nan"], "--ridge-lr must be a finite number > 0, got nan"),
        (["--logistic-lr", "inf"], "--logistic-lr must be a finite number > 0, got inf"),
        (["--device", "nonsense"], "--device 'nonsense' is not a device"),
        (["--csv", "."], "--csv '.': pass a file path in an existing folder"),
        (["--csv", "no/such/folder/x.csv"], "pass a file path in an existing folder"),
    ],
)
def test_toy_bad_values_are_refused_before_the_run(capsys, flags, message):
    from applications.toy.__main__ import parse_args

    # was: a traceback from inside the solvers (nan/inf), or from the CSV write after the whole run
    with pytest.raises(SystemExit) as exc:
        parse_args(["--no-progress", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and message in err[-1] and not any("Traceback" in line for line in err)


def test_text_pretrain_and_stage_refuse_other_settings(tmp_path, capsys):
    base = ["--modality", "text", "--preset", "tiny", "--out-dir", str(tmp_path)]
    assert bissl_main(["pretrain", *base]) == 0
    capsys.readouterr()
    # was: the saved 15-step model was returned as the --pretrain-steps 7 model
    msg = _one_line(capsys, bissl_main(["pretrain", *base, "--pretrain-steps", "7"]))
    assert "pretrain.steps: 15 -> 7" in msg and "--no-resume" in msg
    stage = ["bissl", *base, "--d-dset", "reuters_r8"]
    assert bissl_main(stage) == 0
    capsys.readouterr()
    # was: the finished stage checkpoint was resumed and saved as the --lam 0.5 stage
    msg = _one_line(capsys, bissl_main([*stage, "--lam", "0.5"]))
    assert "bissl.method.lam: 0.001 -> 0.5" in msg
    assert bissl_main(["pretrain", *base, "--no-resume"]) == 0  # a new pretrained model: the stage is stale
    capsys.readouterr()
    assert "pretrained:" in _one_line(capsys, bissl_main(stage))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--inner-lr", "nan"], "--inner-lr must be a finite number > 0, got nan"),
        (["--damping", "nan"], "--damping must be a finite number >= 0, got nan"),
        # was: "no inner step has been applied yet, so there is no default Hessian batch" (a traceback)
        (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0, got inf"),
        (["--device", "nonsense"], "--device 'nonsense' is not a device"),
    ],
)
def test_hyper_cleaning_bad_values_are_refused(capsys, flags, message):
    from applications.toy.hyper_cleaning import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and message in err[-1]


@pytest.mark.parametrize("modality", [[], ["--modality", "text"]])
def test_device_and_folder_mistakes_are_exit_2_in_both_modalities(tmp_path, capsys, modality):
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["bissl", *modality, "--preset", "tiny", "--out-dir", str(tmp_path / "out")]
    cases = [(["--log-dir", str(afile)], "--log-dir"), (["--device", "nonsense"], "is not a device")]
    if not torch.backends.mps.is_available():  # was: exit code 1, torch's "not linked with support for mps"
        cases.append((["--device", "mps"], "--device mps: MPS is not available"))
    if not torch.cuda.is_available():  # text was: exit code 1, torch's "Found no NVIDIA driver"
        cases.append((["--device", "cuda"], "--device cuda: no CUDA GPU"))
    for flags, message in cases:
        assert message in _one_line(capsys, bissl_main([*base, *flags])), flags
    # text was: "--model-path '<file>/text-tiny/pretrain/model' is not a local folder"
    assert "is a file, not a folder" in _one_line(capsys, bissl_main([*base[:-1], str(afile)]))


@pytest.mark.parametrize("modality", [[], ["--modality", "text"]])
def test_empty_task_list_is_refused(tmp_path, capsys, modality):
    # was: `run --tasks ,` pretrained, then wrote an empty results table with exit code 0
    argv = ["run", *modality, "--preset", "tiny", "--out-dir", str(tmp_path), "--tasks", ","]
    assert "--tasks ',' names no task" in _one_line(capsys, bissl_main(argv))
    assert not (tmp_path / "tiny").exists() and not (tmp_path / "text-tiny").exists()


def test_bad_ablation_grid_value_fails_before_any_stage(tmp_path, capsys):
    argv = ["ablate", "--preset", "tiny", "--out-dir", str(tmp_path), "--grid", "lam=abc"]
    # was: pretraining and the baseline fine-tuning ran first, then the same error
    assert "--grid: lam='abc'" in _one_line(capsys, bissl_main(argv))
    assert not (tmp_path / "tiny" / "pretrain").exists()
