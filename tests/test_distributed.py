"""Two gloo processes give the same hypergradient as one process on the concatenated batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import hypergrad
from tests.helpers_problem import ddp_case, ddp_worker


@pytest.mark.distributed
def test_two_gloo_ranks_match_one_process_on_the_full_batch(tmp_path: Path) -> None:
    single = ddp_case(0, 1)  # first, so forked workers inherit the warm imports (seconds saved per rank)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method=method
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert set(single) == set(ranks[0])
    for key, ref in single.items():
        for r, res in enumerate(ranks):
            rel = float((res[key] - ref).norm() / ref.norm())
            assert rel <= 1e-6, f"{key} on rank {r}: relative error {rel:.2e}"
        assert torch.equal(ranks[0][key], ranks[1][key])  # ranks agree exactly
    # the hypergradient really depends on the data split (so the test could fail)
    half = ddp_case(0, 2)
    assert float((half["implicit_grad"] - single["implicit_grad"]).norm() / single["implicit_grad"].norm()) > 1e-3


def test_all_reduce_mean_is_identity_without_process_group() -> None:
    tree = {"a": torch.ones(2), "b": torch.zeros(1, dtype=torch.float64)}
    assert hypergrad.distributed.all_reduce_mean(tree) is tree
    assert hypergrad.distributed.world_size() == 1
