"""A training process killed mid-run and resumed from its last checkpoint ends bitwise identical."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from tests.helpers_problem import resume_train, state_leaves

STEPS, SAVE_EVERY, KILL_AFTER = 12, 3, 7


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="uses fork to start the runs quickly")
def test_killed_run_resumes_bitwise(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # torch.optim's lazy imports, once, before forking
    # the uninterrupted reference run
    ref = ctx.Process(
        target=resume_train, args=(str(tmp_path / "ref.pt"), str(tmp_path / "ref_final.pt"), STEPS, SAVE_EVERY)
    )
    ref.start()
    # a run killed (SIGKILL) as soon as it reports iteration KILL_AFTER
    progress = ctx.Queue()
    ckpt, final = tmp_path / "run.pt", tmp_path / "run_final.pt"
    victim = ctx.Process(target=resume_train, args=(str(ckpt), str(final), STEPS, SAVE_EVERY, progress))
    victim.start()
    while progress.get(timeout=120) < KILL_AFTER:
        pass
    victim.kill()
    victim.join()
    ref.join()
    assert victim.exitcode == -9 and ref.exitcode == 0
    assert not final.exists()  # it really died before finishing
    at_kill = torch.load(ckpt)
    killed_at = at_kill["iteration"]
    assert SAVE_EVERY <= killed_at < STEPS
    # resume from the last checkpoint in a fresh process
    resumed = ctx.Process(target=resume_train, args=(str(ckpt), str(final), STEPS, SAVE_EVERY))
    resumed.start()
    resumed.join()
    assert resumed.exitcode == 0
    a, b = state_leaves(torch.load(tmp_path / "ref_final.pt")), state_leaves(torch.load(final))
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    assert a["/counters/outer_steps"] == 2 * STEPS and a["/warm_start/backbone.0.weight"] is not None
    # the run moved: a resume that silently restarted from scratch or skipped steps would differ
    assert not torch.equal(
        a["/outer_module/backbone.0.weight"], at_kill["problem"]["outer_module"]["backbone.0.weight"]
    )
