"""``python -m applications.toy``: hypergradient check table and a small HPO run (CPU, seconds)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

import torch

from hypergrad.testing import LogisticProblem, QuadraticProblem, RidgeProblem

from ._cli import check_counts, parse_device
from .demo import check_hypergradients, format_table, run_hpo, write_csv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m applications.toy",
        description="Check every hypergrad solver against exact hypergradients on toy bilevel problems "
        "(quadratic, ridge, logistic), then tune ridge / logistic regularisation by implicit "
        "differentiation.",
    )
    parser.add_argument("--seed", type=int, default=0, help="data seed of the toy problems (default 0)")
    parser.add_argument("--outer-steps", type=int, default=30, help="outer gradient steps of the HPO runs (default 30)")
    parser.add_argument("--ridge-lr", type=float, default=2.0, help="outer SGD step on log_lam for ridge (default 2.0)")
    parser.add_argument(
        "--logistic-lr", type=float, default=50.0, help="outer SGD step on log_lam for logistic (default 50.0)"
    )
    parser.add_argument(
        "--unroll-steps", type=int, default=100, help="inner steps of the unrolled baseline (default 100)"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--csv", default=None, help="optional path: write the HPO trajectory as CSV")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    args = parser.parse_args(argv)
    check_counts(parser, args, ("outer_steps", "unroll_steps"))
    for flag, value in (("--ridge-lr", args.ridge_lr), ("--logistic-lr", args.logistic_lr)):
        if not (math.isfinite(value) and value > 0):
            parser.error(f"{flag} must be a finite number > 0, got {value}; pass e.g. 1.0")
    parse_device(parser, args.device)
    if args.csv is not None:  # checked before the run, not after it
        folder = os.path.dirname(os.path.abspath(args.csv))
        if os.path.isdir(args.csv) or not os.path.isdir(folder):
            parser.error(f"--csv {args.csv!r}: pass a file path in an existing folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*")  # torch's own, from torch.func.jvp
    kw = {"seed": args.seed, "dtype": torch.float64, "device": args.device}
    print("(a) Hypergradient check: relative error vs the exact hypergradient (float64)\n")
    rows = check_hypergradients(
        [QuadraticProblem(**kw), RidgeProblem(**kw), LogisticProblem(**kw)], unroll_steps=args.unroll_steps
    )
    print(format_table(rows))
    print(
        "\nIdentity is the first-order baseline and unrolled stops after a fixed number of steps: "
        "both are approximations by design.\n"
    )

    print(f"(b) Hyper-parameter optimisation: {args.outer_steps} SGD steps on log_lam with implicit_grad + CG\n")
    records = []
    for problem, lr in ((RidgeProblem(**kw), args.ridge_lr), (LogisticProblem(**kw), args.logistic_lr)):
        recs = run_hpo(problem, outer_steps=args.outer_steps, lr=lr, progress=not args.no_progress)
        records += recs
        name = type(problem).__name__
        first, last = recs[0].outer_loss, recs[-1].outer_loss
        print(f"  {name}: validation loss {first:.6f} -> {last:.6f} ({100 * (last - first) / first:+.1f}%)\n")
    if args.csv:
        write_csv(args.csv, records)
        print(f"HPO trajectory written to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
