"""Command line: ``python -m applications.umm {pretrain,diagnose,finetune,run} --preset NAME [overrides]``.

Every :class:`~applications.umm.config.UMMConfig` field is an option (``--n-pretrain 512``,
``--num-early 3``, ``--lam 1.0``, ``--methods umm,control``, ...) that overrides the preset.

* ``pretrain``: SimCLR with a checkpoint every ``--save-every`` epochs into ``<run-dir>/pretrain``.
* ``diagnose [--checkpoints PATH ...]``: the layer-wise table and plot (default: the checkpoints
  of ``<run-dir>/pretrain``; BiSSL ``pretrained.pt`` files work too) into ``<run-dir>/diagnose``.
* ``finetune [--checkpoint PATH]``: the method comparison over ``--seeds`` seeds (default: the
  last pretraining checkpoint) into ``<run-dir>/finetune``.
* ``run``: all three, then ``<run-dir>/summary_run.json`` with the wall-clock times (each command
  writes its ``summary_<command>.json``).

User mistakes (bad values, missing files, a device that is not there) end with one
``argparse``-style line on stderr and exit code 2; ``--debug`` (before the command) shows the
traceback instead; a failure at run time exits with code 1 and its reason.

Under ``torchrun --nproc-per-node N python -m applications.umm ...`` the batches are split over
ranks (DDP for pretraining, gradient averaging by :class:`hypergrad.BilevelProblem` for
fine-tuning); rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from typing import Any

import torch

from . import runtime
from .config import PRESETS, UMMConfig, get_preset

__all__ = ["build_parser", "config_from_args", "main"]

_SKIP = {"extra", "preset"}


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _opt_int(s: str) -> int | None:
    return None if s.lower() == "none" else int(s)


def _add_config(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="base settings (default: cpu)")
    g = sp.add_argument_group("overrides of the preset")
    for f in dataclasses.fields(UMMConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name == "methods":
            g.add_argument(flag, type=lambda s: tuple(x for x in s.split(",") if x), default=None,
                           help="comma-separated subset of control,umm,umm_fo,umm_align0")  # fmt: skip
        elif f.name == "threads":
            g.add_argument(flag, type=_opt_int, default=None, help="torch threads (none: torch's default)")
        elif isinstance(default, bool):
            g.add_argument(flag, type=_bool, default=None)
        else:
            g.add_argument(flag, type=type(default), default=None)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the four commands."""
    parser = argparse.ArgumentParser(prog="python -m applications.umm", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("pretrain", "SimCLR pretraining with periodic checkpoints"),
                        ("diagnose", "layer-wise memorisation diagnostic"),
                        ("finetune", "bilevel fine-tuning and the method comparison"),
                        ("run", "pretrain, diagnose and finetune")):  # fmt: skip
        sp = sub.add_parser(name, help=help_)
        _add_config(sp)
        sp.add_argument("--no-resume", action="store_true", help="start afresh instead of resuming")
        sp.add_argument("--no-progress", action="store_true", help="no tqdm bars")
        if name == "diagnose":
            sp.add_argument("--checkpoints", nargs="+", default=None, help="checkpoint files or run folders")
        if name == "finetune":
            sp.add_argument("--checkpoint", default=None, help="pretraining checkpoint to start from")
    return parser


def config_from_args(args: Any) -> UMMConfig:
    """The preset with every given override applied (validated by :class:`UMMConfig`)."""
    cfg = get_preset(args.preset)
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(UMMConfig)
               if f.name not in _SKIP and getattr(args, f.name, None) is not None}  # fmt: skip
    return cfg.replace(**changes)


def _last_checkpoint(cfg: UMMConfig) -> str:
    from .pretrain import list_checkpoints

    found = list_checkpoints(os.path.join(cfg.run_dir, "pretrain"))
    if not found:
        raise FileNotFoundError(
            f"no checkpoints in {os.path.join(cfg.run_dir, 'pretrain')!r}; run `pretrain` first or pass --checkpoint."
        )
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2: a user mistake, one line on stderr; 1: a run-time failure).

    The BiSSL CLI's error convention (``applications.bissl.cli.run_command``): ``--debug`` re-raises
    with the traceback.
    """
    from applications.bissl.cli import run_command

    parser = build_parser()
    args = parser.parse_args(argv)
    args.func = _run
    return run_command(parser, args)


def _check_device(cfg: UMMConfig) -> None:
    """Refuse a device this machine does not have (before any work)."""
    try:
        dev = torch.device(cfg.device)
    except RuntimeError:
        raise ValueError(f"--device {cfg.device!r} is not a device; pass cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA GPU is visible on this machine; pass --device cpu.")


def _run(args: Any) -> int:
    cfg = config_from_args(args)
    _check_device(cfg)
    resume, progress = not args.no_resume, not args.no_progress
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    if args.command in ("pretrain", "run"):
        from .pretrain import pretrain

        files = pretrain(cfg, resume=resume, progress=progress)
        times["pretrain_s"] = time.perf_counter() - t0
        print(f"pretrain: {len(files)} checkpoints in {os.path.join(cfg.run_dir, 'pretrain', 'checkpoints')}")
    if args.command in ("diagnose", "run"):
        from .diagnose import diagnose

        t = time.perf_counter()
        ckpts = getattr(args, "checkpoints", None) or [os.path.join(cfg.run_dir, "pretrain")]
        out = os.path.join(cfg.run_dir, "diagnose")
        diagnose(cfg, ckpts, out, progress=progress)
        times["diagnose_s"] = time.perf_counter() - t
        print(f"diagnose: {os.path.join(out, 'diagnose.md')}, {os.path.join(out, 'diagnose.png')}")
    if args.command in ("finetune", "run"):
        from .finetune import compare

        t = time.perf_counter()
        ckpt = getattr(args, "checkpoint", None) or _last_checkpoint(cfg)
        out = os.path.join(cfg.run_dir, "finetune")
        compare(cfg, ckpt, out, resume=resume, progress=progress)
        times["finetune_s"] = time.perf_counter() - t
        if runtime.is_main():
            print(open(os.path.join(out, "table.md")).read())
    times["total_s"] = time.perf_counter() - t0
    if runtime.is_main():
        os.makedirs(cfg.run_dir, exist_ok=True)
        summary = {"command": args.command, "preset": cfg.preset, **times, "machine": platform.platform(),
                   "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "load_avg_end": os.getloadavg()}  # fmt: skip
        with open(os.path.join(cfg.run_dir, f"summary_{args.command}.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(json.dumps(times))
    return 0
