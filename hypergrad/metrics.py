"""Metrics to files (CSV, JSON lines, optionally TensorBoard) and to a progress bar.

The core depends only on torch and numpy: TensorBoard is imported when asked for, and the progress
hook drives any object with ``update(n)`` and ``set_postfix(dict)`` (a ``tqdm`` bar, for one),
without importing it. Both plug into :class:`~hypergrad.BilevelProblem` as callbacks.
"""

from __future__ import annotations

import csv as _csv
import json
import math
import os
from pathlib import Path
from typing import IO, Any, Iterable, Mapping

from .records import StepRecord

__all__ = ["MetricsLogger", "ProgressHook"]


def _to_float(name: str, value: Any) -> float:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r} must be a number or a 1-element tensor, got {type(value).__name__}.")
    return float(value)


class MetricsLogger:
    """Append ``(step, metrics)`` rows to ``metrics.csv``, ``metrics.jsonl`` and TensorBoard.

    The CSV header is the union of all keys seen so far: when a key appears for the first time the
    file is rewritten once with the wider header (earlier rows get empty cells), so a metric that
    starts late (a test accuracy every 100 steps) needs no up-front declaration. Re-opening an
    existing directory appends (resumed runs continue their files). Non-finite values are written
    as ``nan``/``inf`` in the CSV and ``null`` in the JSON lines (which stay strict JSON). Every
    ``log`` flushes, so a killed run keeps what it logged.

    Args:
        log_dir: directory for the files (created if missing).
        csv: write ``metrics.csv``.
        jsonl: write ``metrics.jsonl`` (one JSON object per line, with a ``"step"`` key).
        tensorboard: also write TensorBoard event files (needs the ``tensorboard`` package).

    Example:
        >>> import tempfile, hypergrad
        >>> d = tempfile.mkdtemp()
        >>> with hypergrad.MetricsLogger(d) as log:
        ...     log.log(0, {"loss": 1.0})
        ...     log.log(1, {"loss": 0.5, "acc": 0.9})
        >>> print(open(d + "/metrics.csv").read().strip())
        step,loss,acc
        0,1.0,
        1,0.5,0.9
    """

    def __init__(
        self, log_dir: str | os.PathLike[str], *, csv: bool = True, jsonl: bool = True, tensorboard: bool = False
    ):
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"`log_dir` must be a str or os.PathLike, got {type(log_dir).__name__}.")
        if not (csv or jsonl or tensorboard):
            raise ValueError("MetricsLogger: all outputs are off (csv=jsonl=tensorboard=False); enable at least one.")
        self.log_dir = Path(log_dir)
        if self.log_dir.exists() and not self.log_dir.is_dir():
            raise ValueError(
                f"`log_dir` {str(log_dir)!r} is a file, not a directory; pass a directory path "
                "(it is created if missing) or remove the file."
            )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.log_dir / "metrics.csv" if csv else None
        self.jsonl_path = self.log_dir / "metrics.jsonl" if jsonl else None
        self._columns: list[str] = ["step"]
        self._csv_file: IO[str] | None = None
        if self.csv_path is not None:
            if self.csv_path.exists() and self.csv_path.stat().st_size > 0:
                with open(self.csv_path, newline="") as f:
                    header = next(_csv.reader(f), None)
                if header:
                    self._columns = header
            self._csv_file = open(self.csv_path, "a", newline="")
            if self._csv_file.tell() == 0:
                self._write_csv_row(dict.fromkeys(self._columns), header=True)
        self._jsonl_file = open(self.jsonl_path, "a") if self.jsonl_path is not None else None
        self._tb = _tensorboard_writer(self.log_dir) if tensorboard else None
        self._closed = False

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` (name -> number or 1-element tensor) at integer ``step``.

        Args:
            step: the x-axis value, an ``int`` (e.g. the outer step count).
            metrics: ``{name: value}``; values are Python numbers or 1-element tensors, and the
                name ``"step"`` is reserved.

        Example:
            >>> import tempfile, torch, hypergrad
            >>> log = hypergrad.MetricsLogger(tempfile.mkdtemp(), csv=False)
            >>> log.log(3, {"loss": torch.tensor(0.5)})
            >>> log.close(); print(open(log.jsonl_path).read().strip())
            {"step": 3, "loss": 0.5}
        """
        if self._closed:
            raise RuntimeError("MetricsLogger.log called after close(); open a new logger to append.")
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"`step` must be an int, got {type(step).__name__} ({step!r}).")
        if not isinstance(metrics, Mapping):
            raise TypeError(f"`metrics` must be a dict of name -> number, got {type(metrics).__name__}.")
        row = {str(k): _to_float(str(k), v) for k, v in metrics.items()}
        if "step" in row:
            raise ValueError("`metrics` must not contain the key 'step'; pass the step as the first argument.")
        if self._csv_file is not None:
            new = [k for k in row if k not in self._columns]
            if new:
                self._widen_csv(new)
            self._write_csv_row({"step": step, **row})
        if self._jsonl_file is not None:
            clean = {k: (v if math.isfinite(v) else None) for k, v in row.items()}
            self._jsonl_file.write(json.dumps({"step": step, **clean}, allow_nan=False) + "\n")
            self._jsonl_file.flush()
        if self._tb is not None:
            for k, v in row.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def __call__(self, record: StepRecord) -> None:
        """Use the logger as a :class:`~hypergrad.BilevelProblem` callback.

        Logs ``record.scalars()`` under ``"<phase>/<name>"`` at the outer step count, or at the
        inner one for ``"inner"`` records.

        Args:
            record: the :class:`~hypergrad.StepRecord` of one problem call.

        Example:
            >>> import tempfile, hypergrad
            >>> log = hypergrad.MetricsLogger(tempfile.mkdtemp(), jsonl=False)
            >>> log(hypergrad.StepRecord("inner", inner_steps=2, inner_losses=[0.5]))
            >>> log.close(); print(open(log.csv_path).read().split()[0])
            step,inner/inner_steps,inner/outer_steps,inner/inner_loss,inner/skipped,inner/failed_solves
        """
        step = record.outer_steps if record.phase in ("outer", "step", "hypergradient") else record.inner_steps
        self.log(step, {f"{record.phase}/{k}": v for k, v in record.scalars().items()})

    def close(self) -> None:
        """Flush and close every file (idempotent); also called on leaving a ``with`` block.

        Example:
            >>> import tempfile, hypergrad
            >>> log = hypergrad.MetricsLogger(tempfile.mkdtemp())
            >>> log.close(); log.close()   # a second close is a no-op
        """
        self._closed = True
        for f in (self._csv_file, self._jsonl_file):
            if f is not None and not f.closed:
                f.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_csv_row(self, row: Mapping[str, Any], *, header: bool = False) -> None:
        csv_file = self._csv_file
        if csv_file is None:  # only called when CSV output is on
            raise RuntimeError("MetricsLogger: CSV output is off; this is a bug in hypergrad")
        writer = _csv.writer(csv_file)
        writer.writerow(self._columns if header else [_csv_cell(row.get(c)) for c in self._columns])
        csv_file.flush()

    def _widen_csv(self, new_columns: Iterable[str]) -> None:
        """Rewrite the CSV with a wider header; the rewrite is atomic (temp file + os.replace)."""
        if self._csv_file is None or self.csv_path is None:
            raise RuntimeError("MetricsLogger: CSV output is off; this is a bug in hypergrad")
        self._csv_file.close()
        with open(self.csv_path, newline="") as f:
            rows = list(_csv.reader(f))[1:]
        old = self._columns
        self._columns = old + list(new_columns)
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = _csv.writer(f)
            writer.writerow(self._columns)
            for r in rows:
                writer.writerow(r + [""] * (len(self._columns) - len(r)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.csv_path)
        self._csv_file = open(self.csv_path, "a", newline="")


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _tensorboard_writer(log_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # tensorboard is an optional dependency
        raise ImportError(
            "MetricsLogger(tensorboard=True) needs the `tensorboard` package: pip install tensorboard "
            f"(or pass tensorboard=False). Import failed with: {err}"
        ) from err
    return SummaryWriter(log_dir=str(log_dir / "tensorboard"))


class ProgressHook:
    """A :class:`~hypergrad.BilevelProblem` callback that advances a progress bar.

    Works with any bar that has ``update(n)`` and ``set_postfix(dict)`` (``tqdm.tqdm`` does); only
    records of the phases in ``phases`` advance it.

    Args:
        bar: the progress bar.
        keys: which :meth:`StepRecord.scalars` entries to show (default: the losses).
        phases: record phases that advance the bar by one (default: ``("step",)``).

    Example:
        >>> from hypergrad import ProgressHook, StepRecord
        >>> class Bar:
        ...     n = 0
        ...     def update(self, k): self.n += k
        ...     def set_postfix(self, d): self.post = d
        >>> bar = Bar(); hook = ProgressHook(bar)
        >>> hook(StepRecord("step", inner_losses=[0.25], outer_loss=0.5))
        >>> bar.n, bar.post
        (1, {'inner_loss': '0.25', 'outer_loss': '0.5'})
    """

    def __init__(self, bar: Any, keys: Iterable[str] = ("inner_loss", "outer_loss"), phases: Iterable[str] = ("step",)):
        for method in ("update", "set_postfix"):
            if not callable(getattr(bar, method, None)):
                raise TypeError(f"`bar` must have an `{method}` method (e.g. a tqdm bar), got {type(bar).__name__}.")
        self.bar = bar
        self.keys = tuple(keys)
        self.phases = tuple(phases)

    def __call__(self, record: StepRecord) -> None:
        """Advance the bar by one and show the chosen scalars, for records of the chosen phases.

        Args:
            record: the :class:`~hypergrad.StepRecord` of one problem call.
        """
        if record.phase not in self.phases:
            return
        scalars = record.scalars()
        self.bar.set_postfix({k: f"{scalars[k]:.4g}" for k in self.keys if k in scalars})
        self.bar.update(1)
