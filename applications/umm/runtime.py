"""Process-level helpers shared by the UMM commands: torchrun/DDP setup, device, threads, seeds."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .config import UMMConfig

__all__ = ["device_of", "init_distributed", "is_main", "rank", "setup", "world"]


def init_distributed() -> bool:
    """Initialise the process group under torchrun (``WORLD_SIZE > 1``): NCCL on CUDA, else gloo."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes files and shows progress."""
    return rank() == 0


def device_of(cfg: UMMConfig) -> torch.device:
    """``cfg.device``, with the local GPU of this rank under torchrun."""
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and world() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def setup(cfg: UMMConfig) -> torch.device:
    """Initialise DDP if launched by torchrun, set the thread count, return the device."""
    init_distributed()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    return device_of(cfg)
