"""Worker for tests/test_fsdp_problem.py: ``BilevelProblem.step()`` with FSDP2 levels on every rank of a gloo group.

``run(rank, world, outdir)`` runs the same bilevel steps with ``Implicit`` (exact and finite-difference
routes) and ``Proximal`` on an FSDP2-sharded MLP and on mixed levels (a sharded backbone and a plain head), each rank holding its slice of the batches, and
writes the hypergradients and updated outer parameters (full tensors) to ``outdir``; the test compares
them with one process on the concatenated batch (tests/fsdp_problem_cases.py builds both).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.fsdp_problem_cases import (
    CASES,
    MIXED_CASES,
    PRECISION_CASES,
    TRANSFORMER_CASES,
    mixed_norms,
    resume_then_step,
    run_case,
    save_then_step,
)


def run(
    rank: int, world: int, outdir: str, cases: Any = CASES + PRECISION_CASES + TRANSFORMER_CASES + MIXED_CASES
) -> None:
    torch.set_num_threads(1)
    init = "file://" + os.path.join(os.path.abspath(outdir), "init")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        out: dict = {name: run_case(name, mesh, rank, world, outdir) for name in cases}
        out["mixed_norms"] = mixed_norms(mesh)
        ckpt = os.path.join(outdir, "ckpt")
        out["expected"] = save_then_step(ckpt, mesh, rank, world)
        out["resumed"] = resume_then_step(ckpt, mesh, rank, world)
        if rank == 0:
            torch.save(out, os.path.join(outdir, "result.pt"))
    finally:
        dist.destroy_process_group()
