r"""Command line of text BiSSL: ``python -m applications.bissl {pretrain,bissl,finetune,run} --modality text``.

The image CLI (:mod:`applications.bissl.cli`) hands every command line with ``--modality text`` to
:func:`main`. Same sub-commands and BiSSL / fine-tuning flags as the image path, plus the model
flags of the text path. Examples::

    python -m applications.bissl run --modality text --preset tiny
    python -m applications.bissl run --modality text --preset cpu --lora-rank 4
    python -m applications.bissl bissl --modality text --preset cpu --d-dset file:mytask --data-root data \
        --model-path ./my_gpt
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .. import cli as image_cli
from .. import distributed as dist_utils
from ..argtypes import finite_float, nonnegative_int, positive_int
from ..cli import (
    FLAG_TABLES,
    add_finetune_run_flags,
    add_flags,
    add_solver_flags,
    apply_overrides,
    apply_solver_and_tasks,
)
from .config import TEXT_PRESETS, TextConfig, get_text_preset

__all__ = [
    "MODALITIES",
    "TEXT_COMMANDS",
    "IMAGE_ONLY_FLAGS",
    "split_modality",
    "build_parser",
    "config_from_args",
    "main",
]

MODALITIES = ("image", "text")
#: the sub-commands with a text version (the image CLI's ``--modality`` option is added to these).
TEXT_COMMANDS = ("pretrain", "bissl", "finetune", "run")
#: BiSSL-stage flags of the image CLI that the text stage does not implement; the text parser does
#: not accept them (an unknown flag is an error, never a silently ignored setting).
IMAGE_ONLY_FLAGS = (
    "--head-warmup-mode",  # text: features of the frozen backbone in eval mode, computed once (no augmentation)
    "--damping-mode",
    "--curvature-steps",
    "--lam-mode",
    "--target-share",
)

_COMMON = {
    "--model-path": ("model.model_path", str, "local folder of a Hugging Face causal LM (default: a fresh GPT-2)"),
    "--tokenizer-path": ("model.tokenizer_path", str, "local tokenizer folder (default: the model's, else characters)"),
    "--seq-len": ("model.seq_len", positive_int, "tokens per sequence (<= the model's context)"),
    "--n-layer": ("model.n_layer", positive_int, "GPT-2 layers when built from a config"),
    "--n-embd": ("model.n_embd", positive_int, "GPT-2 width when built from a config"),
    "--n-head": ("model.n_head", positive_int, "GPT-2 attention heads when built from a config"),
    "--lora-rank": (
        "model.lora_rank",
        nonnegative_int,
        "0: full-parameter BiSSL; r > 0: LoRA adapters of rank r (peft)",
    ),
    "--lora-alpha": ("model.lora_alpha", finite_float, "LoRA alpha (default 2r)"),
    "--data-root": ("data_root", str, "folder of your own sets (file:NAME CSV/JSONL, hf:NAME save_to_disk)"),
    "--text-column": ("text_column", str, "text column of file:/hf: sets (default text)"),
    "--label-column": ("label_column", str, "label column of file:/hf: sets (default label)"),
    "--out-dir": ("out_dir", str, "results folder; each preset writes to <out-dir>/text-<preset>"),
    "--log-dir": ("log_dir", str, "metrics folder (default <out-dir>/text-<preset>/logs)"),
    "--device": ("device", str, "cpu, cuda or cuda:N"),
    "--threads": ("threads", positive_int, "torch CPU threads"),
    "--seed": ("seed", nonnegative_int, "base random seed"),
    "--max-train-samples": ("max_train_samples", positive_int, "cap every downstream training set"),
    "--max-test-samples": ("max_test_samples", positive_int, "evaluate on a seeded subset of this many test documents"),
}
_PRETRAIN = {
    "--pretrain-steps": ("pretrain.steps", positive_int, "next-token pretraining steps"),
    "--pretrain-batch": ("pretrain.batch_size", positive_int, "pretraining windows per step"),
    "--pretrain-lr": ("pretrain.lr", finite_float, "pretraining AdamW lr"),
    "--pretrain-max-chars": ("pretrain.max_chars", positive_int, "use the first N characters of the corpus"),
}

#: the image CLI's BiSSL-stage flags the text stage implements (``--lower-lr`` is AdamW's lr here).
_BISSL = {k: v for k, v in FLAG_TABLES["bissl"].items() if k not in IMAGE_ONLY_FLAGS}
_BISSL["--lower-lr"] = ("bissl.lower_lr", finite_float, "lower-level AdamW lr")
_FINETUNE = FLAG_TABLES["finetune"]


def split_modality(argv: list[str]) -> tuple[str, list[str]]:
    """Remove ``--modality X`` / ``--modality=X`` from ``argv``; return ``(X or "image", rest)``.

    Example:
        >>> split_modality(["run", "--modality", "text", "--preset", "tiny"])
        ('text', ['run', '--preset', 'tiny'])
    """
    rest, modality, i = [], "image", 0
    while i < len(argv):
        a = argv[i]
        if a == "--modality" or a.startswith("--modality="):
            if "=" in a:
                modality = a.split("=", 1)[1]
            elif i + 1 < len(argv):
                modality, i = argv[i + 1], i + 1
            else:
                raise SystemExit(f"--modality needs a value: one of {MODALITIES}.")
            if modality not in MODALITIES:
                raise SystemExit(f"--modality must be one of {MODALITIES}, got {modality!r}.")
        else:
            rest.append(a)
        i += 1
    return modality, rest


def add_modality_option(sub: Any) -> None:
    """:data:`applications.bissl.cli.EXTENSIONS` hook: document ``--modality`` on the image sub-commands.

    :func:`applications.bissl.cli.main` removes ``--modality`` (:func:`split_modality`) before parsing and
    hands ``text`` command lines to :func:`main`, so the option only shows in ``--help`` there.
    """
    for name in TEXT_COMMANDS:
        sp = sub.choices.get(name)
        if sp is not None:
            sp.add_argument(
                "--modality",
                choices=MODALITIES,
                default="image",
                help="image (default) or text: BiSSL for language models (applications/bissl/text, own flags)",
            )


if add_modality_option not in image_cli.EXTENSIONS:
    image_cli.EXTENSIONS.append(add_modality_option)


def _common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--preset", default="cpu", choices=sorted(TEXT_PRESETS), help="text preset (default cpu)")
    sp.add_argument("--no-resume", action="store_true", help="start afresh even if outputs exist")
    add_flags(sp, _COMMON, "model, data, output")


def build_parser() -> argparse.ArgumentParser:
    """The text parser (the same four sub-commands)."""
    parser = argparse.ArgumentParser(
        prog="python -m applications.bissl ... --modality text",
        description="Text BiSSL: GPT next-token pretext on Shakespeare, BiSSL stage, fine-tuning on text classification.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{pretrain,bissl,finetune,run}")
    sp = sub.add_parser("pretrain", help="next-token pretraining (stage 1)")
    _common(sp)
    add_flags(sp, _PRETRAIN, "pretraining")
    sp.set_defaults(func=_cmd_pretrain)

    sp = sub.add_parser("bissl", help="the BiSSL stage for one downstream task (stage 2)")
    _common(sp)
    sp.add_argument("--d-dset", default=None, dest="task", help="downstream task (reuters_r8, file:NAME, hf:NAME ...)")
    sp.add_argument("--pretrained", default=None, help="pretrained model folder (default: the pretrain stage's)")
    add_flags(sp, _BISSL, "BiSSL stage")
    add_solver_flags(sp)
    sp.set_defaults(func=_cmd_bissl)

    sp = sub.add_parser("finetune", help="fine-tuning with HPO and seeded runs (stage 3)")
    _common(sp)
    sp.add_argument("--dset", required=True, dest="task", help="downstream task")
    sp.add_argument("--backbone-origin", choices=("pretext", "bissl"), default="bissl")
    sp.add_argument("--backbone", default=None, help="BiSSL state (default: the stage's lower_backbone.pt)")
    sp.add_argument("--pretrained", default=None, help="pretrained model folder (default: the pretrain stage's)")
    sp.add_argument("--use-hpo", type=int, choices=(0, 1), default=1)
    add_finetune_run_flags(sp)
    add_flags(sp, {k: v for k, v in _FINETUNE.items() if k != "--ft-epochs"}, "protocol")
    sp.set_defaults(func=_cmd_finetune)

    sp = sub.add_parser("run", help="all stages, ending with the results table")
    _common(sp)
    sp.add_argument("--tasks", default=None, help="comma-separated downstream tasks (default: the preset's)")
    add_flags(sp, _PRETRAIN, "pretraining")
    add_flags(sp, _BISSL, "BiSSL stage")
    add_solver_flags(sp)
    add_flags(sp, _FINETUNE, "fine-tuning protocol")
    sp.set_defaults(func=_cmd_run)
    return parser


def config_from_args(args: Any) -> TextConfig:
    """The text preset with every given flag applied (sections re-validated, device and folders checked)."""
    cfg = get_text_preset(args.preset)
    values: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if value is None or dest in ("func", "command", "preset", "task", "tasks", "pretrained", "backbone", "debug"):
            continue
        if dest == "bissl__lars_exclude_1d":
            raise ValueError(
                "--lars-exclude-1d configures the image path's LARS; the text lower level uses AdamW: drop the flag."
            )
        if "__" in dest or (hasattr(cfg, dest) and not isinstance(value, bool)):
            values[dest] = value
    apply_overrides(cfg, values)
    apply_solver_and_tasks(cfg, args, "reuters_r8,election_tweets")
    image_cli.check_environment(cfg)  # type: ignore[arg-type]  # same device/out_dir/log_dir/threads fields
    return cfg


def _pre_dir(cfg: TextConfig, args: Any) -> str:
    return args.pretrained or os.path.join(cfg.run_dir, "pretrain", "model")


def _cmd_pretrain(args: Any) -> int:
    from .pretext import pretrain_text

    cfg = config_from_args(args)
    path = pretrain_text(cfg, resume=not args.no_resume)
    if dist_utils.is_main_process():
        print(path)
    return 0


def _cmd_bissl(args: Any) -> int:
    from .stage import bissl_text

    cfg = config_from_args(args)
    task = args.task or cfg.downstream[0]
    path = bissl_text(cfg, _pre_dir(cfg, args), task, resume=not args.no_resume)
    if dist_utils.is_main_process():
        print(path)
    return 0


def _cmd_finetune(args: Any) -> int:
    from .finetune import finetune_text

    cfg = config_from_args(args)
    state = args.backbone or os.path.join(cfg.variant_dir, "bissl", args.task.replace(":", "_"), "lower_backbone.pt")
    if dist_utils.is_main_process():
        r = finetune_text(
            cfg,
            args.task,
            args.backbone_origin,
            _pre_dir(cfg, args),
            state if args.backbone_origin == "bissl" else None,
            use_hpo=bool(args.use_hpo),
        )
        print(
            f"{args.task} / {args.backbone_origin}: top-1 {r['mean']:.2f} ± {r['std']:.2f} over {len(r['test_top1'])} runs"
        )
    dist_utils.barrier()
    return 0


def _cmd_run(args: Any) -> int:
    from .run import run_text

    run_text(config_from_args(args), resume=not args.no_resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (without ``--modality``) and run the text command; returns the exit code.

    As in the image CLI: user mistakes print ``<prog> <command>: error: <one line>`` on stderr and
    return 2, a run-time failure returns 1, ``--debug`` re-raises with the traceback.
    """
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    dist_utils.init_distributed()
    return image_cli.run_command(parser, args)
