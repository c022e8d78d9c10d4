r"""Command line: ``python -m applications.bissl {pretrain,bissl,finetune,run} --preset NAME [overrides]``.

Every command starts from a preset (``paper``, ``mini``, ``demo``, ``tiny``; see
:mod:`applications.bissl.config`) and applies the flags given. The flag names follow the authors'
scripts where one exists: ``--pretext-type`` (``ssl_pre-training.py``), ``--d-dset`` and
``--p-pretext-type`` (``bissl.py``), ``--dset``, ``--backbone-origin``, ``--num-runs`` and
``--use-hpo`` (``fine-tuning.py``). Run any command under ``torchrun --nproc-per-node N`` for
data parallelism (gloo on CPU, NCCL on CUDA).

User mistakes (bad values, missing or foreign files, a device that is not there) end with one
``argparse``-style line on stderr and exit code 2; ``--debug`` (before the command) shows the
traceback instead. A stage that fails at run time (every upper step skipped) exits with code 1 and
its reason.

Other modules extend the CLI through :data:`EXTENSIONS` (functions called with the sub-parsers
object after the built-in commands are added) and :data:`FLAG_TABLES` (the flag tables that
:func:`add_flags` turns into options).

Examples::

    python -m applications.bissl run --preset demo
    python -m applications.bissl bissl --preset mini --d-dset digits --p-pretext-type simclr
    python -m applications.bissl finetune --preset mini --dset digits --backbone-origin bissl --num-runs 10
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

import torch

from hypergrad import CG, MINRES, Dense, Identity, Neumann, RecycledLanczos

from . import distributed as dist_utils
from .argtypes import finite_float, nonnegative_int, positive_int
from .config import PRESETS, PipelineConfig, get_preset
from .solvers import LayerwiseCG

__all__ = [
    "EXTENSIONS",
    "FLAG_TABLES",
    "SOLVERS",
    "USER_ERRORS",
    "add_finetune_run_flags",
    "add_flags",
    "add_solver_flags",
    "apply_overrides",
    "apply_solver_and_tasks",
    "build_parser",
    "check_environment",
    "config_from_args",
    "main",
    "run_command",
    "solver_from_args",
]

# flag -> (dotted config field, type, help)
_COMMON = {
    "--data-root": ("data_root", str, "data folder (torchvision layout below it)"),
    "--out-dir": ("out_dir", str, "results folder; each preset writes to <out-dir>/<preset>"),
    "--log-dir": ("log_dir", str, "metrics folder (default <out-dir>/<preset>/logs)"),
    "--device": ("device", str, "cpu, cuda or cuda:N"),
    "--num-workers": ("num_workers", nonnegative_int, "DataLoader worker processes"),
    "--seed": ("seed", nonnegative_int, "base random seed"),
    "--threads": ("threads", positive_int, "torch CPU threads (default: the preset's; torch's own when unset)"),
    "--arch": ("model.arch", str, "resnet18 or resnet50"),
    "--width": ("model.width", positive_int, "ResNet base width (64 = torchvision)"),
    "--image-size": ("model.image_size", positive_int, "input image side in pixels"),
    "--p-pretext-type": ("pretrain.pretext_type", str, "pretext task of the pretrained model: simclr or byol"),
    "--max-train-samples": ("max_train_samples", positive_int, "cap every downstream training set (quick tests)"),
    "--max-test-samples": ("max_test_samples", positive_int, "evaluate on a seeded subset of this many test images"),
}
_BISSL = {
    "--alternations": ("bissl.alternations", positive_int, "number of (lower, upper) alternations (paper 500)"),
    "--lower-steps": ("bissl.lower_steps", positive_int, "N_L lower steps per alternation (paper 20)"),
    "--upper-steps": ("bissl.upper_steps", positive_int, "N_U upper steps per alternation (paper 8)"),
    "--lam": ("bissl.method.lam", finite_float, "proximal strength lambda (paper 1e-3)"),
    "--damping": ("bissl.method.damping", finite_float, "damping added to lambda in the linear system (paper 10)"),
    "--gamma": ("bissl.gamma", finite_float, "weight of L_D(theta_D, phi) in the upper objective (paper 1)"),
    "--head-warmup-epochs": ("bissl.head_warmup_epochs", nonnegative_int, "linear-head warm-up epochs (paper 20)"),
    "--upper-lr": ("bissl.upper_lr", finite_float, "upper SGD lr (default: the authors' per-dataset value)"),
    "--upper-wd": ("bissl.upper_wd", finite_float, "upper SGD weight decay (default: per-dataset value)"),
    "--lower-lr": ("bissl.lower_lr", finite_float, "lower LARS lr (paper 1.0)"),
    "--pretext-batch": ("bissl.pretext_batch", positive_int, "pretext batch size (paper 1024)"),
    "--downstream-batch": ("bissl.downstream_batch", positive_int, "downstream batch size (paper 256)"),
    "--hvp-mode": ("bissl.method.hvp_mode", str, "Hessian-vector product mode (hypergrad.HVP_MODES)"),
    "--head-warmup-mode": (
        "bissl.head_warmup_mode",
        str,
        "train (authors: frozen backbone copy in train mode, train transform) or eval",
    ),
    "--damping-mode": (
        "bissl.damping_mode",
        str,
        "constant (paper) or adaptive (damping raised from a Lanczos estimate of H's most negative eigenvalue)",
    ),
    "--curvature-steps": ("bissl.curvature_steps", positive_int, "Lanczos steps of --damping-mode adaptive"),
    "--lam-mode": ("bissl.lam_mode", str, "constant (paper) or target_share (lam chosen for --target-share)"),
    "--target-share": (
        "bissl.target_share",
        finite_float,
        "proximal share of the lower step for lam_mode target_share",
    ),
    "--upper-split": (
        "bissl.upper_split",
        str,
        "train (authors: the stage never sees fine-tuning's validation images) or all (leaks them)",
    ),
    "--fsdp": (
        "bissl.fsdp",
        bool,
        "shard the backbones with fully_shard (FSDP2) under torchrun; the heads stay replicated (docs/fsdp.md)",
    ),
}
_FINETUNE = {
    "--ft-epochs": ("finetune.epochs", positive_int, "fine-tuning epochs per run (paper 400)"),
    "--ft-batch-size": ("finetune.batch_size", positive_int, "fine-tuning batch size (paper 256)"),
    "--hpo-trials": ("finetune.hpo_trials", positive_int, "random-search trials (paper 100)"),
    "--hpo-epochs": ("finetune.hpo_epochs", positive_int, "epochs per HPO trial (default: --ft-epochs)"),
    "--num-runs": ("finetune.num_runs", positive_int, "seeded runs at the chosen lr/wd (paper 10)"),
}
#: the ``pretrain`` command's own flags (besides those of _COMMON it shares, see _add_pretrain_command).
_PRETRAIN = {
    "--pretext-type": ("pretrain.pretext_type", str, "simclr or byol"),
    "--dataset": ("pretrain.dataset", str, "pretext (unlabelled) data set"),
    "--epochs": ("pretrain.epochs", positive_int, "pretraining epochs"),
    "--batch-size": ("pretrain.batch_size", positive_int, "global batch size (split evenly over ranks)"),
    "--lr": ("pretrain.lr", finite_float, "LARS learning rate"),
    "--weight-decay": ("pretrain.weight_decay", finite_float, "LARS weight decay"),
    "--warmup-epochs": ("pretrain.warmup_epochs", nonnegative_int, "linear warm-up epochs before the cosine decay"),
    "--temperature": ("pretrain.temperature", finite_float, "SimCLR temperature"),
    "--ema-decay": ("pretrain.ema_decay", finite_float, "BYOL target EMA decay"),
    "--max-samples": ("pretrain.max_samples", positive_int, "use the first N pretext images"),
    "--in-channels": ("model.in_channels", positive_int, "1 (grayscale) or 3"),
    "--proj-dims": ("model.proj_dims", positive_int, "projector hidden and output width"),
    "--pred-hidden": ("model.pred_hidden", positive_int, "BYOL predictor hidden width"),
}
_PRETRAIN_COMMON = (
    "--data-root",
    "--out-dir",
    "--device",
    "--num-workers",
    "--seed",
    "--threads",
    "--arch",
    "--width",
    "--image-size",
)
_RUN = {
    "--pretrain-epochs": ("pretrain.epochs", positive_int, "pretext pretraining epochs"),
    "--pretext-type": ("pretrain.pretext_type", str, "simclr or byol"),
    "--pretext-dataset": ("pretrain.dataset", str, "pretext (unlabelled) data set"),
}
#: ``--solver`` choices (see :func:`solver_from_args`).
SOLVERS = ("cg", "minres", "recycled", "layerwise_cg", "neumann", "dense", "identity")
#: name -> flag table, for modules that extend the CLI.
FLAG_TABLES = {"common": _COMMON, "pretrain": _PRETRAIN, "bissl": _BISSL, "finetune": _FINETUNE, "run": _RUN}
#: called as ``fn(subparsers)`` at the end of :func:`build_parser` (e.g. a ``--modality`` hook).
EXTENSIONS: list[Any] = []


def add_flags(sp: argparse.ArgumentParser, table: dict, title: str) -> None:
    """Add a flag table ``{flag: (dotted config field, type, help)}`` as an argument group (``bool``: a switch)."""
    g = sp.add_argument_group(title)
    for flag, (dotted, typ, help_) in table.items():
        if typ is bool:  # a switch: present = True, absent = the preset's value
            g.add_argument(flag, action="store_true", default=None, dest=dotted.replace(".", "__"), help=help_)
            continue
        g.add_argument(
            flag, type=typ, default=None, dest=dotted.replace(".", "__"), help=help_, metavar=typ.__name__.upper()
        )


def add_solver_flags(sp: argparse.ArgumentParser) -> None:
    """Add the implicit-gradient flags (``--solver``, ``--solver-steps``, ``--warm-start``, ...) as an argument group.

    ``--solver`` / ``--solver-steps`` are read by :func:`solver_from_args`; the switches write
    ``bissl.method.warm_start``, ``bissl.method.reuse_operator`` and ``bissl.lars_exclude_1d``
    through :func:`apply_overrides`. The text CLI adds the same group.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_solver_flags(p)
        >>> vars(p.parse_args(["--solver", "minres", "--warm-start"]))["bissl__method__warm_start"]
        True
    """
    g = sp.add_argument_group("implicit-gradient solver")
    g.add_argument(
        "--solver", choices=SOLVERS, default=None, help="linear solver for (I + H/(lam+damping)) x = g (default cg)"
    )
    g.add_argument(
        "--solver-steps", type=positive_int, default=None, help="iterations of the solver (default 5, as the authors)"
    )
    g.add_argument(
        "--lars-exclude-1d",
        action="store_true",
        default=None,
        dest="bissl__lars_exclude_1d",
        help="lower-level LARS exempts 1-D tensors (BatchNorm, bias); default: the authors' LARS (no filters)",
    )
    g.add_argument(
        "--warm-start",
        action="store_true",
        default=None,
        dest="bissl__method__warm_start",
        help="start each solve from the previous solution",
    )
    g.add_argument(
        "--reuse-operator",
        action="store_true",
        default=None,
        dest="bissl__method__reuse_operator",
        help="keep the pretext gradient graph for all upper steps of an alternation (one backward per HVP)",
    )


def add_finetune_run_flags(sp: argparse.ArgumentParser) -> None:
    """Add the ``finetune`` command's ``--lr``, ``--wd`` (used with ``--use-hpo 0``) and ``--epochs``.

    They write ``finetune.lr``, ``finetune.weight_decay`` and ``finetune.epochs`` through
    :func:`apply_overrides`. The text CLI's ``finetune`` adds the same flags.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_finetune_run_flags(p)
        >>> vars(p.parse_args(["--wd", "1e-4"]))["finetune__weight_decay"]
        0.0001
    """
    sp.add_argument("--lr", type=finite_float, default=None, dest="finetune__lr", help="lr when --use-hpo 0")
    sp.add_argument(
        "--wd", type=finite_float, default=None, dest="finetune__weight_decay", help="weight decay when --use-hpo 0"
    )
    sp.add_argument(
        "--epochs", type=positive_int, default=None, dest="finetune__epochs", help="fine-tuning epochs per run"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``argparse`` parser with the four sub-commands."""
    parser = argparse.ArgumentParser(
        prog="python -m applications.bissl",
        description="BiSSL (arXiv 2410.02387) on hypergrad: pretext pretraining, the bilevel BiSSL stage, "
        "fine-tuning with HPO, and the whole pipeline with its results table.",
        epilog="Presets: paper (authors' protocol, GPUs + data sets on disk), mini (small CPU replication on "
        "Fashion-MNIST), demo (minutes on 2 CPU cores, offline), tiny (seconds, tests).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{pretrain,bissl,finetune,run,ablate}")
    _add_pretrain_command(sub)
    _add_bissl_command(sub)
    _add_finetune_command(sub)
    _add_run_command(sub)
    _add_ablate_command(sub)
    for extend in EXTENSIONS:
        extend(sub)
    return parser


def _add_pretrain_command(sub: Any) -> argparse.ArgumentParser:
    sp = sub.add_parser(
        "pretrain",
        help="SimCLR/BYOL pretext pretraining (stage 1)",
        description="SimCLR/BYOL pretraining with LARS + warm-up/cosine; run under torchrun for DDP.",
    )
    sp.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="starting configuration (default demo)")
    add_flags(sp, {k: _COMMON[k] for k in _PRETRAIN_COMMON}, "data, output, model")
    add_flags(sp, _PRETRAIN, "pretraining")
    sp.add_argument(
        "--lars-exclude-1d",
        action="store_true",
        default=None,
        dest="pretrain__lars_exclude_1d",
        help="LARS exempts 1-D tensors (BatchNorm, bias) from decay and trust ratio (default: the authors' LARS)",
    )
    sp.add_argument("--stage-dir", default=None, help="output folder (default <out-dir>/<preset>/pretrain)")
    sp.add_argument(
        "--checkpoint-every", type=positive_int, default=None, help="steps between checkpoints (default: 1 epoch)"
    )
    sp.add_argument("--log-every", type=positive_int, default=10, help="steps between metric rows")
    sp.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")
    sp.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")
    sp.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sp.set_defaults(func=_cmd_pretrain)
    return sp


def _add_bissl_command(sub: Any) -> argparse.ArgumentParser:

    sp = sub.add_parser(
        "bissl",
        help="the bilevel BiSSL stage for one downstream data set (stage 2)",
        description="Head warm-up, then alternations of lower (pretext + proximal) and upper "
        "(downstream, implicit gradient) steps; saves the lower backbone.",
    )
    sp.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="starting configuration (default demo)")
    sp.add_argument(
        "--d-dset",
        default=None,
        dest="bissl__downstream",
        help="downstream task, e.g. pets, cifar10, digits, fashion_mnist@20, fashion_mnist_inv@20",
    )
    sp.add_argument(
        "--pretrained", default=None, help="pretext checkpoint (default <out-dir>/<preset>/pretrain/pretrained.pt)"
    )
    sp.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")
    sp.add_argument(
        "--arm",
        choices=("bissl", "control"),
        default="bissl",
        help="bissl, or control: the same lower steps without the upper level (continued pretraining)",
    )
    add_flags(sp, _COMMON, "data, output, model")
    add_flags(sp, _BISSL, "BiSSL stage")
    add_solver_flags(sp)
    sp.set_defaults(func=_cmd_bissl)
    return sp


def _add_finetune_command(sub: Any) -> argparse.ArgumentParser:

    sp = sub.add_parser(
        "finetune",
        help="fine-tuning with random-search HPO and seeded runs (stage 3)",
        description="Full fine-tuning (SGD, cosine) of a backbone plus a linear head: random search "
        "over lr ~ logU[1e-4, 1], wd ~ logU[1e-5, 1e-2] on a validation split, then --num-runs seeds.",
    )
    sp.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="starting configuration (default demo)")
    sp.add_argument("--dset", required=True, help="downstream task (see bissl --d-dset)")
    sp.add_argument(
        "--backbone-origin",
        choices=("pretext", "control", "bissl"),
        default="bissl",
        help="start from the pretext backbone (baseline), the control arm's or the BiSSL lower backbone",
    )
    sp.add_argument(
        "--backbone", default=None, help="backbone checkpoint (default: the stage's output under <out-dir>)"
    )
    sp.add_argument("--no-resume", action="store_true", help="start afresh even if trials or runs were saved")
    sp.add_argument("--use-hpo", type=int, choices=(0, 1), default=1, help="1: random search; 0: use --lr/--wd")
    add_finetune_run_flags(sp)
    add_flags(sp, _COMMON, "data, output, model")
    add_flags(sp, {k: v for k, v in _FINETUNE.items() if k != "--ft-epochs"}, "protocol")
    sp.set_defaults(func=_cmd_finetune)
    return sp


def _add_run_command(sub: Any) -> argparse.ArgumentParser:

    sp = sub.add_parser(
        "run",
        help="all stages for one preset, ending with the results table",
        description="pretrain -> BiSSL -> fine-tuning (baseline and BiSSL) for every downstream task "
        "of the preset; writes results.md, results.json and results.png under <out-dir>/<preset>.",
    )
    sp.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="starting configuration (default demo)")
    sp.add_argument("--tasks", default=None, help="comma-separated downstream tasks (default: the preset's)")
    sp.add_argument("--no-resume", action="store_true", help="start every stage afresh")
    sp.add_argument("--no-progress", action="store_true", help="hide the pretraining progress bar")
    add_flags(sp, _COMMON, "data, output, model")
    add_flags(sp, _RUN, "pretraining")
    add_flags(sp, _BISSL, "BiSSL stage")
    add_solver_flags(sp)
    add_flags(sp, _FINETUNE, "fine-tuning protocol")
    sp.add_argument(
        "--arms",
        default=None,
        help="comma-separated arms to fine-tune: pretext (baseline), control, bissl (default: the preset's)",
    )
    sp.set_defaults(func=_cmd_run)
    return sp


def _add_ablate_command(sub: Any) -> argparse.ArgumentParser:
    sp = sub.add_parser(
        "ablate",
        help="one BiSSL setting changed at a time (lam, damping, CG steps, N_L/N_U); one table",
        description="From the preset's pretrained checkpoint, run the BiSSL stage for the preset and for each "
        "variant of --grid, fine-tune each, and write <out-dir>/<preset>/ablation.{md,json}.",
    )
    sp.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="starting configuration (default demo)")
    sp.add_argument(
        "--grid",
        default=None,
        help="factor=v1,v2;... with factors lam, damping, cg_steps (0 = hypergrad.Identity), steps (N_L/N_U); "
        "default 'lam=1e-3,1e-2;damping=10,100;cg_steps=0,5;steps=8/4,4/8'",
    )
    sp.add_argument("--tasks", default=None, help="downstream task (default: the preset's first)")
    sp.add_argument("--no-resume", action="store_true", help="start every stage afresh")
    add_flags(sp, _COMMON, "data, output, model")
    add_flags(sp, _BISSL, "BiSSL stage")
    add_flags(sp, _FINETUNE, "fine-tuning protocol")
    sp.set_defaults(func=_cmd_ablate)
    return sp


def _cmd_ablate(args: Any) -> int:
    from .ablate import DEFAULT_GRID, parse_grid, run_ablation

    grid = parse_grid(args.grid or DEFAULT_GRID)
    cfg = check_environment(config_from_args(args))
    run_ablation(cfg, grid, resume=not args.no_resume)
    return 0


def solver_from_args(args: Any, current: Any) -> Any:
    """The solver object that ``--solver`` / ``--solver-steps`` ask for, or ``current`` when neither is given.

    ``--solver`` alone keeps 5 steps (the authors' CG budget); ``--solver-steps`` alone keeps CG.

    Example:
        >>> solver_from_args(argparse.Namespace(solver="neumann", solver_steps=3), CG(max_steps=5))
        Neumann(max_steps=3, alpha=1.0, rtol=0.0, atol=0.0)
    """
    kind, steps = getattr(args, "solver", None), getattr(args, "solver_steps", None)
    if kind is None and steps is None:
        return current
    kind = kind or "cg"
    steps = steps if steps is not None else 5
    return {
        "cg": lambda: CG(max_steps=steps),
        # symmetric indefinite systems (I + H/lam_e is indefinite at a barely pretrained point): no curvature failure
        "minres": lambda: MINRES(max_steps=steps),
        # one Lanczos basis per alternation serves every upper step (needs reuse_operator, on in demo/mini)
        "recycled": lambda: RecycledLanczos(basis_size=steps, max_steps=steps),
        "layerwise_cg": lambda: LayerwiseCG(max_steps=steps),
        "neumann": lambda: Neumann(max_steps=steps),
        "dense": Dense,
        "identity": Identity,
    }[kind]()


def apply_overrides(cfg: Any, values: dict[str, Any]) -> Any:
    """Set ``{dest: value}`` on ``cfg`` in place and return it; ``dest`` is a config path with ``__`` for ``.``.

    ``"seed"`` sets ``cfg.seed``; ``"bissl__gamma"`` replaces ``cfg.bissl`` by a copy with the new
    ``gamma``; ``"bissl__method__lam"`` replaces ``cfg.bissl.method`` (a :class:`hypergrad.Proximal`)
    and then ``cfg.bissl``. Every replaced section is re-validated by its ``__post_init__``; the
    values of one section are applied together.

    Example:
        >>> cfg = apply_overrides(get_preset("tiny"), {"seed": 3, "bissl__gamma": 0.5, "bissl__method__lam": 0.01})
        >>> cfg.seed, cfg.bissl.gamma, cfg.bissl.method.lam
        (3, 0.5, 0.01)
    """
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for dest, value in values.items():
        *parent, name = dest.split("__")
        groups.setdefault(tuple(parent), {})[name] = value
    for parent, changes in groups.items():
        if not parent:
            for name, value in changes.items():
                setattr(cfg, name, value)
            continue
        setattr(cfg, parent[0], _replace_at(getattr(cfg, parent[0]), parent[1:], changes))
    return cfg


def _replace_at(obj: Any, path: tuple[str, ...], changes: dict[str, Any]) -> Any:
    if not path:
        return dataclasses.replace(obj, **changes)
    return dataclasses.replace(obj, **{path[0]: _replace_at(getattr(obj, path[0]), path[1:], changes)})


def apply_solver_and_tasks(cfg: Any, args: Any, tasks_example: str) -> Any:
    """Apply ``--solver`` / ``--solver-steps`` (:func:`solver_from_args`) and ``--tasks`` to ``cfg``; return it.

    The solver replaces ``cfg.bissl.method.solver`` (re-validated) when one is asked for; ``--tasks``
    (comma-separated) replaces ``cfg.downstream`` and must name at least one task, else a
    ``ValueError`` suggests ``--tasks <tasks_example>``. This CLI's and the text CLI's
    ``config_from_args`` share it.

    Example:
        >>> ns = argparse.Namespace(solver="minres", solver_steps=3, tasks="digits, fashion_mnist@20")
        >>> cfg = apply_solver_and_tasks(get_preset("tiny"), ns, "digits")
        >>> type(cfg.bissl.method.solver).__name__, cfg.bissl.method.solver.max_steps, cfg.downstream
        ('MINRES', 3, ('digits', 'fashion_mnist@20'))
    """
    solver = solver_from_args(args, cfg.bissl.method.solver)
    if solver is not cfg.bissl.method.solver:
        apply_overrides(cfg, {"bissl__method__solver": solver})
    if getattr(args, "tasks", None) is not None:
        cfg.downstream = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        if not cfg.downstream:
            raise ValueError(f"--tasks {args.tasks!r} names no task; pass e.g. --tasks {tasks_example}.")
    return cfg


def config_from_args(args: Any) -> PipelineConfig:
    """The preset ``args.preset`` with every given flag applied (sections re-validated)."""
    cfg = get_preset(args.preset)
    common = {d for d, *_ in _COMMON.values()}
    apply_overrides(
        cfg, {dest: v for dest, v in vars(args).items() if v is not None and ("__" in dest or dest in common)}
    )
    apply_solver_and_tasks(cfg, args, "digits,fashion_mnist@20")
    if getattr(args, "arms", None):
        cfg.arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
        cfg.__post_init__()
    return cfg


def check_environment(cfg: PipelineConfig) -> PipelineConfig:
    """Refuse settings this machine cannot honour (device, output folder); set the thread count."""
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA GPU is visible on this machine; pass --device cpu.")
    if cfg.device not in ("cpu",) and not str(cfg.device).startswith(("cuda", "mps")):
        raise ValueError(f"--device {cfg.device!r} is not a device; pass cpu, cuda or cuda:N.")
    if str(cfg.device).startswith("mps") and not torch.backends.mps.is_available():
        raise ValueError(f"--device {cfg.device}: MPS is not available on this machine; pass --device cpu.")
    for flag, folder in (("--out-dir", cfg.out_dir), ("--log-dir", cfg.log_dir)):
        if folder is not None and os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"{flag} {folder!r} is a file, not a folder; pass a folder (it is created if missing).")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    return cfg


def _cmd_pretrain(args: Any) -> int:
    from .pretrain import pretrain

    path = pretrain(
        check_environment(config_from_args(args)),
        args.stage_dir,
        resume=not args.no_resume,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        tensorboard=args.tensorboard,
        progress=not args.no_progress,
    )
    if dist_utils.is_main_process():
        print(path)
    return 0


def _cmd_bissl(args: Any) -> int:
    from .stage_bissl import run_bissl

    dist_utils.init_distributed()
    cfg = check_environment(config_from_args(args))
    pre = args.pretrained or os.path.join(cfg.run_dir, "pretrain", "pretrained.pt")
    path = run_bissl(cfg, pre, resume=not args.no_resume, arm=args.arm)
    if dist_utils.is_main_process():
        print(path)
    return 0


def _cmd_finetune(args: Any) -> int:
    from .finetune import finetune

    dist_utils.init_distributed()
    cfg = check_environment(config_from_args(args))
    path = args.backbone or (
        os.path.join(cfg.run_dir, "pretrain", "pretrained.pt")
        if args.backbone_origin == "pretext"
        else os.path.join(cfg.run_dir, args.backbone_origin, args.dset.replace("@", "_at"), "lower_backbone.pt")
    )
    if dist_utils.is_main_process():
        r = finetune(cfg, args.dset, args.backbone_origin, path, use_hpo=bool(args.use_hpo), resume=not args.no_resume)
        print(
            f"{args.dset} / {args.backbone_origin}: top-1 {r['mean']:.2f} ± {r['std']:.2f} over "
            f"{len(r['test_top1'])} runs (lr {r['lr']:.4g}, wd {r['weight_decay']:.4g})"
        )
    dist_utils.barrier()
    return 0


def _cmd_run(args: Any) -> int:
    from .run import run_pipeline

    dist_utils.init_distributed()
    run_pipeline(check_environment(config_from_args(args)), resume=not args.no_resume, progress=not args.no_progress)
    return 0


#: exceptions that mean "the user asked for something impossible": :func:`run_command` prints them as one
#: ``argparse``-style line and returns exit code 2 (other CLIs of the package, e.g. the text one, share it).
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; returns the exit code.

    User mistakes print ``<prog> <command>: error: <one line>`` on stderr and return 2; a stage
    that fails at run time returns 1 with its reason; ``--debug`` re-raises both with the traceback.
    ``--modality text`` hands the command to the language-model pipeline (applications/bissl/text).
    """
    from .text.cli import split_modality

    modality, argv = split_modality(sys.argv[1:] if argv is None else list(argv))
    if modality == "text":  # BiSSL for language models: applications/bissl/text
        from .text.cli import main as text_main

        return text_main(argv)
    parser = build_parser()
    return run_command(parser, parser.parse_args(argv))


def run_command(parser: argparse.ArgumentParser, args: Any) -> int:
    """Run the parsed command ``args.func(args)`` under the CLI's error convention; returns the exit code.

    User mistakes print ``<prog> <command>: error: <one line>`` on stderr and return 2; a run-time
    failure returns 1 with its reason; ``--debug`` re-raises both with the traceback. The text
    pipeline's CLI (applications/bissl/text) runs its commands through this too.
    """
    prog = f"{parser.prog} {args.command}"
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if args.debug:
            raise
        print(f"{prog}: error: {_one_line(err)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        dist_utils.cleanup_distributed()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, FileNotFoundError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename!r}"
    return text
